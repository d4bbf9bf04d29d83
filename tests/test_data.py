"""The built-in dataset and loading user data with errors that name file, line and field."""

import json
from collections import Counter

import pytest

from banklora.data.dataset import dataset_hash, load_examples
from banklora.errors import UsageError

SEED_COUNTS = {"账户管理": 3, "贷款业务": 3, "理财产品": 2, "信用卡": 2, "网银安全": 2, "外汇业务": 2, "保险业务": 2}
WARNING = "理财非存款，产品有风险，投资须谨慎"


def test_builtin_seed_has_16_pairs_in_7_categories():
    examples = load_examples(["banking"])
    assert Counter(e.category for e in examples) == SEED_COUNTS
    assert len({e.id for e in examples}) == 16
    for e in examples:
        assert 3 <= len(e.keywords) <= 5
        assert all(k in e.output for k in e.keywords), e.id
        if e.category == "理财产品":
            assert WARNING in e.output


def test_eval_set_has_one_question_per_category_plus_one():
    questions = load_examples(["banking-eval"])
    assert len(questions) == 8
    assert set(Counter(q.category for q in questions)) == set(SEED_COUNTS)
    seed_questions = {e.instruction for e in load_examples(["banking"])}
    assert not seed_questions & {q.instruction for q in questions}


def test_user_file_replaces_or_extends(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"instruction": "问", "output": "答", "category": "测试"}, ensure_ascii=False) + "\n")
    assert [e.instruction for e in load_examples([str(path)])] == ["问"]
    both = load_examples(["banking", str(path)])
    assert len(both) == 17 and both[-1].source == f"{path}:1"
    assert dataset_hash(both) != dataset_hash(both[:-1])
    assert dataset_hash(load_examples(["banking"])) == dataset_hash(load_examples(["banking"]))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', "broken.jsonl:2: not valid JSON"),
        ("missing.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "missing.jsonl:3: field 'output' is missing"),
        ("type.jsonl", '{"instruction": 5, "output": "b"}\n', "type.jsonl:1: field 'instruction' must be a string"),
        ("empty.jsonl", '{"instruction": "a", "output": "  "}\n', "empty.jsonl:1: field 'output' is empty"),
        ("kw.jsonl", '{"instruction": "a", "output": "b", "keywords": "x"}\n', "kw.jsonl:1: field 'keywords'"),
        ("array.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "input": "d"}\n]\n', "array.json:3: field 'output' is missing"),
        ("wrapped.json", '{"examples": [\n {"instruction": "a", "output": "b"},\n\n ["not", "an object"]\n]}', "wrapped.json:4: expected an object"),
        ("bad.json", '[{"instruction": "a",\n "output": }]', "bad.json:2: not valid JSON"),
        ("scalar.json", '"just text"', "scalar.json:1: expected a JSON list"),
        ("none.jsonl", "\n\n", "holds no examples"),
    ],
)
def test_bad_data_names_file_line_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        load_examples([str(path)])
    assert expected in str(err.value)
    assert err.value.exit_code == 2


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="does not exist; pass a JSON or JSONL file, or a built-in set"):
        load_examples([str(tmp_path / "nope.json")])
