"""Before/after comparison: base model and fine-tuned model answer the same questions.

One model is loaded: the adapter is switched off for the base answers (PEFT's
disable_adapter), so both answer with identical weights apart from the LoRA update, the same
prompts, greedy decoding and the same token budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from banklora.config import GenerationSettings
from banklora.data.dataset import Example, load_examples
from banklora.data.format import encode_prompt
from banklora.evaluation import metrics
from banklora.generate import Generation, generate_batch
from banklora.modeling import Loaded, atomic_write_text, is_adapter_dir, load
from banklora.errors import UsageError

TIE = 1e-6  # score differences below this count as equal


@dataclass
class Scored:
    answer: str
    keyword_match: float
    matched_keywords: list[str]
    completeness: float
    completeness_parts: dict
    overall: float
    response_seconds: float
    first_token_seconds: float
    tokens: int
    tokens_per_second: float
    finished: bool


def score(example: Example, gen: Generation) -> Scored:
    complete = metrics.completeness(gen.text, gen.finished)
    keyword = metrics.keyword_match(gen.text, example.keywords, example.prompt)
    return Scored(
        answer=gen.text,
        keyword_match=keyword,
        matched_keywords=metrics.matched_keywords(gen.text, example.keywords, example.prompt),
        completeness=complete.score,
        completeness_parts=asdict(complete),
        overall=metrics.overall(keyword, complete.score),
        response_seconds=round(gen.seconds, 3),
        first_token_seconds=round(gen.first_token_seconds, 3),
        tokens=gen.new_tokens,
        tokens_per_second=round(gen.tokens_per_second, 2),
        finished=gen.finished,
    )


def summarize(rows: list[dict]) -> dict:
    """Averages per model, mean improvement, and improved / worse / equal counts (overall score)."""
    def mean(values):
        return sum(values) / len(values) if values else 0.0

    summary = {"questions": len(rows)}
    for model in ("base", "tuned"):
        for key in ("keyword_match", "completeness", "overall", "response_seconds", "tokens_per_second"):
            summary[f"{model}_{key}"] = round(mean([r[model][key] for r in rows]), 4)
    deltas = [r["tuned"]["overall"] - r["base"]["overall"] for r in rows]
    summary["mean_overall_improvement"] = round(mean(deltas), 4)
    summary["mean_keyword_improvement"] = round(summary["tuned_keyword_match"] - summary["base_keyword_match"], 4)
    summary["improved"] = sum(d > TIE for d in deltas)
    summary["worse"] = sum(d < -TIE for d in deltas)
    summary["equal"] = len(deltas) - summary["improved"] - summary["worse"]
    return summary


def run_compare(
    peft_model_path: str,
    *,
    questions: list[str] = ("banking-eval",),
    split: str | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    base_model: str | None = None,
    loaded: Loaded | None = None,
) -> dict:
    """Answer every question with the base and the fine-tuned model; return the report."""
    settings = settings or GenerationSettings(max_new_tokens=160)
    if loaded is None:
        if not Path(peft_model_path).exists():
            raise UsageError(f"--peft-model-path {peft_model_path} does not exist; train an adapter first (banklora train --output-dir {peft_model_path})")
        if not is_adapter_dir(peft_model_path):
            raise UsageError(f"--peft-model-path {peft_model_path} is not a LoRA adapter directory (no adapter_config.json)")
        loaded = load(peft_model_path, base_model=base_model)
    examples = load_examples(list(questions), split=split)[:limit]
    if not examples:
        raise UsageError(f"no questions in {', '.join(questions)}" + (f" with split {split}" if split else ""))
    prompts = [encode_prompt(loaded.tokenizer, e.instruction, e.input) for e in examples]
    model = loaded.model
    with model.disable_adapter():
        base_gens = generate_batch(model, loaded.tokenizer, prompts, settings, batch_size)
    tuned_gens = generate_batch(model, loaded.tokenizer, prompts, settings, batch_size)
    rows = []
    for example, b, t in zip(examples, base_gens, tuned_gens):
        base, tuned = score(example, b), score(example, t)
        rows.append({
            "id": example.id,
            "category": example.category,
            "question": example.prompt,
            "keywords": list(example.keywords),
            "reference": example.output,
            "base": asdict(base),
            "tuned": asdict(tuned),
            "delta_overall": round(tuned.overall - base.overall, 4),
            "delta_keyword_match": round(tuned.keyword_match - base.keyword_match, 4),
        })
    return {
        "format": "banklora-compare/1",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(loaded.adapter_path),
        "base_model": {"name": loaded.base.name, "sha256": loaded.base.sha256},
        "questions_source": list(questions),
        "split": split,
        "generation": asdict(settings) | {"greedy": settings.temperature == 0, "batch_size": batch_size},
        "device": str(loaded.device),
        "metrics": {"overall": "0.6 x keyword_match + 0.4 x completeness", "completeness": "mean of length, finished, structure, variety"},
        "summary": summarize(rows),
        "results": rows,
    }


def write_report(report: dict, path: Path) -> Path:
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False))
    return path


def print_report(report: dict, console, show_answers: bool = True, width: int = 160) -> None:
    """The readable table in the terminal, then the summary."""
    from rich.table import Table

    table = Table(title="base vs fine-tuned (greedy, same prompts and token budget)")
    for col in ("#", "category", "question", "keywords b→t", "overall b→t", "Δ", "time b/t s", "tok/s b/t"):
        table.add_column(col, justify="right" if col not in ("category", "question") else "left")
    for i, r in enumerate(report["results"], 1):
        b, t = r["base"], r["tuned"]
        delta = r["delta_overall"]
        style = "green" if delta > TIE else "red" if delta < -TIE else ""
        table.add_row(
            str(i), r["category"], _clip(r["question"], 22),
            f"{b['keyword_match']:.2f}→{t['keyword_match']:.2f}",
            f"{b['overall']:.2f}→{t['overall']:.2f}",
            f"[{style}]{delta:+.2f}[/]" if style else f"{delta:+.2f}",
            f"{b['response_seconds']:.1f}/{t['response_seconds']:.1f}",
            f"{b['tokens_per_second']:.1f}/{t['tokens_per_second']:.1f}",
        )
    console.print(table)
    if show_answers:
        for i, r in enumerate(report["results"], 1):
            console.print(f"[bold]{i}. {r['question']}[/]")
            console.print(f"  [dim]base :[/] {_clip(r['base']['answer'], width)}", highlight=False)
            console.print(f"  [cyan]tuned:[/] {_clip(r['tuned']['answer'], width)}", highlight=False)
    s = report["summary"]
    console.print(
        f"keyword match {s['base_keyword_match']:.3f} → {s['tuned_keyword_match']:.3f} "
        f"({s['mean_keyword_improvement']:+.3f}); overall {s['base_overall']:.3f} → {s['tuned_overall']:.3f} "
        f"({s['mean_overall_improvement']:+.3f}); improved {s['improved']}, worse {s['worse']}, equal {s['equal']} "
        f"of {s['questions']} questions"
    )


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
