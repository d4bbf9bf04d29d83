"""Personal data: found where planted (with checksums), masked on request, no false alarms."""

import json

import pytest

from banklora.data import privacy
from banklora.data.dataset import load_examples
from banklora.data.prepare import prepare
from banklora.errors import UsageError

ID_OK = "11010519491231002X"  # the checksum character of this number is X
ID_BAD = "110105194912310021"  # same digits, wrong checksum
CARD_OK = "6222020200112233446"  # 19 digits, passes Luhn
CARD_BAD = "6222020200112233445"
MOBILE = "13812345678"


def test_checksums():
    assert privacy.valid_id_number(ID_OK) and not privacy.valid_id_number(ID_BAD)
    assert privacy.luhn_ok(CARD_OK) and not privacy.luhn_ok(CARD_BAD)
    assert privacy.luhn_ok("4111111111111111")


def test_find_planted_personal_data():
    text = f"我的身份证{ID_OK}，卡号{CARD_OK}，手机{MOBILE}，邮箱 zhang.san@example.com，另有卡号 4111 1111 1111 1111。"
    kinds = [k for k, _, _ in privacy.find_pii(text)]
    assert kinds == ["id_card", "bank_card", "mobile", "email", "bank_card"]
    masked = privacy.redact(text)
    for value in (ID_OK, CARD_OK, MOBILE, "zhang.san@example.com", "4111 1111 1111 1111"):
        assert value not in masked
    assert masked.count("[银行卡号]") == 2 and "[身份证号]" in masked and "[手机号]" in masked and "[邮箱]" in masked


def test_no_false_alarms_on_ordinary_numbers():
    text = f"贷款50万元，期限20年，{ID_BAD}不是有效证件号，{CARD_BAD}不是有效卡号，订单号 123456789012，电话95588转人工。"
    assert privacy.find_pii(text) == []
    assert privacy.find_pii(f"x{MOBILE}0") == []  # part of a longer number


def test_training_refuses_personal_data_unless_redacted(tmp_path, tokenizer):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"instruction": f"我的手机号{MOBILE}收不到验证码", "output": "请到网点核实身份后更换预留手机号。"}, ensure_ascii=False) + "\n")
    examples = load_examples([str(path)])
    with pytest.raises(UsageError) as err:
        prepare(examples, tokenizer, 512)
    assert f"{path}:1: field 'instruction': mobile 138******78" in str(err.value) and "--redact" in str(err.value)
    prepared = prepare(examples, tokenizer, 512, redact=True)
    assert prepared.pii_redacted == 1
    assert prepared.examples[0].instruction == "我的手机号[手机号]收不到验证码"
    assert MOBILE not in tokenizer.decode(prepared.encoded[0].input_ids)


def test_duplicates_and_over_long_examples_are_dropped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "faq.jsonl"
    records = [{"instruction": "开户要带什么？", "output": "身份证。"}, {"instruction": "开户要带什么？ ", "output": "另一个回答。"},
               {"instruction": "长问题", "output": "很长的回答。" * 200}, {"instruction": "挂失怎么办？", "output": "打客服电话。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    examples = load_examples([str(path)])
    prepared = prepare(examples, tokenizer, 128)
    assert [e.instruction for e in prepared.examples] == ["开户要带什么？", "挂失怎么办？"]
    assert dict(prepared.dropped) == {"duplicate": 1, "over max length": 1}
    assert "dropped 1 duplicate, 1 over max length" in prepared.summary()
    with pytest.raises(UsageError, match=rf"(?s)--strict: .*{path.name}:2: duplicate of .*{path.name}:1"):
        prepare(examples, tokenizer, 128, strict=True)
