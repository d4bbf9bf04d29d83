"""Compare's metrics on hand-made answers with known values."""

import pytest

from banklora.evaluation import metrics

KEYWORDS = ["身份证", "网点", "密码", "挂失"]


def test_keyword_match_counts_present_keywords():
    answer = "请携带身份证到网点办理。"
    assert metrics.keyword_match(answer, KEYWORDS) == 0.5
    assert metrics.matched_keywords(answer, KEYWORDS) == ["身份证", "网点"]
    assert metrics.keyword_match("", KEYWORDS) == 0.0
    assert metrics.keyword_match("anything", []) is None  # no keywords: not measured
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


def test_keyword_synonyms_count_as_matches():
    assert metrics.keyword_match("请关注贷款的年利率和期限。", ["年化利率"]) == 1.0
    assert metrics.keyword_match("请带上居民身份证。", ["身份证"]) == 1.0
    assert metrics.keyword_match("请关注期限。", ["年化利率"]) == 0.0


def test_rouge_l_on_words():
    assert metrics.rouge_l("请携带身份证到网点办理", "请携带身份证到网点办理") == pytest.approx(1.0)
    assert metrics.rouge_l("完全无关的内容", "请携带身份证到网点办理") == 0.0
    # jieba: 请/携带/身份证/到/网点/办理 vs 携带/身份证/去/网点/办理: LCS 4 of 6 and 5 words
    assert metrics.rouge_l("请携带身份证到网点办理", "携带身份证去网点办理") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert metrics.rouge_l("", "参考") == 0.0


def test_bleu4_with_the_chinese_tokenizer():
    ref = "您好，请携带本人身份证到营业网点办理挂失手续。"
    assert metrics.bleu4(ref, ref) == pytest.approx(1.0)
    assert metrics.bleu4("天气很好", ref) < 0.05
    partial = metrics.bleu4("您好，请携带本人身份证到营业网点。", ref)
    assert 0.3 < partial < 1.0
    assert metrics.bleu4("Bring your ID card to a branch.", "Bring your ID card to a branch.", "en") == pytest.approx(1.0)
