"""Dataset statistics: counts per category and lengths in Gemma tokens."""

from __future__ import annotations

from dataclasses import dataclass

from banklora.data.dataset import Example
from banklora.data.format import encode_example


@dataclass
class CategoryStats:
    category: str
    count: int
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    answer_tokens: float  # mean tokens under the loss (answer + <end_of_turn>)


def dataset_stats(examples: list[Example], tokenizer) -> tuple[list[CategoryStats], list[int]]:
    """Per-category statistics (in first-seen order) and every example's length in tokens."""
    lengths: dict[str, list[int]] = {}
    answers: dict[str, list[int]] = {}
    all_lengths = []
    for e in examples:
        enc = encode_example(tokenizer, e.instruction, e.output, e.input)
        lengths.setdefault(e.category, []).append(len(enc))
        answers.setdefault(e.category, []).append(sum(label != -100 for label in enc.labels))
        all_lengths.append(len(enc))
    rows = [
        CategoryStats(c, len(v), min(v), sum(v) / len(v), max(v), sum(answers[c]) / len(answers[c]))
        for c, v in lengths.items()
    ]
    return rows, all_lengths
