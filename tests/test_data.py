"""The built-in dataset and loading user data with errors that name file, line and field."""

import dataclasses
import json
from collections import Counter

import pytest

from banklora.data.dataset import dataset_hash, load_examples
from banklora.errors import UsageError

SEED_COUNTS = {"账户管理": 3, "贷款业务": 3, "理财产品": 2, "信用卡": 2, "网银安全": 2, "外汇业务": 2, "保险业务": 2}
WARNING = "理财非存款，产品有风险，投资须谨慎"


def test_builtin_seed_has_16_pairs_in_7_categories():
    examples = load_examples(["banking-seed"])
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
    seed_questions = {e.instruction for e in load_examples(["banking-seed"])}
    assert not seed_questions & {q.instruction for q in questions}


def test_user_file_replaces_or_extends(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"instruction": "问", "output": "答", "category": "测试"}, ensure_ascii=False) + "\n")
    assert [e.instruction for e in load_examples([str(path)])] == ["问"]
    both = load_examples(["banking-seed", str(path)])
    assert len(both) == 17 and both[-1].source == f"{path}:1"
    assert dataset_hash(both) != dataset_hash(both[:-1])
    assert dataset_hash(load_examples(["banking-seed"])) == dataset_hash(load_examples(["banking-seed"]))


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
        ("faq.csv", "instruction,input,output\n问一,,答一\n问二,背景,\n", "faq.csv:3: field 'output' is empty"),
        ("faq.tsv", "question\toutput\n问\t答\n", "faq.tsv:1: header lacks column(s) ['instruction']"),
        ("wide.csv", "instruction,output\n问,答,多余\n", "wide.csv:2: more fields than the header"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "问"}, {"role": "user", "content": "又问"}]}\n', "chat.jsonl:1: field 'messages[1].role' is 'user'; expected 'assistant'"),
        ("chat2.jsonl", '{"messages": [{"role": "user", "content": "问"}]}\n', "chat2.jsonl:1: field 'messages' must end with an assistant turn"),
        ("chat3.jsonl", '{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}, {"role": "system", "content": "x"}]}\n', "messages[2]': a system message may only come first"),
        ("split.jsonl", '{"instruction": "a", "output": "b", "split": "dev"}\n', "split.jsonl:1: field 'split' must be one of train, validation, test"),
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
    with pytest.raises(UsageError, match="does not exist; pass a JSON, JSONL, CSV or TSV file, a built-in set"):
        load_examples([str(tmp_path / "nope.json")])


def test_a_directory_as_data_is_called_a_directory(tmp_path):
    with pytest.raises(UsageError, match=r"is a directory; pass a JSON, JSONL, CSV or TSV file in it"):
        load_examples([str(tmp_path)])


@pytest.mark.parametrize("suffix, text", [
    (".csv", "instruction,output\n开户要带什么？,带身份证到网点办理。\n"),  # Excel's "CSV UTF-8"
    (".jsonl", '{"instruction": "开户要带什么？", "output": "带身份证到网点办理。"}\n'),
    (".json", '[{"instruction": "开户要带什么？", "output": "带身份证到网点办理。"}]'),
])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix, text):
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (e,) = load_examples([str(path)])
    assert (e.instruction, e.output) == ("开户要带什么？", "带身份证到网点办理。")


def test_records_without_a_language_get_the_language_of_their_text(tmp_path):
    from banklora.data.dataset import detect_language

    path = tmp_path / "mixed.jsonl"
    records = [{"instruction": "How do I reset my card PIN?", "output": "Visit a branch with your ID card."},
               {"instruction": "信用卡逾期会怎样？", "output": "会产生罚息并影响征信。"},
               {"instruction": "手机银行APP怎么转账USD？", "output": "在APP的外汇页面办理。"},
               {"instruction": "Hi", "output": "Hello", "language": "zh"}]  # a given field wins
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    assert [e.language for e in load_examples([str(path)])] == ["en", "zh", "zh", "zh"]
    # the rule agrees with every hand-set label of the built-in sets (360 + 8 records)
    for name in ("banking", "banking-eval"):
        for e in load_examples([name], questions=True):
            assert detect_language(" ".join((e.instruction, e.input, e.output))) == e.language, e.instruction


def test_csv_tsv_and_chat_records_load(tmp_path):
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text('instruction,input,output,category,keywords\n"开户要带什么？",,"带身份证, 到网点办理。",账户管理,身份证|网点\n')
    (e,) = load_examples([str(csv_path)])
    assert (e.instruction, e.output, e.category, e.keywords, e.source) == ("开户要带什么？", "带身份证, 到网点办理。", "账户管理", ("身份证", "网点"), f"{csv_path}:2")
    tsv_path = tmp_path / "faq.tsv"
    tsv_path.write_text("instruction\tinput\toutput\n问\t背景\t答\n")
    assert load_examples([str(tsv_path)])[0].prompt == "问\n\n背景"

    chat = tmp_path / "chat.jsonl"
    messages = [{"role": "system", "content": "你是银行客服。"}, {"role": "user", "content": "问一"},
                {"role": "assistant", "content": "答一"}, {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"}]
    chat.write_text(json.dumps({"messages": messages, "category": "测试"}, ensure_ascii=False) + "\n")
    (c,) = load_examples([str(chat)])
    assert c.conversation() == [{"role": "user", "content": "你是银行客服。\n\n问一"}, {"role": "assistant", "content": "答一"},
                                {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"}]
    assert (c.instruction, c.output, c.category) == ("你是银行客服。\n\n问一", "答二", "测试")


def test_named_datasets_from_the_registry(tmp_path, monkeypatch):
    from banklora.data.dataset import read_registry, register_dataset

    registry = tmp_path / "team" / "banklora_datasets.yaml"
    registry.parent.mkdir()
    monkeypatch.setenv("BANKLORA_REGISTRY", str(registry))
    data = tmp_path / "faq.jsonl"
    data.write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False) + "\n")
    register_dataset("my_faq", data, "team FAQ")
    assert read_registry()["my_faq"]["path"] == str(data.resolve())
    assert "../faq.jsonl" in registry.read_text()  # stored relative, so the team can share the file
    assert [e.instruction for e in load_examples(["banking-seed", "my_faq"])][-1] == "问"
    with pytest.raises(UsageError, match="built-in dataset name"):
        register_dataset("banking", data)
    with pytest.raises(UsageError, match="does not exist"):
        load_examples(["not_registered"])


def test_a_single_data_source_in_yaml_is_one_source_not_its_characters(tmp_path):
    from banklora.config import TrainSettings, load_train_settings

    assert TrainSettings(data="my.jsonl").data == ("my.jsonl",)
    config = tmp_path / "run.yaml"
    config.write_text("data: my_faq.jsonl\n")
    assert load_train_settings(config, {}).data == ("my_faq.jsonl",)
    with pytest.raises(UsageError, match="--data needs at least one source"):
        TrainSettings(data=())


def test_a_valid_copy_of_an_over_long_question_is_kept_not_called_a_duplicate(tokenizer):
    from banklora.data.dataset import Example
    from banklora.data.prepare import prepare

    long = Example(instruction="信用卡怎么提额？", output="很长的回答。" * 200, source="faq.jsonl:1")
    short = Example(instruction="信用卡怎么提额？", output="按时还款、增加用卡，可在手机银行申请临时或固定额度调整。", source="faq.jsonl:2")
    again = dataclasses.replace(short, source="faq.jsonl:3")
    prepared = prepare([long, short, again], tokenizer, max_length=128)
    assert [e.source for e in prepared.examples] == ["faq.jsonl:2"]
    assert dict(prepared.dropped) == {"over max length": 1, "duplicate": 1}
    assert prepared.drops[1] == "faq.jsonl:3: duplicate of faq.jsonl:2"
