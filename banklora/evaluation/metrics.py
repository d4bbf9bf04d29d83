"""Answer metrics: pure functions of an answer's text, documented in docs/compare.md.

keyword match   share of the question's expected keywords found in the answer (substring,
                case-insensitive): does the answer use the terms a correct answer needs?
                Verbatim copies of the question are removed from the answer first, so a model
                that echoes the question earns nothing for the keywords the question contains.
                None (not measured) for a question without keywords.
completeness    mean of four checks, each in [0, 1]:
                  length     min(1, non-space characters / 80): a substantive answer
                  finished   1 if the model ended its turn before the token budget, else 0
                  structure  1 for >= 2 list items or >= 3 sentences, 0.5 for 2 sentences, else 0
                  variety    distinct share of character 4-grams: 1 = no repetition loops
overall         0.6 x keyword match + 0.4 x completeness; completeness alone without keywords
rouge_l         ROUGE-L F1 against the reference answer, on jieba-segmented words (Chinese) or
                words (English), punctuation and spaces dropped
bleu4           sentence BLEU-4 against the reference with sacrebleu's Chinese tokenizer ("zh";
                "13a" for English), exponential smoothing, scaled to 0..1
loops           the answer is a degenerate repetition loop (see `loops`); compare reports its share
                beside `ends`, the share of answers that ended before the token budget
Keywords match through a small synonym table (keyword_synonyms.yaml: 年化利率 matches 年利率).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

MIN_CHARS = 80  # non-space characters for full length credit; the seed answers have ~180
KEYWORD_WEIGHT = 0.6
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.、)）]|[一二三四五六七八九十]+[、.]|[-*•·]|[①②③④⑤⑥⑦⑧⑨⑩])\s*\S", re.MULTILINE)
_SENTENCE_END = re.compile(r"[。！？!?；;]|\.(?:\s|$)")


@dataclass(frozen=True)
class Completeness:
    length: float
    finished: float
    structure: float
    variety: float

    @property
    def score(self) -> float:
        return (self.length + self.finished + self.structure + self.variety) / 4


def without_echo(answer: str, question: str) -> str:
    """The answer with every verbatim copy of the question (or of its lines) taken out."""
    for part in sorted({question.strip(), *question.splitlines()}, key=len, reverse=True):
        if len(part.strip()) >= 4:
            answer = answer.replace(part.strip(), " ")
    return answer


@lru_cache(maxsize=1)
def synonyms() -> dict[str, tuple[str, ...]]:
    """keyword -> its accepted alternatives, from keyword_synonyms.yaml (groups of equivalents)."""
    import yaml

    groups = yaml.safe_load(files("banklora.evaluation").joinpath("keyword_synonyms.yaml").read_text(encoding="utf-8"))
    table: dict[str, tuple[str, ...]] = {}
    for group in groups["groups"]:
        for word in group:
            table[word.lower()] = tuple(w.lower() for w in group)
    return table


def matched_keywords(answer: str, keywords: list[str] | tuple[str, ...], question: str = "") -> list[str]:
    text = without_echo(answer, question).lower() if question else answer.lower()
    table = synonyms()
    return [k for k in keywords if any(alt in text for alt in table.get(k.lower(), (k.lower(),)))]


def keyword_match(answer: str, keywords: list[str] | tuple[str, ...], question: str = "") -> float | None:
    """Share of keywords present in the answer (echoes of `question` removed); None (not
    measured) without keywords: 0.0 would count a question nobody gave keywords as a miss."""
    if not keywords:
        return None
    return len(matched_keywords(answer, keywords, question)) / len(keywords)


def completeness(answer: str, finished: bool) -> Completeness:
    chars = len(re.sub(r"\s", "", answer))
    items = len(_LIST_ITEM.findall(answer))
    sentences = len(_SENTENCE_END.findall(answer))
    structure = 1.0 if items >= 2 or sentences >= 3 else 0.5 if sentences == 2 else 0.0
    grams = [answer[i : i + 4] for i in range(len(answer) - 3)]
    variety = len(set(grams)) / len(grams) if grams else 0.0
    return Completeness(
        length=min(1.0, chars / MIN_CHARS),
        finished=1.0 if finished and chars > 0 else 0.0,
        structure=structure,
        variety=variety,
    )


# loops() reads an answer as units: one per CJK character or English word (a run of ASCII letters or
# digits), punctuation and spacing dropped, list markers (1. 2、 (3) ④ 五、) taken out so that
# "1. X 2. X" reads as X X. Both thresholds sit above the longest repeats in the 368 curated
# reference answers (none of which loops, tested) and at or below the shortest loops seen.
LOOP_BACK_TO_BACK = 8  # units repeated right after a span's first copy: 提前还款 three times repeats 8;
#                        the references repeat at most 5 (由被保险人或投保人指定，投保人指定须经...)
LOOP_ANYWHERE = 18  # units of a span that occurs twice anywhere: the list loop seen repeats 23; the
#                     references at most 10 (Chinese) and 4 (English: the bank's official), the
#                     compliance phrase 理财非存款，产品有风险，投资须谨慎 has 15
_LOOP_UNIT = re.compile(r"[a-z0-9]+|[^\W_]")
_LIST_MARKER = re.compile(r"(?<![\w.])(?:\d{1,2}[.、)）](?!\d)|[(（]\d{1,2}[)）]|[一二三四五六七八九十]{1,2}、)|[①-⑳]")


def loops(answer: str) -> bool:
    """True when the answer is a degenerate repetition loop. Read as units (each CJK character and
    each English word one unit; punctuation, spacing and list markers dropped), either some span is
    repeated back to back with at least LOOP_BACK_TO_BACK units after its first copy (具体利率以合同为准
    over and over, 提前还款 three times, an answer restarting itself, a loop the token budget cut
    mid-copy), or a span of at least LOOP_ANYWHERE units occurs twice anywhere (the same list item
    twice). Legitimate answers repeat words and short phrases (信用卡, the bank, 登录手机银行 in
    several list items), not spans this long."""
    units = _LOOP_UNIT.findall(_LIST_MARKER.sub(" ", answer.lower()))
    for shift in range(1, len(units)):
        run = 0  # units matching their copy `shift` units later, ending here
        for a, b in zip(units, units[shift:]):
            run = run + 1 if a == b else 0
            if run >= LOOP_ANYWHERE or (run >= shift and run >= LOOP_BACK_TO_BACK):
                return True  # run >= shift: the span's copy starts right where the span ends
    return False


def overall(keyword: float | None, complete: float) -> float:
    if keyword is None:
        return complete
    return KEYWORD_WEIGHT * keyword + (1 - KEYWORD_WEIGHT) * complete


def _words(text: str) -> list[str]:
    import jieba

    return [w for w in jieba.lcut(text.lower()) if re.search(r"\w", w)]


class _JiebaTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return _words(text)


@lru_cache(maxsize=1)
def _rouge():
    import logging

    import jieba
    from rouge_score import rouge_scorer

    jieba.setLogLevel(logging.WARNING)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_JiebaTokenizer())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of the answer against the reference, on words (0..1)."""
    if not answer.strip() or not reference.strip():
        return 0.0
    return _rouge().score(reference, answer)["rougeL"].fmeasure


def bleu4(answer: str, reference: str, language: str = "zh") -> float:
    """Sentence BLEU-4 (sacrebleu, smoothed) of the answer against the reference (0..1)."""
    import sacrebleu

    if not answer.strip() or not reference.strip():
        return 0.0
    tokenize = "zh" if language == "zh" else "13a"
    return sacrebleu.sentence_bleu(answer, [reference], tokenize=tokenize).score / 100
