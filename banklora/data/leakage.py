"""Leakage check: held-out questions must not be near-copies of training questions.

Each question (instruction + input) is case folded and cut into tokens, a Chinese character or
a run of Latin letters and digits each (punctuation and spaces dropped), then into token 3-grams:
character 3-grams for Chinese, word 3-grams for English. A held-out question's overlap with a
training question is the share of its 3-grams that the training question also has (containment,
0..1); a pair at or above THRESHOLD (0.35) counts as a leak. Measured: an exact copy scores 1.0,
a wrapped copy (请问，…谢谢) 0.88, one with a reworded ending 0.83, "10万元…利息怎么算？" against
"10万元…利息如何计算？" 0.79, a paraphrase in other words ("卡里突然收到一笔陌生人转来的钱…" asked
as "我的账户莫名收到一笔陌生人的钱…") 0.39, while the built-in held-out questions stay at or under
0.25 (mean 0.08).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from banklora.data.dataset import Example

N = 3
THRESHOLD = 0.35
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: extension A, unified, compatibility
# A CJK character, or a run of letters and digits that are not CJK: "10万元" is "10", "万", "元".
# (With CJK inside the word class, Chinese after a Latin letter or digit became one long token.)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


def grams(text: str, n: int = N) -> set[tuple[str, ...]]:
    tokens = _TOKEN.findall(text.casefold())
    return {tuple(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))} if tokens else set()


def containment(held_out: set, train: set) -> float:
    return len(held_out & train) / len(held_out) if held_out else 0.0


@dataclass
class Nearest:
    held_out: Example
    train: Example | None
    overlap: float


def nearest_training_questions(train: list[Example], held_out: list[Example]) -> list[Nearest]:
    """For each held-out example, its most similar training question and their overlap."""
    train_grams = [(e, grams(e.prompt)) for e in train]
    result = []
    for h in held_out:
        g = grams(h.prompt)
        best = max(((containment(g, tg), e) for e, tg in train_grams), key=lambda x: x[0], default=(0.0, None))
        result.append(Nearest(h, best[1], best[0]))
    return result


def leaks(nearest: list[Nearest], threshold: float = THRESHOLD) -> list[Nearest]:
    return [n for n in nearest if n.overlap >= threshold]
