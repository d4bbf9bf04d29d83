"""Answer metrics: pure functions of an answer's text, documented in the README.

keyword match   share of the question's expected keywords found in the answer (substring,
                case-insensitive): does the answer use the terms a correct answer needs?
                Verbatim copies of the question are removed from the answer first, so a model
                that echoes the question earns nothing for the keywords the question contains.
completeness    mean of four checks, each in [0, 1]:
                  length     min(1, non-space characters / 80): a substantive answer
                  finished   1 if the model ended its turn before the token budget, else 0
                  structure  1 for >= 2 list items or >= 3 sentences, 0.5 for 2 sentences, else 0
                  variety    distinct share of character 4-grams: 1 = no repetition loops
overall         0.6 x keyword match + 0.4 x completeness
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def matched_keywords(answer: str, keywords: list[str] | tuple[str, ...], question: str = "") -> list[str]:
    text = without_echo(answer, question).lower() if question else answer.lower()
    return [k for k in keywords if k.lower() in text]


def keyword_match(answer: str, keywords: list[str] | tuple[str, ...], question: str = "") -> float:
    """Share of keywords present in the answer (echoes of `question` removed); 0.0 without keywords."""
    if not keywords:
        return 0.0
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


def overall(keyword: float, complete: float) -> float:
    return KEYWORD_WEIGHT * keyword + (1 - KEYWORD_WEIGHT) * complete
