"""What a training run tells people and tools while it runs: a progress bar (or plain lines when
stdout is not a terminal, as in CI logs), metrics.jsonl (one strict JSON record per step and per
validation) and the loss curve."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from banklora.io import append_jsonl, atomic_save_figure, atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
LINE_EVERY_S = 30  # without a terminal: one progress line at most this often


class Progress:
    """A rich progress bar on a terminal; elsewhere a log line every LINE_EVERY_S seconds."""

    def __init__(self, total: int, done: int, enabled: bool, label: str = "train") -> None:
        self.total, self.enabled, self.last_line, self.label = total, enabled, 0.0, label
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.task = self.bar.add_task(label, total=total, completed=done, stats="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, stats: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif self.enabled and (time.monotonic() - self.last_line >= LINE_EVERY_S or step == self.total):
            self.last_line = time.monotonic()
            log.info("%s %d/%d  %s", self.label, step, self.total, stats)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        elif self.enabled:
            log.info("%s", text)


def append(path: Path, record: dict) -> None:
    append_jsonl(path, record)


def rewrite_up_to(path: Path, step: int) -> None:
    """On resume, drop the records of steps after the checkpoint: they will be run again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_loss_curve(losses: list[float | None], validation: list[dict], path: Path, title: str) -> None:
    """Training loss per step and validation loss at its steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), [math.nan if x is None else x for x in losses], label="train", color="#1f6feb")
    if validation:
        ax.plot([v["step"] for v in validation], [math.nan if v["loss"] is None else v["loss"] for v in validation], "o--",
                label="validation", color="#d1242f")
    ax.set(xlabel="step", ylabel="answer-token loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_save_figure(fig, path, dpi=96, bbox_inches="tight")
