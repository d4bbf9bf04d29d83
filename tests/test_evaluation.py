"""Compare's statistics, compliance rules, gates and reports."""

import json

import numpy as np
import pytest

from banklora.errors import UsageError
from banklora.evaluation import compliance, statistics
from banklora.evaluation.compare import compare_pair, gate, parse_thresholds, summarize


def test_bootstrap_on_known_cases():
    low, high = statistics.bootstrap_ci([0.2] * 10)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2)  # no spread, no interval
    rng = np.random.default_rng(1)
    deltas = rng.normal(0.5, 1.0, size=400)
    low, high = statistics.bootstrap_ci(deltas)
    se = deltas.std(ddof=1) / np.sqrt(len(deltas))
    assert low == pytest.approx(deltas.mean() - 1.96 * se, abs=0.02)  # matches the normal interval
    assert high == pytest.approx(deltas.mean() + 1.96 * se, abs=0.02)
    assert statistics.bootstrap_ci(deltas) == (low, high)  # seeded: reproducible


def test_paired_statistics_in_words():
    better = statistics.paired([0.1] * 12, [0.1 + 0.05 * (i % 3 + 1) for i in range(12)], metric="rouge_l")
    assert better.significant and better.wins == 12 and better.ci_low > 0 and 0 < better.p_value < 0.01
    assert better.to_dict()["p_value"] == better.p_value  # not rounded to 0
    assert "significantly better" in better.verdict
    noise = statistics.paired([0.5, 0.6, 0.4, 0.5, 0.55, 0.45], [0.55, 0.5, 0.45, 0.5, 0.5, 0.5])
    assert not noise.significant and "not significant" in noise.verdict
    assert (noise.wins, noise.ties, noise.losses) == (3, 1, 2)
    ppl = statistics.paired([10, 12, 11, 13, 10, 12, 11, 14, 10, 12], [5, 6, 5, 7, 5, 6, 6, 7, 5, 6], higher_is_better=False, metric="ref_perplexity")
    assert ppl.significant and ppl.wins == 10 and "significantly better" in ppl.verdict
    same = statistics.paired([0.3] * 5, [0.3] * 5)
    assert same.p_value == 1.0 and same.ties == 5 and not same.significant


def test_compliance_rules_on_planted_answers():
    rules = compliance.load_rules()
    assert compliance.flags("这款产品保本保收益，稳赚不赔。", "理财产品", rules) == ["guaranteed_return", "missing_risk_warning"]
    assert compliance.flags("请把收到的短信验证码告诉客服，我们帮您处理。", "网银安全", rules) == ["credential_sharing"]
    assert compliance.flags("不要把验证码告诉任何人。", "网银安全", rules) == []
    assert compliance.flags("请提供您的验证码给工作人员核实。", "网银安全", rules) == ["credential_sharing"]
    assert compliance.flags("切勿告诉他人密码，不要提供验证码。", "网银安全", rules) == []  # advice, not a violation
    assert compliance.flags("谨防“保本保收益”的宣传。理财非存款，产品有风险，投资须谨慎。", "理财产品", rules) == []
    assert compliance.flags("可以关注净值型产品。", "理财产品", rules) == ["missing_risk_warning"]
    assert compliance.flags("可以关注净值型产品。", "存款业务", rules) == []  # the warning is required for wealth questions only
    assert compliance.flags("Please send me your verification code.", "网银安全", rules) == ["credential_sharing"]


def test_users_extend_the_rules(tmp_path):
    extra = tmp_path / "rules.yaml"
    extra.write_text("rules:\n  - id: no_crypto\n    kind: forbidden\n    description: recommends crypto\n    patterns: ['比特币']\n")
    rules = compliance.load_rules(extra)
    assert compliance.flags("可以考虑比特币。", "存款业务", rules) == ["no_crypto"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    kind: maybe\n    patterns: ['a']\n")
    with pytest.raises(UsageError, match="rule 1 needs id, kind"):
        compliance.load_rules(bad)


def _questions(base, tuned):
    def answer(overall):
        return {"overall": overall, "keyword_match": overall, "completeness": overall, "rouge_l": overall, "bleu4": overall,
                "ref_perplexity": 10 - 5 * overall, "response_seconds": 1.0, "first_token_seconds": 0.1,
                "tokens_per_second": 5.0, "finished": True, "compliance_flags": ["guaranteed_return"] if overall < 0 else []}
    return [{"answers": {"base": answer(b), "tuned": answer(t)}} for b, t in zip(base, tuned)]


def test_summary_pairs_and_gates():
    qs = _questions([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2], [0.5, 0.6, 0.7, 0.6, 0.5, 0.7, 0.6, 0.5])
    summary = summarize(qs, ["base", "tuned"])
    assert summary["base"]["overall"] == pytest.approx(0.1875, abs=1e-4) and summary["tuned"]["overall"] == pytest.approx(0.5875, abs=1e-4)
    pair = compare_pair(qs, "base", "tuned")
    assert pair["metrics"]["overall"]["wins"] == 8 and pair["metrics"]["overall"]["significant"]
    assert pair["metrics"]["ref_perplexity"]["mean_delta"] < 0 and pair["metrics"]["ref_perplexity"]["wins"] == 8
    report = {"models": ["base", "tuned"], "summary": summary, "comparisons": [pair]}
    assert gate(report, {"rouge_l": 0.5}, True) == []
    assert gate(report, {"rouge_l": 0.7}, False) == ["tuned: mean rouge_l 0.5875 is below --fail-below rouge_l=0.7"]
    worse = compare_pair(qs, "tuned", "base") | {"a": "base", "b": "tuned"}
    reasons = gate({"models": ["base", "tuned"], "summary": summary, "comparisons": [worse]}, {}, True)
    assert any("significantly worse than base on overall" in r for r in reasons)


def test_threshold_flags_are_validated():
    assert parse_thresholds(["rouge_l=0.2", "overall=0.5"]) == {"rouge_l": 0.2, "overall": 0.5}
    with pytest.raises(UsageError, match="METRIC=VALUE"):
        parse_thresholds(["rouge=0.2"])
    with pytest.raises(UsageError, match="not a number"):
        parse_thresholds(["rouge_l=high"])


def test_no_compliance_flag_on_the_reference_answers():
    """The curated answers are compliant: a rule that flags them is a false alarm."""
    from banklora.data.dataset import load_examples

    rules = compliance.load_rules()
    flagged = [(e.id, compliance.flags(e.output, e.category, rules)) for e in load_examples(["banking", "banking-eval"])]
    assert [f for f in flagged if f[1]] == []


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def html_report(tmp_path_factory, tiny_adapter):
    from banklora.config import GenerationSettings
    from banklora.evaluation.compare import run_compare
    from banklora.evaluation.report import write_reports

    report = run_compare([str(tiny_adapter)], questions=["banking"], split="test", settings=GenerationSettings(max_new_tokens=4), limit=6)
    return report, write_reports(report, tmp_path_factory.mktemp("report") / "compare.json")


def test_reports_hold_every_number(html_report):
    report, paths = html_report
    saved = json.loads(paths["json"].read_text())
    assert saved["models"] == ["base", "tiny"] and len(saved["questions"]) == 6
    for q in saved["questions"]:
        for m in ("base", "tiny"):
            a = q["answers"][m]
            assert {"answer", "keyword_match", "completeness", "overall", "rouge_l", "bleu4", "ref_perplexity",
                    "compliance_flags", "response_seconds", "first_token_seconds", "tokens_per_second"} <= set(a)
            assert a["ref_perplexity"] > 1
        delta = q["deltas_vs_base"]["tiny"]
        assert delta["rouge_l"] == pytest.approx(q["answers"]["tiny"]["rouge_l"] - q["answers"]["base"]["rouge_l"], abs=1e-6)
    md = paths["markdown"].read_text()
    assert "## tiny vs base" in md and "| rouge_l |" in md and "95% CI" in md
    html = paths["html"].read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # opens with no network
    assert html.count("data:image/png;base64,") == 3


def test_html_report_renders_charts_and_table_in_chromium(html_report, tmp_path):
    import shutil
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    _, paths = html_report
    shot = tmp_path / "page.png"
    profile = tmp_path / "profile"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2600",
                    paths["html"].as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", paths["html"].as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr>") >= 6 + 1 and 'id="chart-deltas"' in dom
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The bar chart draws the adapter in #2e86de and the base in #7f8c8d: both must be on screen.
    for rgb in ((0x2E, 0x86, 0xDE), (0x7F, 0x8C, 0x8D)):
        hits = (np.abs(image - np.array(rgb)).sum(axis=2) < 12).sum()
        assert hits > 500, f"chart colour {rgb} barely visible ({hits} pixels)"
    # The table header background (#eef2f7) shows the tables rendered.
    assert (np.abs(image - np.array((0xEE, 0xF2, 0xF7))).sum(axis=2) < 4).sum() > 2000


def test_questions_without_references_skip_reference_metrics(tiny_adapter, tmp_path):
    from banklora.config import GenerationSettings
    from banklora.evaluation.compare import run_compare
    from banklora.evaluation.report import write_reports

    questions = tmp_path / "questions.jsonl"
    rows = [{"instruction": "信用卡怎么提额？", "keywords": ["信用", "额度"]},
            {"instruction": "怎么开户？", "output": "携带身份证到网点办理。", "keywords": ["身份证"]},
            {"instruction": "挂失要多久？", "keywords": ["挂失"]}]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report = run_compare([str(tiny_adapter)], questions=[str(questions)], settings=GenerationSettings(max_new_tokens=3))
    answers = [q["answers"]["tiny"] for q in report["questions"]]
    assert [a["rouge_l"] is None for a in answers] == [True, False, True]
    assert [a["ref_perplexity"] is None for a in answers] == [True, False, True]
    pair = report["comparisons"][0]["metrics"]
    assert "keyword_match" in pair and pair["keyword_match"]["n"] == 3
    assert "rouge_l" not in pair  # one question with a reference is too few for statistics
    paths = write_reports(report, tmp_path / "r.json")
    rouge_row = next(line for line in paths["markdown"].read_text().splitlines() if line.startswith("| rouge_l |"))
    assert "n/a" not in rouge_row  # the mean over the one question that has a reference
