"""`banklora sweep`: train every (rank, alpha, learning rate) of a small grid, compare on validation.

Each setting trains into <root>/r{r}-a{alpha}-lr{lr}/ with the same data, seed and schedule, so the
only differences are the swept values. Settings are ranked by their final validation loss (the
mean answer-token loss on the validation split, i.e. log-perplexity of the reference answers);
lower is better. A setting whose adapter already exists with the same settings is not trained
again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

from banklora.config import TrainSettings
from banklora.errors import UsageError
from banklora.io import atomic_write_json, atomic_write_text
from banklora.modeling import is_adapter_dir, read_meta

log = logging.getLogger(__name__)


def parse_values(flag: str, text: str, kind: type) -> list:
    """'4,8,16' -> [4, 8, 16], or a sentence naming the flag."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{flag} takes comma-separated {kind.__name__} values, e.g. {flag} 4,8,16 (got {text!r})") from exc
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


def trial_name(r: int, alpha: int, lr: float) -> str:
    return f"r{r}-a{alpha}-lr{lr:g}"


def grid(base: TrainSettings, ranks: list[int], alphas: list[int], lrs: list[float], root: Path) -> list[TrainSettings]:
    """One TrainSettings per combination, each with its own output directory under root."""
    trials = []
    for r, alpha, lr in itertools.product(ranks, alphas, lrs):
        lora = dataclasses.replace(base.lora, r=r, alpha=alpha)
        trials.append(dataclasses.replace(base, lora=lora, lr=lr, output_dir=str(root / trial_name(r, alpha, lr)), checkpoint_dir=None))
    return trials


def _already_trained(settings: TrainSettings) -> dict | None:
    out = Path(settings.output_dir)
    if not is_adapter_dir(out):
        return None
    meta = read_meta(out)
    wanted = json.loads(json.dumps(settings.to_dict()))
    done = meta.get("training", {})
    same = all(done.get(k) == v for k, v in wanted.items() if k != "lora") and meta.get("lora") == wanted["lora"]
    return meta if same else None


def run_sweep(base: TrainSettings, ranks: list[int], alphas: list[int], lrs: list[float], root: Path, show_progress: bool = True) -> list[dict]:
    """Train each setting of the grid; returns one row per setting, best (lowest validation loss) first."""
    from banklora.train import train

    trials = grid(base, ranks, alphas, lrs, root)
    rows = []
    for i, settings in enumerate(trials, 1):
        name = Path(settings.output_dir).name
        meta = _already_trained(settings)
        if meta is not None:
            log.info("[%d/%d] %s: already trained, reusing %s", i, len(trials), name, settings.output_dir)
        else:
            log.info("[%d/%d] %s: training", i, len(trials), name)
            meta = train(settings, show_progress=show_progress, resume="auto").meta  # an interrupted setting continues
        if not meta.get("validation_loss"):
            raise UsageError(f"sweep: {', '.join(base.data)} has no validation examples (split: validation) to compare the settings on")
        finite = [x for x in meta["loss_per_step"] if x is not None]
        rows.append({
            "name": name, "r": settings.lora.r, "alpha": settings.lora.alpha, "lr": settings.lr,
            "train_loss": finite[-1] if finite else None,
            "validation_loss": meta["validation_loss"][-1]["loss"],
            "best_validation": meta.get("best_validation"),
            "seconds": meta["wall_time_seconds"], "adapter": settings.output_dir,
        })
    rows.sort(key=lambda row: row["validation_loss"])
    rows[0]["best"] = True
    return rows


def write_sweep_report(rows: list[dict], root: Path) -> tuple[Path, Path]:
    """sweep.json and sweep.md in the sweep's directory."""
    json_path, md_path = root / "sweep.json", root / "sweep.md"
    atomic_write_json(json_path, rows)
    lines = ["| | setting | r | alpha | lr | train loss | validation loss | best validation (step) | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        best = row["best_validation"] or {}
        lines.append(f"| {'★' if row.get('best') else ''} | {row['name']} | {row['r']} | {row['alpha']} | {row['lr']:g} | "
                     f"{row['train_loss'] if row['train_loss'] is None else format(row['train_loss'], '.4f')} | {row['validation_loss']:.4f} | {best.get('loss', float('nan')):.4f} ({best.get('step', '-')}) | {row['seconds']:.0f} |")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
