"""The curated built-in dataset: size, coverage, record quality, splits without leakage."""

import re
from collections import Counter

import pytest

from banklora.data import privacy
from banklora.data.augment import augment
from banklora.data.dataset import Example, load_examples
from banklora.data.leakage import THRESHOLD, leaks, nearest_training_questions

WARNING = "理财非存款，产品有风险，投资须谨慎"


@pytest.fixture(scope="module")
def banking():
    return load_examples(["banking"])


def test_size_languages_and_categories(banking):
    zh = [e for e in banking if e.language == "zh"]
    en = [e for e in banking if e.language == "en"]
    assert len(zh) >= 300 and len(en) >= 60
    per_category = Counter(e.category for e in banking)
    assert len(per_category) >= 10 and min(per_category.values()) >= 20
    assert set(Counter(e.category for e in en)) == set(per_category)  # English covers every category


def test_seed_pairs_are_included(banking):
    seed = load_examples(["banking-seed"])
    by_id = {e.id: e for e in banking}
    for s in seed:
        assert by_id[s.id].output == s.output and by_id[s.id].split == "train"


def test_records_are_complete_and_careful(banking):
    assert len({e.id for e in banking}) == len(banking)
    for e in banking:
        assert e.id and e.category and e.language in ("zh", "en"), e.id
        assert 3 <= len(e.keywords) <= 6 and all(k in e.output for k in e.keywords), e.id
        assert 80 <= len(e.output) <= 400, e.id
        assert "http" not in e.output and not re.search(r"\d{7,}", e.output), e.id  # no URLs or phone numbers
        if re.search(r"5万美元|50万元|20万元|USD 50,000|RMB 500,000", e.output):
            assert e.as_of, f"{e.id} states a regulatory figure without an as-of date"
        if e.category == "理财产品" and re.search(r"购买|选择|买", e.instruction + e.input):
            assert WARNING in e.output, e.id
        assert not re.search(r"保本保收益|稳赚不赔", e.output.replace("“", "").replace("”", "")) or "不" in e.output, e.id


def test_fixed_splits(banking):
    splits = Counter(e.split for e in banking)
    assert splits["validation"] >= 30 and splits["test"] >= 60
    test_per_category = Counter(e.category for e in banking if e.split == "test")
    assert min(test_per_category.values()) >= 5 and len(test_per_category) == len({e.category for e in banking})


def test_no_held_out_question_is_a_near_copy_of_a_training_question(banking):
    train = [e for e in banking if e.split == "train"]
    held_out = [e for e in banking if e.split != "train"]
    nearest = nearest_training_questions(train, held_out)
    assert leaks(nearest) == []
    assert max(n.overlap for n in nearest) < THRESHOLD


def test_leakage_check_catches_planted_copies(banking):
    train = [e for e in banking if e.split == "train"]
    source = train[5]
    planted = [
        Example(instruction=source.instruction, output="x", split="test"),  # exact copy
        Example(instruction="请问，" + source.instruction + "谢谢", output="x", split="test"),  # wrapped copy
        Example(instruction="卡里突然收到陌生人转来的一笔钱，对方打电话说转错了让我退回，怎么办？", output="x", split="test"),  # reworded
    ]
    found = leaks(nearest_training_questions(train, planted))
    assert len(found) == 3


def test_chinese_after_latin_letters_or_digits_is_read_character_by_character():
    from banklora.data.leakage import containment, grams

    # "10万元..." was one token with the word class that also matched CJK: 0.25, a missed near-copy
    reworded = containment(grams("10万元定期存款提前支取，利息怎么算？"), grams("10万元定期存款提前支取，利息如何计算？"))
    assert reworded == pytest.approx(11 / 14) and reworded >= THRESHOLD
    assert containment(grams("ATM把我的卡吞了怎么办"), grams("ATM把我的卡吞了，该怎么处理")) >= THRESHOLD
    assert ("10", "万", "元") in grams("10万元定期")  # digits, then one token per character
    assert ("atm", "把", "我") in grams("ATM把我的卡")


def test_augmentation_varies_only_training_questions_and_stays_clean(banking):
    augmented = augment(banking, count=2)
    added = augmented[len(banking):]
    assert len(added) >= len([e for e in banking if e.split == "train"])  # at least one variant each
    assert all(e.split == "train" and e.id.endswith(("-aug1", "-aug2")) for e in added)
    assert augment(banking, count=2) == augmented  # deterministic
    by_id = {e.id: e for e in banking}
    for e in added[:50]:
        source = by_id[e.id.rsplit("-aug", 1)[0]]
        assert e.output == source.output and e.instruction != source.instruction
    train = [e for e in augmented if e.split == "train"]
    held_out = [e for e in augmented if e.split != "train"]
    assert leaks(nearest_training_questions(train, held_out)) == []


def test_no_personal_data_alarm_on_the_builtin_set(banking):
    assert privacy.scan(banking) == []


def _raw(name: str) -> list[dict]:
    """A built-in file's records as written (with fields the loaders do not keep, like source)."""
    import json
    from importlib.resources import files

    from banklora.data.dataset import BUILTIN
    from banklora.evaluation.knowledge import BUILTIN as KNOWLEDGE

    path = files("banklora.data").joinpath((BUILTIN | KNOWLEDGE)[name])
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_paraphrase_set_asks_train_questions_in_other_words_without_copying_held_out_ones(banking):
    from banklora.data.leakage import containment, grams

    paraphrases = load_examples(["banking-paraphrase"], questions=True)
    raw = _raw("banking-paraphrase")
    by_id = {e.id: e for e in banking}
    assert len(paraphrases) >= 60 and len({e.category for e in paraphrases}) == 12 and {e.language for e in paraphrases} == {"zh", "en"}
    sources = [by_id[r["source"]] for r in raw]
    assert len({s.id for s in sources}) == len(sources)  # each asks a different train question
    for p, s in zip(paraphrases, sources):
        assert s.split == "train" and p.output == s.output and p.category == s.category and p.keywords == s.keywords, p.id
        assert containment(grams(p.prompt), grams(s.prompt)) < 0.6, p.id  # reworded, not a copy with a word changed
    held_out = [e for e in banking if e.split != "train"]
    assert leaks(nearest_training_questions(held_out, paraphrases)) == []  # no near-copy of a validation/test question


def test_the_knowledge_test_covers_every_category_in_both_parts_and_follows_the_curated_answers(banking):
    from banklora.evaluation.knowledge import load_choices

    choices = load_choices(["banking-mcq"])
    raw = {r["id"]: r for r in _raw("banking-mcq")}
    by_id = {e.id: e for e in banking}
    assert len(choices) >= 120 and {c.language for c in choices} == {"zh", "en"}
    for part in ("taught", "held-out"):
        assert {c.category for c in choices if c.part == part} == {e.category for e in banking}, part
    positions = Counter(c.answer for c in choices)
    assert len(positions) == 4 and max(positions.values()) <= 0.3 * len(choices)  # the right letter gives nothing away
    longest = sum(len(c.options[c.answer]) > max(len(o) for i, o in enumerate(c.options) if i != c.answer) for c in choices)
    assert longest <= 0.3 * len(choices)  # nor does the longest option
    for c in choices:
        source = by_id[raw[c.id]["source"]]
        assert source.category == c.category, c.id
        assert (source.split == "train") == (c.part == "taught"), c.id  # taught: from train answers; held-out: from the others
    train = [e for e in banking if e.split == "train"]
    asked = [Example(instruction=c.question, output="x", split="test") for c in choices]
    assert leaks(nearest_training_questions(train, asked)) == []  # asked in other words, not the train questions
