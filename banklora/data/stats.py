"""Dataset statistics: counts per category, language and split; lengths in Gemma tokens."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from banklora.data.dataset import Example
from banklora.data.format import IGNORE_INDEX, encode_conversation

# ASCII labels for the built-in categories: plots need no CJK font this way.
CATEGORY_EN = {
    "账户管理": "accounts", "存款业务": "deposits", "支付结算": "payments", "贷款业务": "loans",
    "信用卡": "credit cards", "个人征信": "credit reports", "理财产品": "wealth mgmt", "保险业务": "insurance",
    "外汇业务": "foreign exchange", "网银安全": "online security", "反诈骗": "anti-fraud", "小微企业": "small business",
}


@dataclass
class CategoryStats:
    category: str
    count: int
    languages: dict[str, int]
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    answer_tokens: float  # mean tokens under the loss (answers + <end_of_turn>)


@dataclass
class DatasetStats:
    categories: list[CategoryStats]
    lengths: list[int]  # every example's length in tokens
    splits: Counter
    languages: Counter

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile of the token lengths (q in 0..100)."""
        ordered = sorted(self.lengths)
        return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]

    def over(self, max_length: int) -> int:
        return sum(n > max_length for n in self.lengths)


def dataset_stats(examples: list[Example], tokenizer) -> DatasetStats:
    lengths: dict[str, list[int]] = {}
    answers: dict[str, list[int]] = {}
    languages: dict[str, Counter] = {}
    all_lengths = []
    for e in examples:
        enc = encode_conversation(tokenizer, e.conversation())
        lengths.setdefault(e.category, []).append(len(enc))
        answers.setdefault(e.category, []).append(sum(label != IGNORE_INDEX for label in enc.labels))
        languages.setdefault(e.category, Counter())[e.language] += 1
        all_lengths.append(len(enc))
    rows = [
        CategoryStats(c, len(v), dict(languages[c]), min(v), sum(v) / len(v), max(v), sum(answers[c]) / len(answers[c]))
        for c, v in lengths.items()
    ]
    return DatasetStats(rows, all_lengths, Counter(e.split for e in examples), Counter(e.language for e in examples))


def plot_stats(stats: DatasetStats, max_length: int, path) -> None:
    """Length histogram and examples per category, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.hist(stats.lengths, bins=30, color="#3b6ea5")
    left.axvline(max_length, color="#c0392b", linestyle="--", label=f"--max-length {max_length}")
    left.set(title="example length", xlabel="Gemma tokens", ylabel="examples")
    left.legend()
    names = [CATEGORY_EN.get(c.category, c.category) for c in stats.categories]
    right.barh(names, [c.count for c in stats.categories], color="#2e8b57")
    right.invert_yaxis()
    right.set(title="examples per category", xlabel="examples")
    fig.tight_layout()
    from banklora.io import atomic_save_figure

    atomic_save_figure(fig, path, dpi=110)
