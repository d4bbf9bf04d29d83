"""The multiple-choice knowledge test: likelihood scoring, accuracy per part, McNemar, bad files."""

import json

import pytest
import torch
from conftest import cli

from banklora.config import GenerationSettings
from banklora.errors import UsageError
from banklora.evaluation import statistics
from banklora.evaluation.knowledge import load_choices

QUESTIONS = [
    {"id": "q1", "category": "信用卡", "language": "zh", "part": "taught", "question": "信用卡逾期会影响征信吗？",
     "options": ["会，逾期记录会报送征信系统", "不会，征信只记录贷款", "只有逾期一年以上才会", "银行可以随时删除记录"], "answer": 0, "source": "card-x"},
    {"id": "q2", "category": "反诈骗", "language": "en", "part": "held-out", "question": "A caller asks for my SMS code. What should I do?",
     "options": ["Read it out quickly", "Never share it and hang up", "Share it if they know my name", "Send it by text instead"], "answer": 1},
    {"id": "q3", "category": "存款业务", "language": "zh", "part": "held-out", "question": "定期存款提前支取通常怎么计息？",
     "options": ["按原定期利率", "按活期利率", "不计利息", "按双倍利率"], "answer": 1},
]


@pytest.fixture(scope="module")
def mcq_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mcq") / "mcq.jsonl"
    path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def report(tiny_adapter, mcq_file):
    from banklora.evaluation.compare import run_compare

    return run_compare([str(tiny_adapter)], questions=["banking"], split="test", limit=2, settings=GenerationSettings(max_new_tokens=2),
                       knowledge_tests=[str(mcq_file)], dtype="fp32")  # checked against a plain fp32 forward pass


def test_each_option_is_scored_by_its_mean_nll_as_the_answer_and_the_lowest_is_chosen(report, tiny_base):
    """Recomputed with a plain transformers forward pass over the formatter's ids and labels; the
    calibrated choice from the options' total NLL after the question minus after the neutral prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from banklora.data.format import encode_conversation

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)

    def nll(question, option):  # per answer token
        enc = encode_conversation(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": option}], last_answer_only=True)
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        target = labels[0, 1:]
        mask = target != -100
        return -logp[mask].gather(1, target[mask, None])[:, 0]

    k = report["knowledge"]
    assert [q["id"] for q in k["questions"]] == ["q1", "q2", "q3"]
    for q, source in zip(k["questions"], QUESTIONS):
        asked = [nll(source["question"], o) for o in source["options"]]
        neutral = [nll("答案：" if source["language"] == "zh" else "Answer:", o) for o in source["options"]]
        expected = [x.mean().item() for x in asked]
        got = q["models"]["base"]["option_nll"]
        assert got == pytest.approx(expected, abs=1e-4)
        assert q["models"]["base"]["option_nll_neutral"] == pytest.approx([x.mean().item() for x in neutral], abs=1e-4)
        assert q["option_tokens"] == [len(x) for x in asked]
        assert q["models"]["base"]["choice"] == min(range(4), key=expected.__getitem__)
        assert q["models"]["base"]["correct"] == (q["models"]["base"]["choice"] == source["answer"])
        gain = [(a.sum() - u.sum()).item() for a, u in zip(asked, neutral)]
        assert q["models"]["base"]["calibrated_choice"] == min(range(4), key=gain.__getitem__)
        assert q["models"]["base"]["calibrated_correct"] == (q["models"]["base"]["calibrated_choice"] == source["answer"])
        assert q["models"]["tiny"]["option_nll"] != got  # the adapter answers with its own weights


def test_the_calibrated_score_picks_what_the_question_raises_not_what_is_fluent_anyway():
    """An option the model finds likely whatever is asked wins by likelihood; by the calibrated
    score the one the question makes likelier wins."""
    from banklora.evaluation.knowledge import knowledge_report, load_choices

    (choice,) = [c for c in load_choices(["banking-mcq"]) if c.id == "mcq-account-01"]
    right, fluent = choice.answer, (choice.answer + 1) % 4
    # (total NLL, tokens) after the question, then after the neutral prompt
    asked = [(40.0, 10)] * 4
    asked[fluent], asked[right] = (20.0, 10), (30.0, 10)
    neutral = [(44.0, 10)] * 4
    neutral[fluent], neutral[right] = (21.0, 10), (39.0, 10)
    k = knowledge_report([choice], {"base": asked + neutral}, ["base"], [], ["banking-mcq"])
    (q,) = k["questions"]
    assert q["models"]["base"]["choice"] == fluent and q["models"]["base"]["calibrated_choice"] == right
    assert k["accuracy"]["base"]["taught"]["accuracy"] == 0.0 and k["accuracy"]["base"]["taught (calibrated)"]["accuracy"] == 1.0
    assert "language zh (calibrated)" not in k["accuracy"]["base"]


def test_accuracy_per_part_and_language_and_the_report_files(report, tmp_path):
    from banklora.evaluation.report import write_reports

    k = report["knowledge"]
    for m in ("base", "tiny"):
        correct = {q["id"]: q["models"][m]["correct"] for q in k["questions"]}
        acc = k["accuracy"][m]
        assert acc["all"]["n"] == 3 and acc["all"]["correct"] == sum(correct.values())
        assert acc["taught"] == {"correct": int(correct["q1"]), "n": 1, "accuracy": float(correct["q1"])}
        assert acc["held-out"]["correct"] == correct["q2"] + correct["q3"] and acc["language en"]["n"] == 1
        calibrated = {q["id"]: q["models"][m]["calibrated_correct"] for q in k["questions"]}
        assert acc["held-out (calibrated)"]["correct"] == calibrated["q2"] + calibrated["q3"] and acc["all (calibrated)"]["n"] == 3
    (c,) = k["comparisons"]
    assert (c["a"], c["b"]) == ("base", "tiny") and set(c["parts"]) == set(k["accuracy"]["base"])
    paths = write_reports(report, tmp_path / "r.json")
    md = paths["markdown"].read_text()
    assert "## Knowledge test" in md and f"| held-out | 2 | {k['accuracy']['base']['held-out']['accuracy']:.3f} |" in md
    for name, s in c["parts"].items():  # each part's finding once, named once
        assert s["verdict"].startswith(f"{name}: ") and md.count(f"- {s['verdict']}\n") == 1 and f"{name}: {name}:" not in md
    html = paths["html"].read_text()
    assert 'id="knowledge"' in html and all(f"{name}: {name}:" not in html for name in c["parts"])


def test_mcnemar_counts_only_the_questions_the_two_models_disagree_on():
    same = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert statistics.mcnemar(same, same)["p_value"] == 1.0 and not statistics.mcnemar(same, same)["significant"]
    s = statistics.mcnemar([0] * 10 + [1] * 30, [1] * 10 + [1] * 30)  # b right on 10 more, agreeing on 30
    assert (s["b_only"], s["a_only"], s["n"]) == (10, 0, 40) and s["mean_delta"] == pytest.approx(0.25)
    assert s["p_value"] == pytest.approx(2 * 0.5**10) and s["significant"] and "significantly better" in s["verdict"]
    mixed = statistics.mcnemar([0] * 3 + [1] * 2 + [1] * 20, [1] * 3 + [0] * 2 + [1] * 20)  # 3 vs 2: no evidence
    assert mixed["p_value"] == pytest.approx(1.0) and not mixed["significant"]


@pytest.mark.parametrize("change, message", [
    ({"answer": 4}, "field 'answer'"),
    ({"options": ["a", "b", "c"]}, "field 'options' must be a list of 4"),
    ({"options": ["a", "a", "b", "c"]}, "the same option twice"),
    ({"part": "train"}, "field 'part' must be one of taught, held-out"),
    ({"question": ""}, "field 'question'"),
])
def test_a_bad_question_is_refused_with_its_line_and_field(tmp_path, change, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0], ensure_ascii=False) + "\n" + json.dumps(QUESTIONS[1] | change, ensure_ascii=False) + "\n")
    with pytest.raises(UsageError, match=f"{path}:2: .*{message}"):
        load_choices([str(path)])


def test_compare_refuses_a_missing_knowledge_file_with_exit_2_and_writes_no_report(tiny_adapter, tmp_path):
    report = tmp_path / "r.json"
    result = cli("compare", "--peft-model-path", str(tiny_adapter), "--knowledge", str(tmp_path / "nope.jsonl"), "--report", str(report))
    assert result.returncode == 2 and "--knowledge" in result.stderr and "nope.jsonl" in result.stderr
    assert not report.exists()


def test_the_builtin_test_loads_and_none_turns_it_off(tiny_adapter, tmp_path):
    assert len(load_choices(["banking-mcq"])) >= 120
    report = tmp_path / "r.json"
    result = cli("compare", "--peft-model-path", str(tiny_adapter), "--limit", "1", "--max-new-tokens", "2", "--knowledge", "none",
                 "--report", str(report), "--no-answers")
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["knowledge"] is None and "knowledge test" not in result.stdout


def test_a_compares_numbers_do_not_depend_on_its_batch_size(report, tiny_adapter, mcq_file):
    """--batch-size sets how many answers are generated at once; teacher-forced scoring (reference
    NLL, the options' NLL) always runs in the same batches, so the numbers are the same to the bit."""
    from banklora.evaluation.compare import run_compare

    one = run_compare([str(tiny_adapter)], questions=["banking"], split="test", limit=2, settings=GenerationSettings(max_new_tokens=2),
                      knowledge_tests=[str(mcq_file)], batch_size=1)
    assert report["generation"]["batch_size"] == 128 and one["generation"]["batch_size"] == 1
    for q_default, q1 in zip(report["questions"], one["questions"]):
        for m in report["models"]:
            assert q_default["answers"][m]["answer"] == q1["answers"][m]["answer"] and q_default["answers"][m]["ref_nll"] == q1["answers"][m]["ref_nll"]
    assert [q["models"] for q in report["knowledge"]["questions"]] == [q["models"] for q in one["knowledge"]["questions"]]
