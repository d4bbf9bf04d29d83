"""Paired statistics for per-question metric deltas (wins, bootstrap interval, Wilcoxon) and for
yes/no outcomes (McNemar's exact test)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TIE = 1e-9
RESAMPLES = 10_000


@dataclass
class PairedStats:
    mean_delta: float  # mean of (b - a); for lower-is-better metrics still b - a
    ci_low: float  # 95% percentile-bootstrap interval of the mean delta
    ci_high: float
    p_value: float  # Wilcoxon signed-rank, two-sided (1.0 when every delta is zero)
    wins: int  # questions where b is better than a
    ties: int
    losses: int
    significant: bool  # the interval excludes zero and p < 0.05
    verdict: str  # the finding in words

    def to_dict(self) -> dict:
        # p-values keep their magnitude (1e-11 is not 0); the rest are rounded for reading
        return {k: (round(v, 6) if isinstance(v, float) and k != "p_value" else v) for k, v in asdict(self).items()}


def bootstrap_ci(deltas, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; seeded, so a report is reproducible."""
    d = np.asarray(deltas, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired(a, b, higher_is_better: bool = True, metric: str = "score") -> PairedStats:
    """Compare b against a on the same questions."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    deltas = b - a
    better = deltas if higher_is_better else -deltas
    wins, losses = int((better > TIE).sum()), int((better < -TIE).sum())
    low, high = bootstrap_ci(deltas)
    p = 1.0 if np.all(np.abs(deltas) <= TIE) else float(wilcoxon(deltas, zero_method="zsplit").pvalue)
    # Both must agree: the interval excludes zero and the paired test rejects "no difference".
    # With few questions the percentile bootstrap alone is too eager.
    significant = (low > 0 or high < 0) and p < 0.05
    direction = (deltas.mean() > 0) == higher_is_better
    if significant:
        verdict = f"{metric}: significantly {'better' if direction else 'worse'} (95% CI {low:+.3f} to {high:+.3f}, p={p:.3g})"
    elif low <= 0 <= high:
        verdict = f"{metric}: not significant: the 95% CI {low:+.3f} to {high:+.3f} includes zero"
    else:
        verdict = f"{metric}: not significant: the paired test gives p={p:.3g} (95% CI {low:+.3f} to {high:+.3f})"
    return PairedStats(float(deltas.mean()), low, high, p, wins, len(deltas) - wins - losses, losses, significant, verdict)


def mcnemar(a_correct, b_correct, metric: str = "accuracy", higher_is_better: bool = True) -> dict:
    """A yes/no outcome of b against a on the same questions (a knowledge question answered right,
    an answer that ended, an answer that loops): McNemar's exact (binomial) test on the discordant
    questions, and a bootstrap interval of the delta in rates. b_only counts the questions where
    only b has the outcome; `higher_is_better` False for an outcome to avoid."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    b_only, a_only = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
    p = 1.0 if b_only + a_only == 0 else float(binomtest(b_only, b_only + a_only, 0.5).pvalue)
    low, high = bootstrap_ci(b - a)
    delta = float((b - a).mean())
    significant = (low > 0 or high < 0) and p < 0.05
    if significant:
        better = (delta > 0) == higher_is_better
        verdict = f"{metric}: significantly {'better' if better else 'worse'} ({delta:+.3f}, 95% CI {low:+.3f} to {high:+.3f}, McNemar p={p:.3g})"
    else:
        verdict = f"{metric}: not significant ({delta:+.3f}, 95% CI {low:+.3f} to {high:+.3f}, McNemar p={p:.3g})"
    return {"a_rate": round(float(a.mean()), 6), "b_rate": round(float(b.mean()), 6),
            "mean_delta": round(delta, 6), "ci_low": round(low, 6), "ci_high": round(high, 6), "p_value": p,
            "b_only": b_only, "a_only": a_only, "n": len(a), "significant": significant, "verdict": verdict}
