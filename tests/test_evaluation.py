"""Compare: its statistics, summaries, gates and reports, and what the models are measured on."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from banklora.errors import UsageError
from banklora.evaluation import compliance, metrics, statistics
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


def _questions(base, tuned):
    def answer(overall):
        return {"overall": overall, "keyword_match": overall, "completeness": overall, "rouge_l": overall, "bleu4": overall,
                "ref_nll": 2.3 - overall, "response_seconds": 1.0, "first_token_seconds": 0.1,
                "tokens_per_second": 5.0, "finished": True, "loops": False, "compliance_flags": ["guaranteed_return"] if overall < 0 else []}
    return [{"answers": {"base": answer(b), "tuned": answer(t)}} for b, t in zip(base, tuned)]


def test_summary_pairs_and_gates():
    qs = _questions([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2], [0.5, 0.6, 0.7, 0.6, 0.5, 0.7, 0.6, 0.5])
    summary = summarize(qs, ["base", "tuned"])
    assert summary["base"]["overall"] == pytest.approx(0.1875, abs=1e-4) and summary["tuned"]["overall"] == pytest.approx(0.5875, abs=1e-4)
    pair = compare_pair(qs, "base", "tuned")
    assert pair["metrics"]["overall"]["wins"] == 8 and pair["metrics"]["overall"]["significant"]
    assert pair["metrics"]["ref_nll"]["mean_delta"] < 0 and pair["metrics"]["ref_nll"]["wins"] == 8
    report = {"models": ["base", "tuned"], "summary": summary, "comparisons": [pair]}
    assert gate(report, {"rouge_l": 0.5}, True) == []
    assert gate(report, {"rouge_l": 0.7}, False) == ["tuned: mean rouge_l 0.5875 is below --fail-below rouge_l=0.7"]
    worse = compare_pair(qs, "tuned", "base") | {"a": "base", "b": "tuned"}
    reasons = gate({"models": ["base", "tuned"], "summary": summary, "comparisons": [worse]}, {}, True)
    assert any("significantly worse than base on overall" in r for r in reasons)


def _outcomes(base_ends, tuned_ends, base_loops, tuned_loops):
    """Hand-made rows (one per question) with the given answers that end and that loop."""
    qs = _questions([0.3] * len(base_ends), [0.5] * len(base_ends))
    for i, (q, *flags) in enumerate(zip(qs, base_ends, tuned_ends, base_loops, tuned_loops)):
        q |= {"category": "deposit", "question": f"问题{i}"}
        for a in q["answers"].values():
            a["ref_perplexity"] = math.exp(a["ref_nll"])
        for (m, field), flag in zip((("base", "finished"), ("tuned", "finished"), ("base", "loops"), ("tuned", "loops")), flags):
            q["answers"][m][field] = bool(flag)
    return qs


def test_the_terminal_tables_fit_80_columns_with_long_model_names():
    import json

    from rich.cells import cell_len
    from rich.console import Console

    from banklora.evaluation.compare import print_report

    qs = _outcomes([0] * 9 + [1], [1] * 9 + [0], [0] * 10, [1, 1, 1] + [0] * 7)
    long = "lora_banking_quickstart_recipe"
    report = {"models": ["base", "tuned"], "summary": summarize(qs, ["base", "tuned"]), "comparisons": [compare_pair(qs, "base", "tuned")],
              "questions": qs, "questions_source": ["hand"], "split": None, "generation": {"max_new_tokens": 160}, "base_model": {"name": "tiny"}}
    report = json.loads(json.dumps(report).replace('"tuned"', f'"{long}"'))
    console = Console(record=True, width=80)
    print_report(report, console, show_answers=False)
    text = console.export_text()
    assert max(cell_len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert f"models: A = {long}" in text  # the headers say A, the legend says who A is
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "ends 0.100 → 0.900" in " ".join(rows) and any(r.startswith("overall ") for r in rows)


def test_ends_and_loops_shares_and_mcnemar_on_hand_made_rows():
    from banklora.evaluation.report import markdown

    # 10 questions: the base ends 1 answer, the adapter 9 (9 only it, 1 only the base);
    # the base loops on none, the adapter on questions 0-2 (3 only it): 3 vs 0 is no evidence
    qs = _outcomes([0] * 9 + [1], [1] * 9 + [0], [0] * 10, [1, 1, 1] + [0] * 7)
    summary = summarize(qs, ["base", "tuned"])
    assert (summary["base"]["ends"], summary["base"]["ends_count"], summary["base"]["finished"]) == (0.1, 1, 1)
    assert (summary["tuned"]["ends"], summary["tuned"]["ends_count"], summary["tuned"]["finished"]) == (0.9, 9, 9)
    assert (summary["base"]["loops"], summary["base"]["loops_count"]) == (0.0, 0)
    assert (summary["tuned"]["loops"], summary["tuned"]["loops_count"]) == (0.3, 3)
    ends = compare_pair(qs, "base", "tuned")["binary"]["ends"]
    assert (ends["a_rate"], ends["b_rate"], ends["b_only"], ends["a_only"], ends["n"]) == (0.1, 0.9, 9, 1, 10)
    assert ends["p_value"] == pytest.approx(2 * (10 + 1) / 2**10)  # two-sided exact binomial: 2 P(X >= 9), X ~ B(10, 1/2)
    assert ends["significant"] and ends["verdict"].startswith("ends: significantly better (+0.800")
    loops = compare_pair(qs, "base", "tuned")["binary"]["loops"]
    assert (loops["a_rate"], loops["b_rate"], loops["b_only"], loops["a_only"]) == (0.0, 0.3, 3, 0)
    assert loops["p_value"] == pytest.approx(0.25) and not loops["significant"] and loops["verdict"].startswith("loops: not significant (+0.300")
    report = {"models": ["base", "tuned"], "summary": summary, "comparisons": [compare_pair(qs, "base", "tuned")], "questions": qs,
              "questions_source": ["hand"], "split": None, "generation": {"max_new_tokens": 160}, "base_model": {"name": "tiny"}}
    assert gate(report, {"ends": 0.95}, True) == ["tuned: mean ends 0.9000 is below --fail-below ends=0.95"]
    md = markdown(report).splitlines()
    assert "| ends | 0.100 (1/10) | 0.900 (9/10) |" in md and "| loops | 0.000 (0/10) | 0.300 (3/10) |" in md
    assert f"| ends | 0.100 | 0.900 | [{ends['ci_low']:+.3f}, {ends['ci_high']:+.3f}] | {ends['p_value']:.3g} | 9 / 1 |" in md
    assert f"- {ends['verdict']}" in md and f"- {loops['verdict']}" in md
    from rich.console import Console

    from banklora.evaluation.compare import print_report

    console = Console(record=True, width=250)
    print_report(report, console, show_answers=False)
    terminal = [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]
    assert "ends 0.100 (1/10) 0.900 (9/10)" in terminal and "loops 0.000 (0/10) 0.300 (3/10)" in terminal
    assert f"ends 0.100 0.900 [{ends['ci_low']:+.3f}, {ends['ci_high']:+.3f}] {ends['p_value']:.3g} 9 / 1 significantly better" in terminal

    # an adapter that loops on 8 more questions than the base is significantly worse, and the gate says so
    qs = _outcomes([1] * 10, [1] * 10, [0] * 10, [1] * 8 + [0] * 2)
    pair = compare_pair(qs, "base", "tuned")
    assert pair["binary"]["ends"]["p_value"] == 1.0 and pair["binary"]["loops"]["verdict"].startswith("loops: significantly worse")
    reasons = gate({"models": ["base", "tuned"], "summary": summarize(qs, ["base", "tuned"]), "comparisons": [pair]}, {}, True)
    assert reasons == [f"tuned is significantly worse than base on loops ({pair['binary']['loops']['verdict']})"]


def test_threshold_flags_are_validated():
    assert parse_thresholds(["rouge_l=0.2", "overall=0.5", "ends=0.9"]) == {"rouge_l": 0.2, "overall": 0.5, "ends": 0.9}
    with pytest.raises(UsageError, match="METRIC=VALUE"):
        parse_thresholds(["loops=0.1"])  # lower is better: not a --fail-below metric
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
            assert {"answer", "keyword_match", "completeness", "overall", "rouge_l", "bleu4", "ref_nll", "ref_perplexity",
                    "compliance_flags", "response_seconds", "first_token_seconds", "tokens_per_second"} <= set(a)
            assert a["ref_perplexity"] == pytest.approx(math.exp(a["ref_nll"]), rel=1e-5)
            assert a["loops"] is metrics.loops(a["answer"]) and isinstance(a["finished"], bool)
        delta = q["deltas_vs_base"]["tiny"]
        assert delta["rouge_l"] == pytest.approx(q["answers"]["tiny"]["rouge_l"] - q["answers"]["base"]["rouge_l"], abs=1e-6)
    # means per language and per category, next to the totals, each recomputed from its questions
    for field in ("language", "category"):
        groups = saved["breakdowns"][field]
        assert sum(g["n"] for g in groups.values()) == 6 and set(groups) == {q[field] for q in saved["questions"]}
        for value, g in groups.items():
            rows = [q for q in saved["questions"] if q[field] == value]
            for m in ("base", "tiny"):
                assert g["means"][m]["rouge_l"] == pytest.approx(sum(q["answers"][m]["rouge_l"] for q in rows) / len(rows), abs=1e-4)
                assert g["means"][m]["ref_perplexity"] == pytest.approx(math.exp(sum(q["answers"][m]["ref_nll"] for q in rows) / len(rows)), rel=1e-3)
    assert saved["format"] == "banklora-compare/6" and {"ends", "loops"} <= set(saved["metric_definitions"])
    for m in ("base", "tiny"):  # ends and loops: shares and counts recomputed from the answers
        s = saved["summary"][m]
        assert s["ends_count"] == s["finished"] == sum(q["answers"][m]["finished"] for q in saved["questions"])
        assert s["loops_count"] == sum(q["answers"][m]["loops"] for q in saved["questions"])
        assert (s["ends"], s["loops"]) == (round(s["ends_count"] / 6, 4), round(s["loops_count"] / 6, 4))
    outcomes = saved["comparisons"][0]["binary"]
    assert outcomes["ends"]["b_only"] == sum(q["answers"]["tiny"]["finished"] and not q["answers"]["base"]["finished"] for q in saved["questions"])
    md = paths["markdown"].read_text()
    assert "## tiny vs base" in md and "| rouge_l |" in md and "95% CI" in md
    for key in ("ends", "loops"):
        counts = [saved["summary"][m][f"{key}_count"] for m in ("base", "tiny")]
        assert f"| {key} | {counts[0] / 6:.3f} ({counts[0]}/6) | {counts[1] / 6:.3f} ({counts[1]}/6) |" in md
        assert f"- {outcomes[key]['verdict']}" in md
    assert "## Means per language and category" in md
    for value, g in saved["breakdowns"]["category"].items():
        assert f"| category {value} | {g['n']} | {g['means']['base']['overall']:.3f} → {g['means']['tiny']['overall']:.3f} |" in md
    html = paths["html"].read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # opens with no network
    assert html.count("data:image/png;base64,") == 3
    assert html.count('<td class="text">language ') == len(saved["breakdowns"]["language"])
    for key in ("ends", "loops"):
        assert f'<td class="text">{key}</td><td>{saved["summary"]["base"][key]:.3f} ({saved["summary"]["base"][f"{key}_count"]}/6)</td>' in html
        assert f"{outcomes[key]['verdict']}</td>" in html


def test_the_model_card_carries_ends_and_loops(html_report, tiny_adapter, tmp_path):
    import shutil

    from banklora.card import record_evaluation

    report, _ = html_report
    adapter = tmp_path / "tiny"
    shutil.copytree(tiny_adapter, adapter)
    record_evaluation(adapter, report, "tiny")
    rows = json.loads((adapter / "banklora_meta.json").read_text())["evaluation"]["metrics"]
    card = (adapter / "README.md").read_text()
    for key in ("ends", "loops"):
        s = report["comparisons"][0]["binary"][key]
        assert rows[key]["base"] == report["summary"]["base"][key] and rows[key]["adapter"] == report["summary"]["tiny"][key]
        assert f"| {key} | {rows[key]['base']:.3f} | {rows[key]['adapter']:.3f} | " in card and f"McNemar p={s['p_value']:.3g}" in rows[key]["finding"]


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


def test_reference_perplexity_is_exp_of_the_mean_nll_so_one_bad_question_does_not_rule():
    # nine questions the adapter predicts a little better, one it predicts very badly (NLL 60: perplexity 1e26)
    base_nll, tuned_nll = [2.0] * 9 + [3.0], [1.8] * 9 + [60.0]
    qs = [{"answers": {m: {"overall": 0.5, "keyword_match": None, "completeness": 0.5, "rouge_l": 0.5, "bleu4": 0.5, "ref_nll": n,
                           "response_seconds": 1.0, "first_token_seconds": 0.1, "tokens_per_second": 5.0, "finished": True, "loops": False, "compliance_flags": []}
                       for m, n in (("base", b), ("tuned", t))}} for b, t in zip(base_nll, tuned_nll)]
    summary = summarize(qs, ["base", "tuned"])
    assert summary["tuned"]["ref_nll"] == pytest.approx((1.8 * 9 + 60) / 10, abs=1e-4)
    assert summary["tuned"]["ref_perplexity"] == pytest.approx(math.exp((1.8 * 9 + 60) / 10), rel=1e-3)  # 2.0e3, not 1e25
    assert summary["base"]["ref_perplexity"] == pytest.approx(math.exp(2.1), rel=1e-3)
    assert summary["tuned"]["keyword_match"] is None  # no question had keywords: not measured, not 0
    pair = compare_pair(qs, "base", "tuned")["metrics"]
    assert "keyword_match" not in pair  # left out of the statistics
    assert pair["ref_nll"]["wins"] == 9 and pair["ref_nll"]["losses"] == 1  # the statistics run on the NLL


def test_a_question_without_keywords_is_not_measured_on_keywords():
    assert metrics.keyword_match("任何回答", []) is None
    assert metrics.keyword_match("需要身份证", ["身份证", "户口本"]) == 0.5
    assert metrics.overall(None, 0.8) == 0.8  # overall is completeness alone then
    assert metrics.overall(0.5, 0.8) == pytest.approx(0.6 * 0.5 + 0.4 * 0.8)


def test_two_adapters_are_compared_with_the_base_and_with_each_other(tiny_adapter, tiny_base, small_data, tmp_path):
    from banklora.config import GenerationSettings, TrainSettings
    from banklora.evaluation.compare import run_compare
    from banklora.train import train

    other = train(TrainSettings(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(tmp_path / "other"), max_steps=2,
                                batch_size=2, lr=5e-3, seed=7), show_progress=False).output_dir
    report = run_compare([str(tiny_adapter), str(other)], questions=["banking"], split="validation", limit=6,
                         settings=GenerationSettings(max_new_tokens=4), batch_size=4)
    assert report["models"] == ["base", "tiny", "other"]
    assert [(c["a"], c["b"]) for c in report["comparisons"]] == [("base", "tiny"), ("base", "other"), ("tiny", "other")]
    rows = report["questions"]
    for a, b in (("base", "tiny"), ("tiny", "other")):
        stats = next(c for c in report["comparisons"] if (c["a"], c["b"]) == (a, b))["metrics"]["ref_nll"]
        deltas = [q["answers"][b]["ref_nll"] - q["answers"][a]["ref_nll"] for q in rows]
        assert stats["n"] == 6 and stats["mean_delta"] == pytest.approx(sum(deltas) / 6, abs=1e-5)
        assert stats["wins"] == sum(d < -statistics.TIE for d in deltas)  # lower NLL is better
    # each model answered with its own weights: the three reference NLLs differ
    assert len({round(rows[0]["answers"][m]["ref_nll"], 6) for m in report["models"]}) == 3


def test_batched_greedy_answers_equal_single_answers(tiny_adapter):
    """Left padding in a batch must not change a greedy answer (tiny model: equal token for token)."""
    from banklora.config import GenerationSettings
    from banklora.data.dataset import load_examples
    from banklora.evaluation.compare import prompt_ids
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load

    loaded = load(str(tiny_adapter))
    prompts = [prompt_ids(loaded.tokenizer, e) for e in load_examples(["banking-eval"])[:6]]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate_batch(loaded.model, loaded.tokenizer, prompts, settings, batch_size=6)
    single = [generate_batch(loaded.model, loaded.tokenizer, [p], settings, batch_size=1)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in single]


def test_the_continuous_engine_answers_as_transformers_generate_did(tiny_adapter):
    """compare's answers moved from fixed batches of model.generate onto the continuous-batching
    engine: greedy answers token for token the same, prompts joining as rows free up."""
    import torch

    from banklora.config import GenerationSettings
    from banklora.data.dataset import load_examples
    from banklora.data.format import stop_token_ids
    from banklora.evaluation.compare import prompt_ids
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load

    loaded = load(str(tiny_adapter))
    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, e) for e in load_examples(["banking"], split="test")[:7]]
    settings = GenerationSettings(max_new_tokens=12)
    engine = generate_batch(loaded.model, tok, prompts, settings, batch_size=3)  # 7 prompts through 3 rows
    stops = stop_token_ids(tok)
    for prompt, got in zip(prompts, engine):
        with torch.no_grad():
            out = loaded.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                        max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        n = next((k for k, t in enumerate(new) if t in stops), len(new))
        assert got.text == tok.decode(new[:n], skip_special_tokens=True).strip() and got.new_tokens == n
        assert got.finished == (n < len(new)) and 0 < got.first_token_seconds <= got.seconds


def test_multi_turn_questions_are_answered_and_scored_on_the_same_conversation(tiny_adapter, tmp_path):
    from banklora.config import GenerationSettings
    from banklora.data.batching import collate
    from banklora.data.format import encode_conversation
    from banklora.evaluation.compare import run_compare
    from banklora.inference.generate import generate_batch
    from banklora.loss import answer_loss
    from banklora.modeling import load

    turns = [{"role": "user", "content": "我想办一张信用卡。"}, {"role": "assistant", "content": "好的，请问您有稳定收入吗？"},
             {"role": "user", "content": "有的，需要准备什么材料？"}, {"role": "assistant", "content": "请准备身份证和收入证明。"}]
    questions = tmp_path / "dialogue.jsonl"
    questions.write_text(json.dumps({"messages": turns, "keywords": ["身份证"]}, ensure_ascii=False) + "\n")
    report = run_compare([str(tiny_adapter)], questions=[str(questions)], settings=GenerationSettings(max_new_tokens=5), dtype="fp32")
    q = report["questions"][0]
    assert q["question"] == "有的，需要准备什么材料？" and q["conversation"] == turns[:3]
    loaded = load(str(tiny_adapter), dtype="fp32")
    prompt = encode_conversation(loaded.tokenizer, turns[:3], add_generation_prompt=True).input_ids
    assert q["answers"]["tiny"]["answer"] == generate_batch(loaded.model, loaded.tokenizer, [prompt], GenerationSettings(max_new_tokens=5))[0].text
    scored = encode_conversation(loaded.tokenizer, turns, last_answer_only=True)
    with torch.no_grad():
        expected = answer_loss(loaded.model, collate([scored], pad_id=0)).item()
    assert q["answers"]["tiny"]["ref_nll"] == pytest.approx(expected, abs=1e-5)


def test_reference_nll_equals_one_plain_forward_pass_per_answer(tiny_adapter):
    """Scoring runs each prompt once (left-padded among prompts of other lengths) and its answers
    on copies of its KV cache (right-padded): the same NLL as transformers' own forward pass over
    prompt + answer, for answers longer than the tiny model's sliding window (64), a multi-turn
    conversation, a prompt shared by more answers than one pass takes, and with the adapter on and off."""
    from banklora.data.dataset import Example, load_examples
    from banklora.data.format import encode_conversation
    from banklora.evaluation.compare import ANSWERS_PER_PASS, reference_nll
    from banklora.modeling import load

    loaded = load(str(tiny_adapter), dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    long = [e for e in load_examples(["banking"], split="test") if len(tok(e.output).input_ids) > 80][:3]
    shared = [Example(instruction="定期存款提前支取怎么计息？", output=o)
              for o in ("按活期利率", "按原定期利率计息，不受影响", "不计利息", *(f"按第{i}档利率" for i in range(ANSWERS_PER_PASS)))]
    dialogue = Example(instruction="", output="请准备身份证和收入证明。", messages=(("user", "我想办信用卡。"), ("assistant", "请问您有稳定收入吗？"),
                                                             ("user", "有的，要什么材料？"), ("assistant", "请准备身份证和收入证明。")))
    examples = [long[0], shared[0], Example(instruction="没有参考答案的问题", output=""), dialogue, *shared[1:], *long[1:]]
    assert len(long) == 3
    for adapter_on in (True, False):
        with contextlib.nullcontext() if adapter_on else model.disable_adapter():
            got = reference_nll(model, tok, examples, batch_size=2)
            assert got[2] is None and dialogue.question()[-1]["content"] == "有的，要什么材料？"
            for e, nll in zip(examples, got):
                if e.output:
                    enc = encode_conversation(tok, e.question() + [{"role": "assistant", "content": e.output}], last_answer_only=True)
                    with torch.no_grad():
                        logp = model(torch.tensor([enc.input_ids])).logits[0, :-1].float().log_softmax(-1)
                    target = torch.tensor(enc.labels[1:])
                    keep = target != -100
                    assert nll == pytest.approx(-logp[keep].gather(1, target[keep, None]).mean().item(), abs=1e-5)


def test_a_compare_without_a_terminal_reports_progress_as_log_lines(tiny_adapter, caplog):
    """CI logs have no live bar: each model's answers and scoring show as lines."""
    import logging

    from banklora.config import GenerationSettings
    from banklora.evaluation.compare import run_compare

    with caplog.at_level(logging.INFO, logger="banklora"):
        run_compare([str(tiny_adapter)], questions=["banking"], split="test", limit=3, settings=GenerationSettings(max_new_tokens=2),
                    knowledge_tests=["banking-mcq"], show_progress=True)
    lines = [r.getMessage() for r in caplog.records]
    for name in ("base", "tiny"):
        assert f"compare {name} 3/3  answers" in lines
        assert f"compare {name}: the reference answers' likelihood (3) and the knowledge test (120 questions)" in lines


def test_adapter_directories_with_dots_compare_under_names_without_them(tiny_adapter, tmp_path):
    """A sweep names its adapters r8-a32-lr0.001: PEFT refuses '.' in adapter names (module names)."""
    import shutil

    from banklora.config import GenerationSettings
    from banklora.errors import UsageError
    from banklora.evaluation.compare import run_compare
    from banklora.modeling import load

    dotted = tmp_path / "r8-a32-lr0.001"
    shutil.copytree(tiny_adapter, dotted)
    report = run_compare([str(dotted), str(tiny_adapter)], questions=["banking-eval"], limit=1, settings=GenerationSettings(max_new_tokens=1))
    assert report["models"] == ["base", "r8-a32-lr0_001", "tiny"] and report["adapters"]["r8-a32-lr0_001"]["path"] == str(dotted)
    with pytest.raises(UsageError, match="adapter name 'banking.v2'"):
        load(str(tiny_adapter), names=("banking.v2",))


def test_compare_answers_in_bf16_and_scores_in_fp32_where_the_cpu_multiplies_bf16(tiny_adapter, monkeypatch):
    """--dtype auto on a CPU with AVX512-BF16 or AMX: the answers are the bf16-loaded model's, the
    reference likelihoods fp32's to the digit (scored in bf16, a knowledge-test finding moved on
    the 72 test questions: README, Performance); the reports say which is which."""
    from banklora.config import GenerationSettings
    from banklora.data.dataset import load_examples
    from banklora.evaluation import compare
    from banklora.evaluation.report import html, markdown
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load

    monkeypatch.setattr(compare, "cpu_bf16", lambda: True)
    settings = GenerationSettings(max_new_tokens=6)
    split = compare.run_compare([str(tiny_adapter)], questions=["banking-eval"], limit=3, settings=settings)
    fp32 = compare.run_compare([str(tiny_adapter)], questions=["banking-eval"], limit=3, settings=settings, dtype="fp32")
    assert (split["dtype"], split["scoring_dtype"], fp32["dtype"], fp32["scoring_dtype"]) == ("bfloat16", "float32", "float32", "float32")
    for a, b in zip(split["questions"], fp32["questions"]):
        assert all(a["answers"][m]["ref_nll"] == b["answers"][m]["ref_nll"] for m in ("base", "tiny"))
    bf16 = load(str(tiny_adapter), dtype="bf16")
    prompts = [compare.prompt_ids(bf16.tokenizer, e) for e in load_examples(["banking-eval"], questions=True)[:3]]
    expected = generate_batch(bf16.model, bf16.tokenizer, prompts, settings, batch_size=compare.COMPARE_BATCH_SIZE)
    assert [q["answers"]["tiny"]["answer"] for q in split["questions"]] == [g.text for g in expected]
    assert "answers in bfloat16, scored in float32 on cpu" in markdown(split) and "answers in bfloat16, scored in float32" in html(split)
    assert "float32 weights on cpu" in markdown(fp32)
