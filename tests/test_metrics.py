"""Compare's metrics on hand-made answers with known values."""

import pytest

from banklora.evaluation import metrics
from banklora.evaluation.compare import summarize

KEYWORDS = ["身份证", "网点", "密码", "挂失"]


def test_keyword_match_counts_present_keywords():
    answer = "请携带身份证到网点办理。"
    assert metrics.keyword_match(answer, KEYWORDS) == 0.5
    assert metrics.matched_keywords(answer, KEYWORDS) == ["身份证", "网点"]
    assert metrics.keyword_match("", KEYWORDS) == 0.0
    assert metrics.keyword_match("anything", []) == 0.0
    assert metrics.keyword_match("Use the APP", ["app"]) == 1.0  # case-insensitive


def test_echoing_the_question_earns_no_keywords():
    question = "银行卡密码忘了怎么挂失？"
    echo = f"{question} {question} {question}"
    assert metrics.keyword_match(echo, KEYWORDS, question) == 0.0
    assert metrics.keyword_match(echo + " 带身份证去网点。", KEYWORDS, question) == 0.5


def test_completeness_rubric():
    good = ("您好，办理步骤如下：\n1. 携带本人有效身份证件前往任一银行网点。\n2. 填写开户申请表，配合身份核验并设置交易密码。"
            "\n3. 领取银行卡并妥善保管，切勿出租出借账户。具体所需材料以银行最新规定为准。")
    c = metrics.completeness(good, finished=True)
    assert c.length == 1.0 and c.finished == 1.0 and c.structure == 1.0
    assert c.variety > 0.9 and c.score > 0.97

    short = metrics.completeness("可以。", finished=True)
    assert short.length == pytest.approx(3 / 80)
    assert short.structure == 0.0

    loop = metrics.completeness("您好，您好，" * 40, finished=False)
    assert loop.finished == 0.0 and loop.variety < 0.05
    assert loop.score < c.score


def test_overall_weights_keywords_and_completeness():
    assert metrics.overall(1.0, 0.0) == pytest.approx(0.6)
    assert metrics.overall(0.5, 1.0) == pytest.approx(0.7)


def test_summary_counts_improved_worse_equal():
    def row(b, t):
        return {m: {"keyword_match": s, "completeness": s, "overall": s, "response_seconds": 1.0, "tokens_per_second": 2.0}
                for m, s in (("base", b), ("tuned", t))}

    s = summarize([row(0.2, 0.6), row(0.5, 0.4), row(0.3, 0.3), row(0.0, 0.5)])
    assert (s["improved"], s["worse"], s["equal"]) == (2, 1, 1)
    assert s["mean_overall_improvement"] == pytest.approx((0.4 - 0.1 + 0 + 0.5) / 4)
    assert s["base_keyword_match"] == pytest.approx(0.25) and s["tuned_keyword_match"] == pytest.approx(0.45)
