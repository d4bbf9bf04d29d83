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


GOOD_START = ("您好，信用卡逾期会产生以下影响：\n1. 需按合同支付逾期利息和违约金。\n2. 逾期记录会报送征信系统，影响今后的贷款和信用卡审批。"
              "\n3. 建议尽快还清欠款，如确有困难可主动与银行协商分期还款。")
# (answer, loops): real loops (Chinese and English, cut at the token budget mid-copy) and
# legitimate answers that repeat words, list structure or a phrase
LOOP_TABLE = [
    ("具体利率以合同为准。" * 16, True),  # one sentence to the budget
    ("您好，提前还款的方式有：提前还款、提前还款、提前还款、提前还款", True),
    ("您好，外汇兑换一般需提前办理预约，携带本人身份证到网点。您好，外汇兑换一般需提前办理预约，携带本人身份证到网点。您好，外汇兑换一般需", True),  # restarts itself
    ("您好，可以通过以下方式查询：\n1. 通过官方手机银行官方客服热线或官方客服热线查询\n2. 通过官方手机银行官方客服热线或官方客服热线查询", True),
    ("1. 登录手机银行查询余额 2. 登录手机银行查询余额 3. 登录手机银行查询余额 4. 登录手机银行查询余额", True),  # numbered copies
    ("您好，建议：\n1. 通过官方手机银行查询账户余额和交易明细，如有异常及时联系客服。\n2. 前往柜台办理。\n3. 通过官方手机银行查询账户余额和交易明细，"
     "如有异常及时联系客服。", True),  # one item twice, apart
    (GOOD_START + "如有疑问请联系客服热线。如有疑问请联系客服热线。如有疑问请联", True),  # starts late, cut mid-copy
    ("您好，" * 30, True),
    ("您可以拨打官方客服热线或官方客服热线或官方客服热线或官方客服热线", True),
    ("提前支取提前支取提前支取", True),  # three copies of a 4-character word: exactly LOOP_BACK_TO_BACK repeated
    ("Please contact your bank for details. " * 6, True),
    ("You can apply for a credit card online or at a branch with your ID card. You can apply for a credit card online or at "
     "a branch with your ID card. You can apply for", True),
    ("To report a lost card, call the hotline at once. After that, the bank will review the application, the bank will review "
     "the application, the bank will rev", True),  # starts late, cut mid-copy
    ("1. Log in to the mobile banking app and open the card page to report the loss. 2. Log in to the mobile banking app and "
     "open the card page to report the loss.", True),
    ("您好，挂失银行卡可以通过以下方式：\n1. 登录手机银行，在“卡片管理”中选择挂失。\n2. 登录网上银行，在“卡片管理”中选择挂失。"
     "\n3. 拨打客服热线，按语音提示办理挂失。\n4. 前往柜台，携带本人身份证办理挂失和补卡。", False),  # 12 units shared by two items
    ("您好，开户所需材料如下：\n1. 个人账户：携带本人有效身份证件到网点办理，并设置交易密码。\n2. 对公账户：携带营业执照、法定代表人有效身份证件"
     "和公章到网点办理。\n3. 代理开户：携带代理人和被代理人的有效身份证件及授权委托书到网点办理。\n4. 开户后请妥善保管银行卡和密码，"
     "切勿出租出借账户。\n5. 如需开通手机银行，可在网点一并办理。\n6. 具体所需材料以银行最新规定为准。", False),  # long list
    ("信用卡额度可以在信用卡APP里申请提升。信用卡按时还款、用卡记录良好，有助于信用卡提额。", False),  # a keyword four times
    ("您好，理财产品的收益不确定，过往业绩不代表未来表现，请根据自身风险承受能力选择。理财非存款，产品有风险，投资须谨慎。", False),
    ("您好，两款产品说明如下：\n1. 稳健型理财：收益相对平稳，但不保本。理财非存款，产品有风险，投资须谨慎。\n2. 进取型理财：波动较大，"
     "可能亏损本金。理财非存款，产品有风险，投资须谨慎。", False),  # the risk warning once per product: 15 units twice
    ("您好，身故受益人由被保险人或投保人指定，投保人指定须经被保险人同意；可指定一人或多人，并约定受益顺序和份额。", False),  # 5 back to back
    ("您好，整存整取利率参考：1年期1.50%；2年期1.80%；3年期2.00%；5年期2.20%。存期可选1年、2年、3年、5年，具体以银行公告为准。", False),
    ("Contact the bank at once. The bank will freeze the card, and the bank's hotline can issue a new one. Keep the bank's "
     "SMS records and ask the bank for a written confirmation.", False),  # "the bank" five times
    ("Usually: 1. the business licence; 2. the legal representative's ID; 3. if the legal representative cannot come, an "
     "authorization letter signed by the legal representative and the agent's ID; 4. the company seal.", False),
    ("It is very, very important never to share your SMS code with anyone, not even someone who says they are from the bank.", False),
    ("可以。", False),
    ("Yes.", False),
    ("", False),
]


@pytest.mark.parametrize("answer, expected", LOOP_TABLE, ids=[f"{i}-{'loop' if e else 'ok'}" for i, (_, e) in enumerate(LOOP_TABLE)])
def test_loops_on_the_labelled_table(answer, expected):
    assert metrics.loops(answer) is expected


def test_the_loop_table_is_balanced():
    def english(text):
        return text.isascii()

    for label in (True, False):
        rows = [a for a, e in LOOP_TABLE if e is label]
        assert len(rows) >= 10 and sum(english(a) for a in rows) >= 4 and sum(not english(a) for a in rows) >= 4


def test_no_curated_reference_answer_loops():
    """The thresholds sit above every repeat in the curated answers: a flag there is a false alarm."""
    from banklora.data.dataset import load_examples

    answers = {e.output for e in load_examples(["banking", "banking-eval", "banking-paraphrase"]) if e.output}
    assert len(answers) > 300 and [a[:40] for a in answers if metrics.loops(a)] == []
