"""Before/after comparison: the base model and one or more adapters answer the same questions.

One base model is loaded with every adapter beside it: the base answers with the adapters
switched off (PEFT's disable_adapter), each adapter with set_adapter. So all models answer with
identical base weights, the same prompts, greedy decoding and the same token budget. Per answer:
keyword match, completeness, overall, ROUGE-L, BLEU-4, compliance flags, speed, whether it ended
before the token budget (`finished`) and whether it loops (metrics.loops); per question and
model: the reference answer's mean negative log-likelihood per token (ref_nll, teacher-forced, no
sampling noise), summarised as exp(mean NLL) = perplexity, so one badly predicted question moves
the summary by its share and not by its exponent. Per pair of models and metric: wins/ties/losses,
mean delta with a 95% bootstrap interval, Wilcoxon p-value; the reference metric's statistics run
on the NLL; for the yes/no outcomes (ends, loops): their shares and McNemar's exact test. A metric
that cannot be measured for a question (keywords without a keyword list, ROUGE without a reference)
is None there and left out of its means and statistics.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import DynamicCache

from banklora.config import COMPARE_BATCH_SIZE, GenerationSettings
from banklora.data.dataset import Example, load_examples
from banklora.data.format import IGNORE_INDEX, encode_conversation
from banklora.errors import UsageError
from banklora.evaluation import compliance, knowledge, metrics, statistics, terminal
from banklora.inference.fast_paths import packed_linears
from banklora.inference.generate import Generation, generate_batch
from banklora.loss import head_losses
from banklora.modeling import Loaded, cpu_bf16, frozen_in_bf16, is_adapter_dir, load, merged_adapter, pick_device
from banklora.progress import Progress
from banklora.inference.engine import left_padded

log = logging.getLogger(__name__)

# (metric, higher is better): the quality metrics that get paired statistics
QUALITY = (("overall", True), ("keyword_match", True), ("completeness", True), ("rouge_l", True), ("bleu4", True), ("ref_nll", False))
# yes/no outcome -> (the answer's field, higher is better): shares in the summary, McNemar per pair
BINARY = {"ends": ("finished", True), "loops": ("loops", False)}
LOWER_IS_BETTER = frozenset(key for key, higher in QUALITY if not higher) | {"ref_perplexity", "loops"}
SPEED = ("response_seconds", "first_token_seconds", "tokens_per_second")
BREAKDOWNS = ("language", "category")  # the question fields a report groups its means by
BREAKDOWN_KEYS = ("overall", "keyword_match", "rouge_l", "bleu4", "ref_nll", "ref_perplexity")
BREAKDOWN_SHOWN = tuple(k for k in BREAKDOWN_KEYS if k != "ref_nll")  # in tables: perplexity shows the NLL


def score(example: Example, gen: Generation, nll: float | None, rules: list[compliance.Rule]) -> dict:
    """Every number for one answer."""
    complete = metrics.completeness(gen.text, gen.finished)
    keyword = metrics.keyword_match(gen.text, example.keywords, example.last_question)
    return {
        "answer": gen.text,
        "keyword_match": keyword,
        "matched_keywords": metrics.matched_keywords(gen.text, example.keywords, example.last_question),
        "completeness": complete.score,
        "completeness_parts": asdict(complete),
        "overall": metrics.overall(keyword, complete.score),
        "rouge_l": metrics.rouge_l(gen.text, example.output) if example.output else None,
        "bleu4": metrics.bleu4(gen.text, example.output, example.language) if example.output else None,
        "ref_nll": None if nll is None else round(nll, 6),
        "ref_perplexity": None if nll is None else perplexity(nll),
        "compliance_flags": compliance.flags(gen.text, example.category, rules),
        "response_seconds": round(gen.seconds, 3),
        "first_token_seconds": round(gen.first_token_seconds, 3),
        "tokens": gen.new_tokens,
        "tokens_per_second": round(gen.tokens_per_second, 2),
        "finished": gen.finished,
        "loops": metrics.loops(gen.text),
    }


def perplexity(nll: float) -> float:
    """exp(NLL), shown for people; capped where exp overflows a float (NLL > 700)."""
    return math.exp(min(nll, 700.0))


# Teacher-forced scoring (reference NLL, the knowledge test's options) runs this many prompts at a
# time (a prompt with more than ANSWERS_PER_PASS answers counts once per that many), in an order set
# by the examples alone, whatever --batch-size is: fixed batches keep the float rounding, so the
# numbers do not depend on how many answers were generated at once.
SCORING_BATCH = 8
ANSWERS_PER_PASS = 8  # answers of one prompt in one pass (reference_scores)


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """What the model answers from: the example's whole question conversation."""
    return encode_conversation(tokenizer, example.question(), add_generation_prompt=True).input_ids


def reference_nll(model, tokenizer, examples: list[Example], batch_size: int = SCORING_BATCH) -> list[float | None]:
    """Mean negative log-likelihood per token of each reference answer (the final answer and its
    <end_of_turn>, after the same conversation the model answers from), teacher-forced; None
    without a reference (reference_scores)."""
    return [None if s is None else s[0] / s[1] for s in reference_scores(model, tokenizer, examples, batch_size)]


@torch.inference_mode()
def reference_scores(model, tokenizer, examples: list[Example], batch_size: int = SCORING_BATCH) -> list[tuple[float, int] | None]:
    """Total negative log-likelihood and token count of each reference answer (the final answer
    and its <end_of_turn>, after the same conversation the model answers from), teacher-forced;
    None without a reference.

    Examples that ask the same conversation (a knowledge question's four options) share one pass
    over it: each prompt runs once, left-padded in a batch of `batch_size` prompts of similar
    length, and its KV cache is copied to each of its answers, which run right-padded in a second
    pass. Equal, to float rounding, to one pass over prompt + answer (tested), in fewer tokens
    (the knowledge test's options: 2.3x fewer). A prompt with more than ANSWERS_PER_PASS answers
    (the knowledge test's neutral prompt, hundreds) runs once per that many, so a pass copies the
    cache to at most batch_size x ANSWERS_PER_PASS rows."""
    answers: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # prompt -> (example index, answer ids)
    for i, e in enumerate(examples):
        if e.output:
            enc = encode_conversation(tokenizer, e.question() + [{"role": "assistant", "content": e.output}], last_answer_only=True)
            start = next(k for k, label in enumerate(enc.labels) if label != IGNORE_INDEX)
            answers.setdefault(tuple(enc.input_ids[:start]), []).append((i, enc.input_ids[start:]))
    for group in answers.values():
        group.sort(key=lambda a: len(a[1]))  # a pass's answers of similar length: less padding where a prompt has many
    groups = [(p, group[k : k + ANSWERS_PER_PASS]) for p, group in answers.items() for k in range(0, len(group), ANSWERS_PER_PASS)]
    groups.sort(key=lambda g: (len(g[0]) + max(len(a) for _, a in g[1]), g[0], g[1][0][0]))  # set by the examples alone
    values: list[tuple[float, int] | None] = [None] * len(examples)
    for b in range(0, len(groups), batch_size):
        batch = groups[b : b + batch_size]
        for (i, _), nll in zip((x for _, group in batch for x in group), _answer_nll(model, batch, tokenizer.pad_token_id or 0)):
            values[i] = nll
    return values


def _answer_nll(model, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]], pad: int) -> list[tuple[float, int]]:
    """Total NLL and token count of each answer after its prompt, for prompts with their answers, answers in order."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    ids, mask, positions = left_padded([list(p) for p, _ in batch], pad, device)
    width = ids.shape[1]
    cache = DynamicCache()
    last = causal_lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # predicts each answer's first token
    owner = torch.tensor([row for row, (_, group) in enumerate(batch) for _ in group], device=device)
    conts = [a for _, group in batch for _, a in group]
    span = max(len(a) for a in conts)
    targets = torch.full((len(conts), span), IGNORE_INDEX, dtype=torch.long)
    for row, a in enumerate(conts):
        targets[row, : len(a)] = torch.tensor(a)
    targets = targets.to(device)
    for layer in cache.layers:  # each prompt's keys and values, once per answer
        layer.keys, layer.values = layer.keys.index_select(0, owner), layer.values.index_select(0, owner)
    mask = mask.index_select(0, owner)
    hidden = causal_lm.model(
        input_ids=targets.masked_fill(targets < 0, pad), attention_mask=torch.cat([mask, (targets >= 0).long()], dim=1),
        position_ids=mask.sum(1, keepdim=True) + torch.arange(span, device=device), past_key_values=cache, use_cache=True,
        cache_position=torch.arange(width, width + span, device=device),
    ).last_hidden_state
    hidden = torch.cat([last.index_select(0, owner)[:, None], hidden[:, :-1]], dim=1)  # position t predicts answer token t
    keep = targets >= 0
    losses = head_losses(causal_lm, hidden[keep], targets[keep])
    sums = torch.zeros(len(conts), device=device).index_add_(0, keep.nonzero()[:, 0], losses)
    return list(zip(sums.tolist(), keep.sum(1).tolist()))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(questions: list[dict], models: list[str]) -> dict:
    """Mean of every metric per model (over the questions where it was measured), reference
    perplexity as exp(mean NLL), the share and count of answers that ended and that loop, and
    compliance flag counts."""
    summary = {}
    for m in models:
        rows = [q["answers"][m] for q in questions]
        s = {key: _mean(r[key] for r in rows) for key, _ in QUALITY}  # None: measured on no question
        s["ref_perplexity"] = None if s["ref_nll"] is None else perplexity(s["ref_nll"])
        s.update({key: _mean(r[key] for r in rows) for key in SPEED})
        s["finished"] = sum(r["finished"] for r in rows)  # = ends_count, kept for reports before format 5
        for key, (field, _) in BINARY.items():
            s[f"{key}_count"] = sum(bool(r[field]) for r in rows)
            s[key] = s[f"{key}_count"] / len(rows) if rows else None
        flags: dict[str, int] = {}
        for r in rows:
            for f in r["compliance_flags"]:
                flags[f] = flags.get(f, 0) + 1
        s["compliance_flags"] = flags
        summary[m] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
    return summary


def breakdowns(questions: list[dict], models: list[str]) -> dict:
    """The summary's means per language and per category: {field: {value: {"n", "means": {model:
    {metric: mean}}}}}, groups in order of first appearance, compliance flags counted."""
    out: dict[str, dict] = {}
    for field in BREAKDOWNS:
        out[field] = {}
        for value in dict.fromkeys(q[field] for q in questions):
            rows = [q for q in questions if q[field] == value]
            summary = summarize(rows, models)
            out[field][value] = {"n": len(rows), "means": {
                m: {k: summary[m][k] for k in BREAKDOWN_KEYS} | {"compliance_flags": sum(summary[m]["compliance_flags"].values())} for m in models}}
    return out


def compare_pair(questions: list[dict], a: str, b: str) -> dict:
    """Paired statistics of b against a: Wilcoxon and bootstrap for every quality metric (questions
    with a value for both), McNemar for the yes/no outcomes (BINARY)."""
    result = {"a": a, "b": b, "metrics": {}, "binary": {}}
    for key, higher in QUALITY:
        pairs = [(q["answers"][a][key], q["answers"][b][key]) for q in questions]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if len(pairs) >= 2:  # reference metrics need questions with reference answers
            result["metrics"][key] = statistics.paired([x for x, _ in pairs], [y for _, y in pairs], higher, key).to_dict() | {"n": len(pairs)}
    for key, (field, higher) in BINARY.items():
        result["binary"][key] = statistics.mcnemar([bool(q["answers"][a][field]) for q in questions],
                                                   [bool(q["answers"][b][field]) for q in questions], key, higher)
    return result


def run_compare(
    peft_model_paths: list[str] | str,
    *,
    questions: list[str] = ("banking-eval",),
    split: str | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = COMPARE_BATCH_SIZE,
    limit: int | None = None,
    base_model: str | None = None,
    rules_file: Path | None = None,
    loaded: Loaded | None = None,
    knowledge_tests: list[str] = (),
    show_progress: bool = False,
    dtype: str = "auto",
) -> dict:
    """Answer every question with the base model and each adapter, and score the multiple-choice
    knowledge tests (built-in names or files) by likelihood; return the report."""
    paths = [peft_model_paths] if isinstance(peft_model_paths, str) else list(peft_model_paths)
    settings = settings or GenerationSettings(max_new_tokens=160)
    rules = compliance.load_rules(rules_file)
    choices = knowledge.load_choices(list(knowledge_tests))  # bad files fail before the model loads
    if loaded is None:
        for p in paths:
            if not Path(p).exists():
                raise UsageError(f"--peft-model-path {p} does not exist; train an adapter first (banklora train --output-dir {p})")
            if not is_adapter_dir(p):
                raise UsageError(f"--peft-model-path {p} is not a LoRA adapter directory (no adapter_config.json)")
        # --dtype auto on a CPU with native bf16: answers with bf16 weights (2x faster, no finding changed), the reference
        # likelihoods and the knowledge test in fp32 (scored in bf16, a knowledge-test finding changed: docs/performance.md)
        split_precision = dtype == "auto" and pick_device().type == "cpu" and cpu_bf16()
        loaded = load(paths[0], base_model=base_model, more_adapters=tuple(paths[1:]), verify=True,  # hashing is small next to a compare
                      dtype="fp32" if split_precision else dtype)
    else:
        split_precision = False
    examples = load_examples(list(questions), split=split, questions=True)[:limit]
    if not examples:
        raise UsageError(f"no questions in {', '.join(questions)}" + (f" with split {split}" if split else ""))
    options = knowledge.option_examples(choices)  # after the question, then after the neutral prompt
    prompts = [prompt_ids(loaded.tokenizer, e) for e in examples]
    model, tok = loaded.model, loaded.tokenizer
    models = ["base", *loaded.adapter_names]
    gens: dict[str, list[Generation]] = {}
    nlls: dict[str, list[float | None]] = {}
    option_scores: dict[str, list[tuple[float, int]]] = {}
    for name in models:
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            if name != "base":
                model.set_adapter(name)
            # bf16 weights answer through oneDNN's packed copies: the same products, about twice as fast (fast_paths)
            with Progress(len(prompts), 0, show_progress, label=f"compare {name}") as bar, \
                    frozen_in_bf16(model) if split_precision else contextlib.nullcontext(), packed_linears(model):
                gens[name] = generate_batch(model, tok, prompts, settings, batch_size, on_answer=lambda n, bar=bar: bar.update(n, "answers"))
            if show_progress:
                log.info("compare %s: the reference answers' likelihood (%d)%s", name, len(examples),
                         f" and the knowledge test ({len(choices)} questions)" if choices else "")
            # an adapter scores merged into copies of the base's weights: within 7e-6 of its unmerged likelihoods, 1.3x faster
            with contextlib.nullcontext() if name == "base" else merged_adapter(model):
                nlls[name] = reference_nll(model, tok, examples, SCORING_BATCH)
                option_scores[name] = reference_scores(model, tok, options, SCORING_BATCH)
    model.set_adapter(loaded.adapter_names[0])
    rows = []
    for i, e in enumerate(examples):
        rows.append({
            "id": e.id, "category": e.category, "language": e.language, "question": e.last_question,
            "conversation": e.question() if e.messages else None, "keywords": list(e.keywords), "reference": e.output,
            "answers": {m: score(e, gens[m][i], nlls[m][i], rules) for m in models},
        })
        base = rows[-1]["answers"]["base"]
        rows[-1]["deltas_vs_base"] = {  # per-question deltas, adapter minus base
            m: {k: None if rows[-1]["answers"][m][k] is None or base[k] is None else round(rows[-1]["answers"][m][k] - base[k], 6)
                for k, _ in QUALITY}
            for m in models[1:]
        }
    pairs = [("base", name) for name in loaded.adapter_names]
    pairs += [(a, b) for i, a in enumerate(loaded.adapter_names) for b in loaded.adapter_names[i + 1 :]]
    return {
        "format": "banklora-compare/6",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "adapters": {name: {"path": str(p), "meta": _meta_summary(p)} for name, p in zip(loaded.adapter_names, paths)},
        "base_model": {"name": loaded.base.name, "sha256": loaded.base.sha256},
        "questions_source": list(questions),
        "split": split,
        "generation": asdict(settings) | {"greedy": settings.temperature == 0, "decoding": settings.decoding(), "batch_size": batch_size},
        "device": str(loaded.device),
        "dtype": "bfloat16" if split_precision else str(loaded.dtype).removeprefix("torch."),  # the answers'
        "scoring_dtype": str(loaded.dtype).removeprefix("torch."),  # the reference likelihoods' and the knowledge test's
        "metric_definitions": {
            "overall": "0.6 x keyword_match + 0.4 x completeness (completeness alone for a question without keywords)",
            "keyword_match": "share of the question's keywords (or synonyms) in the answer, echoes of the question removed; n/a without keywords",
            "completeness": "mean of length, finished, structure, variety",
            "rouge_l": "ROUGE-L F1 vs the reference, jieba words",
            "bleu4": "sentence BLEU-4 vs the reference, sacrebleu zh tokenizer, 0..1",
            "ref_nll": "mean negative log-likelihood per token of the reference answer given the question (lower is better)",
            "ref_perplexity": "exp(ref_nll): per question, and exp(mean ref_nll) in the summary",
            "ends": "share of answers that ended with the end-of-turn token before the token budget (count: ends_count); McNemar per pair",
            "loops": ("share of answers that are repetition loops (count: loops_count; lower is better): a span repeated back to back "
                      f"with >= {metrics.LOOP_BACK_TO_BACK} units after its first copy, or a span of >= {metrics.LOOP_ANYWHERE} units "
                      "occurring twice; units are CJK characters and English words, punctuation and list markers dropped; McNemar per pair"),
        },
        "compliance_rules": [{"id": r.id, "kind": r.kind, "description": r.description} for r in rules],
        "summary": summarize(rows, models),
        "breakdowns": breakdowns(rows, models),
        "comparisons": [compare_pair(rows, a, b) for a, b in pairs],
        "knowledge": knowledge.knowledge_report(choices, option_scores, models, pairs, list(knowledge_tests)) if choices else None,
        "questions": rows,
    }


def _meta_summary(path: str) -> dict:
    from banklora.modeling import read_meta

    meta = read_meta(Path(path))
    keep = ("created_at", "loss_per_step", "validation_loss", "wall_time_seconds", "lora", "dataset")
    return {k: meta[k] for k in keep if k in meta}


def gate(report: dict, fail_below: dict[str, float], fail_on_regression: bool) -> list[str]:
    """Reasons a CI pipeline should fail: an adapter under a threshold, or significantly worse than
    base (on a quality metric, or on ends or loops)."""
    reasons = []
    for name in report["models"][1:]:
        for key, threshold in fail_below.items():
            value = report["summary"][name][key]
            if value is None:
                reasons.append(f"{name}: no question has a reference answer, so --fail-below {key} cannot be checked")
            elif value < threshold:
                reasons.append(f"{name}: mean {key} {value:.4f} is below --fail-below {key}={threshold}")
    if fail_on_regression:
        for c in report["comparisons"]:
            if c["a"] != "base":
                continue
            for key, higher in QUALITY:
                s = c["metrics"].get(key)
                if s and s["significant"] and (s["mean_delta"] > 0) != higher:
                    reasons.append(f"{c['b']} is significantly worse than base on {key} ({s['verdict']})")
            for key, (_, higher) in BINARY.items():
                s = c["binary"][key]
                if s["significant"] and (s["mean_delta"] > 0) != higher:
                    reasons.append(f"{c['b']} is significantly worse than base on {key} ({s['verdict']})")
    return reasons


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """--fail-below rouge_l=0.2 (repeatable) -> {"rouge_l": 0.2}; ends=0.9: at least 90% of the
    answers end before the token budget."""
    names = {k for k, higher in QUALITY if higher} | {k for k, (_, higher) in BINARY.items() if higher}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise UsageError(f"--fail-below {item}: expected METRIC=VALUE with METRIC one of {', '.join(sorted(names))}")
        try:
            out[key] = float(value)
        except ValueError as exc:
            raise UsageError(f"--fail-below {item}: {value!r} is not a number") from exc
    return out


def print_report(report: dict, console, show_answers: bool = True, width: int = 160) -> None:
    """The readable tables in the terminal: per question, then statistics per pair of models.
    Below 120 columns the tables are compact (terminal.py): the same findings, no cut cells."""
    narrow = terminal.is_narrow(console)
    models = report["models"]
    last = models[-1]
    name = terminal.labels(models, narrow)
    if terminal.legend(name):
        console.print(terminal.legend(name), soft_wrap=False)
    title = (f"{len(report['questions'])} questions, {report['generation'].get('decoding', 'greedy')}, same prompts and token budget "
             f"({report['generation']['max_new_tokens']} tokens)" + (f"; {precision(report)}" if report.get("dtype") else ""))
    if narrow:
        table = terminal.table(title + "; overall score per answer (keywords, ROUGE-L and perplexity per question: the reports)", True)
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("question", ratio=1, overflow="fold")
        for col in (*[name[m] for m in models], f"Δ {name[last]}"):
            terminal.number_column(table, col)
    else:
        table = terminal.table(title, False)
        for col in ("#", "category", "question", *[f"overall {m}" for m in models], f"Δ {last}", "keywords b→t", "rouge-L b→t", "ppl b→t"):
            table.add_column(col, justify="left" if col in ("category", "question") else "right")
    for i, q in enumerate(report["questions"], 1):
        a = q["answers"]
        delta = a[last]["overall"] - a["base"]["overall"]
        style = "green" if delta > statistics.TIE else "red" if delta < -statistics.TIE else ""
        cells = [*[f"{a[m]['overall']:.2f}" for m in models], f"[{style}]{delta:+.2f}[/]" if style else f"{delta:+.2f}"]
        if narrow:
            table.add_row(str(i), " ".join(q["question"].split()), *cells)
            continue
        table.add_row(
            str(i), q["category"], _clip(q["question"], 22), *cells,
            f"{fmt(a['base']['keyword_match'], '.2f')}→{fmt(a[last]['keyword_match'], '.2f')}",
            f"{fmt(a['base']['rouge_l'], '.2f')}→{fmt(a[last]['rouge_l'], '.2f')}",
            f"{fmt(a['base']['ref_perplexity'], '.1f')}→{fmt(a[last]['ref_perplexity'], '.1f')}",
        )
    console.print(table)
    if show_answers:
        for i, q in enumerate(report["questions"], 1):
            console.print(f"[bold]{i}. {q['question']}[/]")
            for m in models:
                flags = q["answers"][m]["compliance_flags"]
                console.print(f"  [cyan]{m}:[/] {_clip(q['answers'][m]['answer'], width)}" + (f" [red]{flags}[/]" if flags else ""), highlight=False)
    means = terminal.table("means per model", narrow)
    means.add_column("metric", no_wrap=True)
    for m in models:
        terminal.number_column(means, name[m])
    for key in summary_keys():
        means.add_row(key, *[fmt(report["summary"][m][key], ".3f") for m in models])
    for key in BINARY:
        means.add_row(key, *[share(report, m, key) for m in models])
    means.add_row("compliance flags", *[str(sum(report["summary"][m]["compliance_flags"].values())) for m in models])
    console.print(means)
    console.print(_breakdown_table(report, narrow, name))
    for c in report["comparisons"]:
        stats = terminal.table(f"{c['b']} vs {c['a']}: paired over {len(report['questions'])} questions" + (", p by Wilcoxon" if narrow else ""), narrow)
        stats.add_column("metric", no_wrap=True)
        for col in ("mean Δ", "95% CI", "p" if narrow else "p (Wilcoxon)", "w/t/l" if narrow else "win/tie/loss"):
            terminal.number_column(stats, col)
        stats.add_column("significant" if narrow else "finding", no_wrap=True)
        for key, s in c["metrics"].items():
            stats.add_row(key, f"{s['mean_delta']:+.3f}", f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]", f"{s['p_value']:.3g}",
                          f"{s['wins']}/{s['ties']}/{s['losses']}", terminal.significance(s["significant"], narrow))
        console.print(stats)
        outcomes = _outcomes_table(c, narrow, name)
        console.print(outcomes)
    knowledge.print_knowledge(report, console, name)


def _outcomes_table(c: dict, narrow: bool, name: dict[str, str]):
    """Answers that end and that loop, one pair of models: rates, the difference's interval,
    McNemar's p and the questions where only one of the two did it."""
    title = f"{c['b']} vs {c['a']}: answers that end (higher is better) and that loop (lower is better)"
    if narrow:
        outcomes = terminal.table(f"{title}; rates {name[c['a']]} → {name[c['b']]}; only: the questions where only {name[c['b']]} / only {name[c['a']]} "
                                  "did it; p by McNemar; n.s. = not significant", True)
        outcomes.add_column("outcome", no_wrap=True)
        for col in ("rates", "95% CI of Δ", "p", "only"):
            terminal.number_column(outcomes, col)
        outcomes.add_column("finding", no_wrap=True)
    else:
        outcomes = terminal.table(title, False)
        for col in ("outcome", c["a"], c["b"], "95% CI of Δ", "p (McNemar)", f"only {c['b']} / only {c['a']}", "finding"):
            outcomes.add_column(col, justify="left" if col in ("outcome", "finding") else "right")
    for key, s in c["binary"].items():
        rates = [f"{s['a_rate']:.3f} → {s['b_rate']:.3f}"] if narrow else [f"{s['a_rate']:.3f}", f"{s['b_rate']:.3f}"]
        outcomes.add_row(key, *rates, f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]", f"{s['p_value']:.3g}",
                         f"{s['b_only']} / {s['a_only']}", binary_finding(s, key, narrow))
    return outcomes


def _breakdown_table(report: dict, narrow: bool, name: dict[str, str]):
    """Means per language and category: one row per group, "base → adapter" in each cell; when
    narrow, one row per group and model, the group named on its first row."""
    models = report["models"]
    short = {"keyword_match": "keywords", "rouge_l": "ROUGE-L", "bleu4": "BLEU-4", "ref_perplexity": "ref ppl"}
    if not narrow:
        groups = terminal.table("means per language and category (" + " → ".join(models) + ")", False)
        for col in ("group", "n", *BREAKDOWN_SHOWN):
            groups.add_column(col, justify="left" if col == "group" else "right")
        for field, value, n, cells in breakdown_rows(report):
            groups.add_row(f"{field} {value}", str(n), *cells)
        return groups
    groups = terminal.table("means per language and category", True)
    groups.add_column("group", no_wrap=True)
    terminal.number_column(groups, "n")
    groups.add_column("model", no_wrap=True)
    for key in BREAKDOWN_SHOWN:
        terminal.number_column(groups, short.get(key, key))
    for field, g in report.get("breakdowns", {}).items():
        for value, group in g.items():
            for k, m in enumerate(models):
                cells = [fmt(group["means"][m][key], ".1f" if key == "ref_perplexity" else ".3f") for key in BREAKDOWN_SHOWN]
                groups.add_row(value if k == 0 else "", str(group["n"]) if k == 0 else "", name[m], *cells,
                               end_section=k == len(models) - 1)
    return groups


def breakdown_rows(report: dict) -> list[tuple[str, str, int, list[str]]]:
    """(field, value, n, cells) per group for the tables: one cell "base → adapter ..." per metric
    of BREAKDOWN_SHOWN."""
    models = report["models"]
    rows = []
    for field, groups in report.get("breakdowns", {}).items():
        for value, g in groups.items():
            cells = [" → ".join(fmt(g["means"][m][k], ".1f" if k == "ref_perplexity" else ".3f") for m in models) for k in BREAKDOWN_SHOWN]
            rows.append((field, value, g["n"], cells))
    return rows


def summary_keys() -> list[str]:
    """The means a report shows, in order: quality (reference perplexity beside its NLL), then speed."""
    keys = [k for k, _ in QUALITY]
    return keys[: keys.index("ref_nll") + 1] + ["ref_perplexity"] + list(SPEED)


def share(report: dict, model: str, key: str) -> str:
    """A yes/no outcome's share with its count, e.g. "0.875 (7/8)"."""
    s = report["summary"][model]
    return "n/a" if s[key] is None else f"{s[key]:.3f} ({s[f'{key}_count']}/{len(report['questions'])})"


def binary_finding(s: dict, key: str, short: bool = False) -> str:
    """McNemar's finding in two or three words: "significantly better", "significantly worse", "not significant";
    short: "better", "worse" (both significant), "n.s."."""
    if not s["significant"]:
        return "n.s." if short else "not significant"
    better = "better" if (s["mean_delta"] > 0) == BINARY[key][1] else "worse"
    return better if short else f"significantly {better}"


def precision(report: dict) -> str:
    """How a report's answers and scores were computed, e.g. 'answers in bfloat16, scored in float32'."""
    answers, scoring = report["dtype"], report.get("scoring_dtype", report["dtype"])
    return f"{answers} weights" if answers == scoring else f"answers in {answers}, scored in {scoring}"


def fmt(value, spec: str) -> str:
    """A metric for people: "n/a" where it could not be computed (no reference answer)."""
    return "n/a" if value is None else format(value, spec)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
