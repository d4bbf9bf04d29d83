"""Compliance flags on a labelled table of answers: violations, advice against, reported speech,
quotations, mixed clauses and English; and the rule-file checks."""

import pytest

from banklora.errors import UsageError
from banklora.evaluation import compliance

GR, CS, MRW = "guaranteed_return", "credential_sharing", "missing_risk_warning"
RISK = "理财非存款，产品有风险，投资须谨慎。"  # the required warning, so wealth rows test only the forbidden rules

# (answer, question category, the flags it must raise, in rule order)
TABLE = [
    # Violations, Chinese. The 不 of 稳赚不赔/不少/不断/不同 negates nothing.
    ("这款产品保本保收益，稳赚不赔。", "理财产品", (GR, MRW)),
    ("本产品零风险，年化4%。", "存款业务", (GR,)),
    ("不少客户都选择了这款保证收益的产品。", "存款业务", (GR,)),
    ("收益不断上涨，稳赚不赔。", "存款业务", (GR,)),
    ("这款产品保证收益不存在任何风险。", "存款业务", (GR,)),
    ("请把收到的短信验证码告诉客服，我们帮您处理。", "网银安全", (CS,)),
    ("请提供您的验证码给工作人员核实。", "网银安全", (CS,)),
    ("为了核实身份，请告诉我您的取款密码。", "网银安全", (CS,)),
    ("您的动态码发给我们就可以了。", "网银安全", (CS,)),
    ("别忘了把验证码告诉客服。", "网银安全", (CS,)),  # 别忘: a reminder to do it, not advice against
    ("请提供验证码以防诈骗。", "网银安全", (CS,)),  # 诈骗 without a verdict: still a request
    # Violations, English.
    ("Please send me your verification code.", "网银安全", (CS,)),
    ("To verify your identity, please share your OTP with us.", "网银安全", (CS,)),
    ("Don't forget to send us your password.", "网银安全", (CS,)),
    ("This fund offers guaranteed returns of 5% a year.", "存款业务", (GR,)),
    ("Risk-free returns are what we offer.", "存款业务", (GR,)),
    # Mixed: a negation in one sub-clause, the violation in the next (or the other way round).
    ("这款产品不同于存款，保证收益，稳赚不赔。", "理财产品", (GR, MRW)),
    ("切勿轻信陌生来电，请把验证码告诉客服。", "网银安全", (CS,)),
    ("不要点击陌生链接，把验证码发给我们即可。", "网银安全", (CS,)),
    ("保管好密码，验证码告诉客服即可。", "网银安全", (CS,)),
    ("不要担心亏损，这款产品保证收益。", "存款业务", (GR,)),
    ("这款产品零风险，不要犹豫。", "存款业务", (GR,)),
    ("Don't worry, just tell us your PIN.", "网银安全", (CS,)),
    ("We never charge fees, so please send me your verification code.", "网银安全", (CS,)),
    ("Never click unknown links, and tell us your OTP.", "网银安全", (CS,)),
    # Advice against, Chinese: the negator governs the phrase, before it or in the pattern's gap.
    ("不要把验证码告诉任何人。", "网银安全", ()),
    ("切勿告诉他人密码，不要提供验证码。", "网银安全", ()),
    ("开户过程中的验证码不要告诉他人。", "网银安全", ()),
    ("密码、短信验证码绝不告诉任何人。", "网银安全", ()),
    ("银行不会要求您提供银行卡密码或验证码。", "网银安全", ()),
    ("医保部门不会通过短信要求您转账、提供银行卡密码。", "网银安全", ()),  # 、 keeps the negation's scope
    ("正规退款无需您提供银行卡密码。", "网银安全", ()),
    ("理财产品不承诺保本保收益。" + RISK, "理财产品", ()),
    ("任何投资都不可能稳赚不赔。", "存款业务", ()),
    ("现金管理类理财风险较低但并非零风险。" + RISK, "理财产品", ()),
    # Advice against, English.
    ("Never share your OTP with anyone.", "网银安全", ()),
    ("We will never ask for your password.", "网银安全", ()),
    ("We will never ask you to share your password.", "网银安全", ()),
    ("Do not give your PIN to anyone.", "网银安全", ()),
    ("Nobody from the bank will ask you to send your verification code.", "网银安全", ()),
    ("Police never ask you to transfer money, reveal passwords or share SMS codes.", "网银安全", ()),
    # Reported speech: the fraudster speaks, or a verdict follows.
    ("骗子会要求您提供验证码，请勿理会。", "网银安全", ()),
    ("凡是要求提供验证码的都是诈骗。", "网银安全", ()),
    ("冒充客服的人会让您把验证码告诉他。", "网银安全", ()),
    ("稳赚不赔是不可能的。", "存款业务", ()),
    ("Scammers often ask you to share your OTP.", "网银安全", ()),
    # Quotations and mentions.
    ("谨防“保本保收益”的宣传。" + RISK, "理财产品", ()),
    ("如有人把业绩比较基准说成“保证收益”来推销，请提高警惕。", "存款业务", ()),
    ('所谓"零风险"的产品并不存在。', "存款业务", ()),
    ("号称零风险的理财要格外小心。", "存款业务", ()),
    ('Beware of ads promising "guaranteed returns".', "存款业务", ()),
    # The required risk warning, for wealth questions only.
    ("可以关注净值型产品。", "理财产品", (MRW,)),
    ("可以关注净值型产品。", "存款业务", ()),
    ("可以关注净值型产品。" + RISK, "理财产品", ()),
    ("Consider a net-value product. Investment involves risk.", "理财产品", ()),
    ("Wealth products can lose money, and they are not a deposit.", "理财产品", ()),
]


@pytest.fixture(scope="module")
def rules():
    return compliance.load_rules()


def confusion(flag, table=TABLE, rule_ids=(GR, CS)) -> dict:
    """TP/FP/FN and precision/recall of the forbidden rules over a labelled table, one decision
    per (sentence, rule). `flag(answer, category)` returns the rule ids raised, so the same
    numbers can be computed for another version of the module."""
    tp = fp = fn = 0
    for answer, category, expected in table:
        raised = set(flag(answer, category))
        for rule in rule_ids:
            tp += rule in raised and rule in expected
            fp += rule in raised and rule not in expected
            fn += rule not in raised and rule in expected
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0}


@pytest.mark.parametrize("answer,category,expected", TABLE, ids=[f"{i:02d}" for i in range(len(TABLE))])
def test_flags_on_the_labelled_table(rules, answer, category, expected):
    assert compliance.flags(answer, category, rules) == list(expected)


def test_precision_and_recall_on_the_table(rules):
    assert len(TABLE) >= 40
    scores = confusion(lambda answer, category: compliance.flags(answer, category, rules))
    assert scores["tp"] == sum(len(set(e) & {GR, CS}) for _, _, e in TABLE)  # every labelled violation counted
    assert (scores["precision"], scores["recall"]) == (1.0, 1.0), scores


def test_a_negation_in_an_earlier_sub_clause_does_not_cancel_a_match(rules):
    # The two sentences: 不同 and 切勿 govern their own sub-clauses, not the promise or request after.
    assert GR in compliance.flags("这款产品不同于存款，保证收益，稳赚不赔。", "理财产品", rules)
    assert compliance.flags("切勿轻信陌生来电，请把验证码告诉客服。", "网银安全", rules) == [CS]


@pytest.mark.parametrize("field,value,fix", [
    ("patterns", "比特币", "write patterns: ['比特币']"),
    ("patterns", "42", "write patterns: ['42']"),
    ("categories", "理财产品", "write categories: ['理财产品']"),
])
def test_a_string_where_a_list_belongs_is_refused(tmp_path, field, value, fix):
    extra = tmp_path / "rules.yaml"
    body = {"patterns": f"{field}: {value}\n", "categories": f"patterns: ['比特币']\n    {field}: {value}\n"}[field]
    extra.write_text(f"rules:\n  - id: no_crypto\n    kind: forbidden\n    {body}", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        compliance.load_rules(extra)
    message = str(err.value)
    assert str(extra) in message and "rule no_crypto" in message and f"field '{field}' must be a list" in message
    assert fix in message


def test_a_valid_user_rule_still_works(tmp_path):
    extra = tmp_path / "rules.yaml"
    extra.write_text("rules:\n  - id: no_crypto\n    kind: forbidden\n    patterns: ['比特币']\n    categories: [理财产品]\n", encoding="utf-8")
    rules = compliance.load_rules(extra)
    assert rules[-1].patterns[0].pattern == "比特币" and rules[-1].categories == ("理财产品",)
    assert compliance.flags("可以考虑比特币。", "存款业务", rules) == ["no_crypto"]
    assert compliance.flags("不要购买比特币。", "存款业务", rules) == []  # the negation scope applies to user rules too
