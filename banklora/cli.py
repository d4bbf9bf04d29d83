"""The `banklora` command line: parses flags and calls into the modules. No logic lives here.

The training options of train, sweep and quickstart are generated from the settings dataclass
(banklora.config.flags()): one field, one flag, its docstring as the help text, its default.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from banklora.config import CHAT_REPETITION_PENALTY, COMPARE_BATCH_SIZE, QUICKSTART, SERVE_MAX_BATCH_SIZE, flags as setting_flags
from banklora.errors import BankloraError, UsageError

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("banklora")


class _Group(TyperGroup):
    """Errors a user can act on become one red sentence and the error's exit code, never a
    traceback, whether the CLI runs as a program or in-process (tests)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BankloraError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # the machine's, not the input's: a full disk, a folder gone mid-run (writes go through temporary files)
            where = f" ({exc.filename})" if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {exc.strerror or exc}{where}; free space or fix the folder, and run it again", highlight=False)
            ctx.exit(1)


# rich_markup_mode=None: click's plain help, which wraps to the terminal instead of cutting flag names
app = typer.Typer(cls=_Group, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="LoRA fine-tuning of Gemma on banking Q&A: data -> train -> compare -> chat.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect, check and prepare the training data.")
app.add_typer(data_app, name="data")

DEFAULT_ADAPTER = "outputs/lora_banking"
MAX_NEW_TOKENS = 32_768  # Gemma 3 270M's context, the most any answer can hold (serve checks the loaded model's own)
BaseModelOpt = Annotated[Optional[str], typer.Option("--base-model", help="Base model: gemma-3-270m (embedded, default), a local HF checkpoint directory, or a hub id.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Only this split: train, validation or test.")]
_DATA_HELP = next(f.help for f in setting_flags() if f.key == "data")
DataOpt = Annotated[Optional[list[str]], typer.Option("--data", help=_DATA_HELP + " [default: banking]")]
# repetition controls, the same flags for chat and compare (GenerationSettings checks the values)
FrequencyPenaltyOpt = Annotated[float, typer.Option(help="Lower a token's logit by this x the times it is already in the answer (OpenAI's frequency_penalty); -2..2, 0 = off.")]
PresencePenaltyOpt = Annotated[float, typer.Option(help="Lower a token's logit by this once it is in the answer (OpenAI's presence_penalty); -2..2, 0 = off.")]
InferenceDtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights for answering: auto (bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, about 2x faster there; fp32 elsewhere), bf16 or fp32.")]
ServeQuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="int8: decode with weight-only int8 copies of the decoder's weights and an int8 LM head (CPU with AVX512-BF16 or AMX): faster single streams, slightly different answers (see docs/performance.md).")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(help="Divide the logit of every token already in the prompt or the answer by this (vLLM's repetition_penalty; multiplied when negative); 1 = off, 1.1-1.3 curbs loops.")]


def _setup_logging() -> None:
    from rich.logging import RichHandler

    level = os.environ.get("BANKLORA_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])
    logging.getLogger("banklora").setLevel(level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' deprecation notices, raised by its own internals, say nothing to our users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def settings_options(exclude: tuple[str, ...] = (), defaults: dict | None = None):
    """Give a command one option per training setting, generated from the settings fields: the
    flag, its type, the field's docstring as help and its default ([default: ...] shows the
    value used when the flag is not given). The command receives the flags given (and None for
    the others) as its `flags` argument."""
    shown = defaults or {}
    options = [f for f in setting_flags() if f.key not in exclude]

    def option(f) -> inspect.Parameter:
        default = shown.get(f.key, f.default)
        text = f.help
        if default is not None:
            value = ("on" if default else "off") if f.type is bool else ",".join(default) if isinstance(default, tuple) else default
            text += f" [default: {value}]"
        decls = (f"{f.flag}/--no-{f.flag[2:]}",) if f.type is bool else (f.flag,)
        kind = list[str] if f.type is list else f.type
        return inspect.Parameter(f.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[kind], typer.Option(*decls, help=text, show_default=False)])

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {f.param: kwargs.pop(f.param) for f in options}
            return command(**kwargs, flags=given)

        wrapper.__signature__ = inspect.Signature(own + [option(f) for f in options])
        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------- data
@data_app.command("stats")
def data_stats(
    data: DataOpt = None,
    split: SplitOpt = None,
    base_model: BaseModelOpt = None,
    max_length: Annotated[int, typer.Option(help="Count examples longer than this many tokens.")] = 512,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the length histogram and category bars to this PNG.")] = None,
) -> None:
    """Counts per category, language and split; lengths in Gemma tokens."""
    from rich.table import Table

    from banklora import destination
    from banklora.data.dataset import load_examples, source_paths
    from banklora.data.stats import dataset_stats, plot_stats
    from banklora.io import is_png_from_matplotlib
    from banklora.modeling import load_tokenizer

    sources = data or ["banking"]
    if plot is not None:  # before the work: a plot path that cannot be written is a sentence, not a traceback at the end
        destination.check(plot, "--plot", directory=False, reads=source_paths(sources), ours=is_png_from_matplotlib, example="stats.png")
    examples = load_examples(sources, split=split)
    stats = dataset_stats(examples, load_tokenizer(base_model))
    table = Table(title=f"{len(examples)} examples from {', '.join(sources)}{f' ({split})' if split else ''}, lengths in Gemma tokens")
    for col in ("category", "examples", "languages", "min", "mean", "max", "answer tokens"):
        table.add_column(col, justify="left" if col in ("category", "languages") else "right")
    for r in stats.categories:
        langs = " ".join(f"{k}:{v}" for k, v in sorted(r.languages.items()))
        table.add_row(r.category, str(r.count), langs, str(r.min_tokens), f"{r.mean_tokens:.0f}", str(r.max_tokens), f"{r.answer_tokens:.0f}")
    console.print(table)
    splits = ", ".join(f"{n} {s}" for s, n in sorted(stats.splits.items()))
    languages = ", ".join(f"{n} {lang}" for lang, n in sorted(stats.languages.items()))
    over = stats.over(max_length)
    console.print(f"{len(stats.categories)} categories; splits: {splits}; languages: {languages}")
    console.print(
        f"tokens: p50 {stats.percentile(50)}, p90 {stats.percentile(90)}, p99 {stats.percentile(99)}, max {max(stats.lengths)}; "
        f"{over} example(s) ({over / len(stats.lengths):.1%}) over --max-length {max_length}"
    )
    if plot is not None:
        plot_stats(stats, max_length, plot)
        console.print(f"plot: {plot}")


@data_app.command("check")
def data_check(
    data: DataOpt = None,
    threshold: Annotated[float, typer.Option(help="Overlap (0..1) at which a held-out question counts as a near-copy.")] = 0.35,
    paraphrases: Annotated[Optional[list[str]], typer.Option("--paraphrases", help="A set that asks training questions in other words (e.g. banking-paraphrase): checked against the validation and test questions instead, which it must not copy.")] = None,
) -> None:
    """Leakage check: validation and test questions must not be near-copies of training questions."""
    from banklora.data.dataset import load_examples
    from banklora.data.leakage import N, leaks, nearest_training_questions

    sources = data or ["banking"]
    examples = load_examples(sources)
    train_set = [e for e in examples if e.split == "train"]
    held_out = [e for e in examples if e.split != "train"]
    what = "training"
    if paraphrases:  # paraphrases of training questions may be close to them, never to held-out ones
        train_set, held_out, what = held_out, load_examples(paraphrases, questions=True), "validation/test"
    if not train_set or not held_out:
        raise UsageError(f"{', '.join(sources)}: the check needs a train split and a validation or test split")
    nearest = nearest_training_questions(train_set, held_out)
    found = leaks(nearest, threshold)
    overlaps = sorted(n.overlap for n in nearest)
    console.print(
        f"{len(held_out)} {'paraphrased' if paraphrases else 'held-out'} vs {len(train_set)} {what} questions, token {N}-gram containment: "
        f"max {overlaps[-1]:.2f}, p95 {overlaps[int(0.95 * (len(overlaps) - 1))]:.2f}, mean {sum(overlaps) / len(overlaps):.2f}; threshold {threshold}"
    )
    for n in sorted(nearest, key=lambda n: -n.overlap)[:5 if not found else len(found)]:
        mark = "[red]LEAK[/]" if n.overlap >= threshold else "    "
        console.print(f"{mark} {n.overlap:.2f} {n.held_out.source} {n.held_out.prompt[:40]!r} ~ {n.train.source} {n.train.prompt[:40]!r}", highlight=False)
    if found:
        raise BankloraError(f"{len(found)} question(s) are near-copies of {what} questions; reword them" + ("" if paraphrases else " or move them to train"))
    console.print(f"no leakage: every {'paraphrased' if paraphrases else 'held-out'} question is below the threshold")


@data_app.command("scan")
def data_scan(data: DataOpt = None) -> None:
    """Find personal data (ID, bank card and mobile numbers, e-mail addresses) and say where."""
    from banklora.data import privacy
    from banklora.data.dataset import load_examples

    sources = data or ["banking"]
    findings = privacy.scan(load_examples(sources))
    for f in findings:
        console.print(str(f), highlight=False)
    if findings:
        raise BankloraError(f"{len(findings)} personal data item(s) found; remove them or train with --redact")
    console.print(f"no personal data found in {', '.join(sources)}")


@data_app.command("augment")
def data_augment(
    output: Annotated[Path, typer.Option(help="Write the augmented data here (JSONL).")],
    data: DataOpt = None,
    variants: Annotated[int, typer.Option(help="New phrasings per training question.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists (never a data file this command reads).")] = False,
) -> None:
    """Deterministic question variants for the training split (validation and test untouched)."""
    from banklora import destination
    from banklora.data.augment import augment
    from banklora.data.dataset import load_examples, source_paths, write_jsonl

    destination.check(output, "--output", directory=False, overwrite=overwrite, reads=source_paths(data or ["banking"]), example="augmented.jsonl")
    examples = load_examples(data or ["banking"])
    out = augment(examples, variants)
    write_jsonl(out, output)
    console.print(f"{len(out) - len(examples)} variants added to {len(examples)} examples: {output}")


@data_app.command("export")
def data_export(
    output: Annotated[Path, typer.Option(help="Write the merged, validated data here (JSONL).")],
    data: DataOpt = None,
    split: SplitOpt = None,
    base_model: BaseModelOpt = None,
    max_length: Annotated[int, typer.Option(help="Drop examples longer than this many tokens.")] = 512,
    strict: Annotated[bool, typer.Option(help="Fail instead of dropping duplicates and over-long examples.")] = False,
    redact: Annotated[bool, typer.Option(help="Mask personal data instead of refusing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists (never a data file this command reads).")] = False,
) -> None:
    """Write the merged, validated data (duplicates and over-long examples dropped) as JSONL."""
    from banklora import destination
    from banklora.data.dataset import load_examples, source_paths, write_jsonl
    from banklora.data.prepare import prepare
    from banklora.modeling import load_tokenizer

    destination.check(output, "--output", directory=False, overwrite=overwrite, reads=source_paths(data or ["banking"]), example="merged.jsonl")
    examples = load_examples(data or ["banking"], split=split)
    prepared = prepare(examples, load_tokenizer(base_model), max_length, strict=strict, redact=redact)
    write_jsonl(prepared.examples, output)
    console.print(f"{len(prepared.examples)} examples ({prepared.summary()}): {output}")


@data_app.command("register")
def data_register(
    name: Annotated[str, typer.Argument(help="The name to use with --data.")],
    path: Annotated[Path, typer.Argument(help="The data file.")],
    description: Annotated[str, typer.Option(help="What the data is.")] = "",
) -> None:
    """Give a data file a name in banklora_datasets.yaml (or $BANKLORA_REGISTRY), for --data NAME."""
    from banklora.data.dataset import register_dataset

    registry = register_dataset(name, path, description)
    console.print(f"registered {name} -> {path} in {registry}")


# --------------------------------------------------------------------------------------------- train
ConfigOpt = Annotated[Optional[Path], typer.Option(help="YAML file of settings (configs/*.yaml); flags override it.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output even when banklora did not write it (never the base model, the data or the caches).")]
ResumeOpt = Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue an interrupted run exactly from its newest checkpoint (--no-resume: discard its checkpoints).")]


@app.command()
@settings_options()
def train(config: ConfigOpt = None, resume: ResumeOpt = None, overwrite: OverwriteOpt = False, *, flags: dict) -> None:
    """Train a LoRA adapter on the train split (validation loss on the validation split).

    Runs in one process, or on several with `torchrun --nproc_per_node N -m banklora train ...`
    or `accelerate launch -m banklora train ...` (DDP; DeepSpeed / FSDP with configs/accelerate/).
    """
    from banklora.config import overrides_from_flags
    from banklora.train import resolve_settings
    from banklora.train import train as run_train

    settings = resolve_settings(config, overrides_from_flags(flags), resume)
    _print_trained(run_train(settings, resume=resume, overwrite=overwrite))


def _print_trained(result) -> None:
    if not result.main_process:
        return
    finite = [x for x in result.losses if x is not None]
    best = result.meta.get("best_validation")
    console.print(
        f"adapter: {result.output_dir}  loss {finite[0]:.3f} -> {finite[-1]:.3f} over {len(result.losses)} steps, "
        f"{result.wall_seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s"
        + (f"\nbest validation loss {best['loss']:.4f} at step {best['step']}: {result.output_dir}/best" if best else "")
    )


# --------------------------------------------------------------------------------------------- sweep
@app.command()
@settings_options(exclude=("lora.r", "lora.alpha", "lr", "output_dir"))
def sweep(
    lora_r: Annotated[str, typer.Option(help="LoRA ranks to try, comma-separated.")] = "4,8,16",
    lora_alpha: Annotated[str, typer.Option(help="LoRA alphas to try, comma-separated.")] = "16,32",
    lr: Annotated[str, typer.Option(help="Peak learning rates to try, comma-separated.")] = "2e-4,5e-4,1e-3",
    output_dir: Annotated[str, typer.Option(help="One adapter per setting goes under this directory, with sweep.json and sweep.md.")] = "outputs/sweep",
    config: ConfigOpt = None,
    *,
    flags: dict,
) -> None:
    """Train each (rank, alpha, lr) of a grid and rank them by validation loss; the best is marked."""
    from rich.table import Table

    from banklora.config import load_train_settings, overrides_from_flags
    from banklora.sweep import parse_values, run_sweep, write_sweep_report

    ranks, alphas, lrs = parse_values("--lora-r", lora_r, int), parse_values("--lora-alpha", lora_alpha, int), parse_values("--lr", lr, float)
    base = load_train_settings(config, overrides_from_flags(flags))
    root = Path(output_dir)
    console.print(f"sweep: {len(ranks) * len(alphas) * len(lrs)} settings (r {ranks} x alpha {alphas} x lr {lrs}) into {root}")
    rows = run_sweep(base, ranks, alphas, lrs, root)
    table = Table(title="validation loss on the validation split (answer tokens; lower is better)")
    for col in ("", "setting", "r", "alpha", "lr", "train loss", "validation loss", "best validation (step)", "seconds"):
        table.add_column(col, justify="left" if col in ("", "setting") else "right")
    for row in rows:
        best = row["best_validation"] or {}
        train_loss = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "n/a"
        table.add_row("[bold green]★ best[/]" if row.get("best") else "", row["name"], str(row["r"]), str(row["alpha"]), f"{row['lr']:g}",
                      train_loss, f"{row['validation_loss']:.4f}", f"{best.get('loss', float('nan')):.4f} ({best.get('step', '-')})", f"{row['seconds']:.0f}")
    console.print(table)
    paths = write_sweep_report(rows, root)
    console.print(f"best: {rows[0]['adapter']}    reports: {paths[0]}  {paths[1]}")
    questions = "".join(f" --questions {d}" for d in base.data) if base.data != ("banking",) else ""
    console.print(f"compare it with the base: banklora compare --peft-model-path {rows[0]['adapter']}{questions} --split validation")


# --------------------------------------------------------------------------------------------- compare
@app.command()
def compare(
    peft_model_path: Annotated[Optional[list[str]], typer.Option(help=f"Adapter directory to compare with its base model; repeat to compare adapters with each other too. [default: {DEFAULT_ADAPTER}]")] = None,
    questions: Annotated[Optional[list[str]], typer.Option("--questions", help="Question set: 'banking-eval' (the seed's 8), 'banking', a registered name or a file with references and keywords.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only this split of the questions, e.g. test: the held-out split of the built-in set.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token budget per answer, the same for every model.")] = 160,
    batch_size: Annotated[int, typer.Option(help="Questions answered together (generation; a finished answer's row takes the next question). Lower it when memory is short.")] = COMPARE_BATCH_SIZE,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="JSON report path; .md and .html are written beside it [next to the adapter, in reports/].")] = None,
    base_model: BaseModelOpt = None,
    compliance_rules: Annotated[Optional[Path], typer.Option(help="Extra compliance rules (YAML, the built-in rules' format).")] = None,
    fail_below: Annotated[Optional[list[str]], typer.Option(help="CI gate, repeatable: exit 1 when an adapter's mean METRIC is below VALUE, e.g. rouge_l=0.2.")] = None,
    fail_on_regression: Annotated[bool, typer.Option(help="CI gate: exit 1 when an adapter is significantly worse than the base on any metric.")] = False,
    answers: Annotated[bool, typer.Option("--answers/--no-answers", help="Print every model's answer to each question.")] = True,
    knowledge: Annotated[Optional[list[str]], typer.Option(help="Multiple-choice knowledge test scored by likelihood, repeatable: 'banking-mcq' (built-in, 120 questions), a JSONL file, or 'none'. [default: banking-mcq]")] = None,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    presence_penalty: PresencePenaltyOpt = 0.0,
    dtype: InferenceDtypeOpt = "auto",
) -> None:
    """Base vs fine-tuned on the same questions: quality metrics with statistics, compliance, speed,
    and a multiple-choice knowledge test."""
    from banklora.card import record_evaluation
    from banklora.config import GenerationSettings
    from banklora.evaluation.compare import gate, parse_thresholds, print_report, run_compare
    from banklora.evaluation.report import check_report_path

    adapters = peft_model_path or [DEFAULT_ADAPTER]
    thresholds = parse_thresholds(fail_below or [])
    settings = GenerationSettings(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty)  # greedy; no penalty unless asked
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens {max_new_tokens} exceeds Gemma's {MAX_NEW_TOKENS:,}-token context; 160-512 is typical for an answer")
    default = ["banking"] if split else ["banking-eval"]
    tests = [] if knowledge == ["none"] else (knowledge or ["banking-mcq"])
    report = default_report_path(adapters[-1]) if report is None else report
    check_report_path(report, reads=[("an adapter", a) for a in adapters])  # before the compare runs, not after
    result = run_compare(adapters, questions=questions or default, split=split, settings=settings, batch_size=batch_size,
                         limit=limit, base_model=base_model, rules_file=compliance_rules, knowledge_tests=tests, show_progress=True,
                         dtype=dtype)
    paths = _write_reports_or_keep(result, report)
    for name, info in result["adapters"].items():
        record_evaluation(Path(info["path"]), result, name)  # the model card carries the latest comparison
    print_report(result, console, show_answers=answers)
    console.print(f"reports: {paths['json']}  {paths['markdown']}  {paths['html']}")
    reasons = gate(result, thresholds, fail_on_regression)
    if reasons:
        raise BankloraError("quality gate failed:\n  " + "\n  ".join(reasons))


def _write_reports_or_keep(result: dict, report: Path) -> dict[str, Path]:
    """The reports at `report`; when that write fails after all (the disk filled, the folder
    went away), in a temporary folder, said in the error: a compare's results are never lost."""
    import tempfile

    from banklora.evaluation.report import write_reports

    try:
        return write_reports(result, report)
    except OSError as exc:
        kept = Path(tempfile.mkdtemp(prefix="banklora-report-")) / Path(report).name
        write_reports(result, kept)
        raise BankloraError(f"could not write the report to {report} ({exc.strerror or exc}); it is saved at {kept} instead") from exc


def default_report_path(adapter: str) -> Path:
    adapter_path = Path(adapter)
    return adapter_path.parent / "reports" / f"{adapter_path.name}_compare.json"


# --------------------------------------------------------------------------------------------- chat
@app.command()
def chat(
    model_path: Annotated[str, typer.Option(help="An adapter directory, or a base model (default: the embedded Gemma 3 270M).")] = "gemma-3-270m",
    base_model: BaseModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more varied.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.9,
    max_context: Annotated[int, typer.Option(help="Tokens of history kept; older turns are dropped.")] = 2048,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer as it is written.")] = True,
    prompt: Annotated[Optional[str], typer.Option(help="Answer this one message and exit (for scripts).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="LM head in int8 (CPU): faster answers, slightly different ones (see docs/performance.md).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Decoder weights in fp16 for decoding (CPU): faster answers, slightly different ones (see docs/performance.md).")] = False,
    quantize: ServeQuantizeOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    presence_penalty: PresencePenaltyOpt = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = CHAT_REPETITION_PENALTY,
    dtype: InferenceDtypeOpt = "auto",
) -> None:
    """Talk to a fine-tuned (or base) model, with streaming output."""
    from banklora.chat import answer_once, repl
    from banklora.config import GenerationSettings
    from banklora.modeling import load
    from banklora.inference.fast_paths import ServingSettings, serving_quantize

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty, repetition_penalty=repetition_penalty)
    if max_context <= max_new_tokens:
        raise UsageError(f"--max-context ({max_context}) must exceed --max-new-tokens ({max_new_tokens})")
    loaded = load(model_path, base_model=base_model, dtype=dtype,
                  serve=ServingSettings(merge=True, int8_head=int8, fp16_weights=fp16, int8_weights=serving_quantize(quantize)))  # one adapter: merged
    if prompt is not None:
        answer_once(loaded, prompt, settings, stream, sys.stdout)
        return
    what = f"adapter {loaded.adapter_path} on {loaded.base.name}" if loaded.adapter_path else loaded.base.name
    err_console.print(f"[dim]{what} on {loaded.device}, {str(loaded.dtype).removeprefix('torch.')} weights[/]")
    repl(loaded, settings, stream, max_context, sys.stdout)


# --------------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    model_path: Annotated[Optional[list[str]], typer.Option("--model-path", help="An adapter directory to serve, as DIR (named after the directory) or NAME=DIR; repeat for more. None: the base alone.")] = None,
    base_model: BaseModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the server on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="BANKLORA_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on /v1 and /metrics.")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together; later ones join at the next step.")] = SERVE_MAX_BATCH_SIZE,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait for a slot; past it the server answers 429 with Retry-After.")] = 64,
    int8: Annotated[bool, typer.Option("--int8", help="LM head in int8 (CPU): faster answers, slightly different ones (see docs/performance.md).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Decoder weights in fp16 (CPU; the base served alone only).")] = False,
    quantize: ServeQuantizeOpt = None,
    dtype: InferenceDtypeOpt = "auto",
) -> None:
    """Serve the base and adapters over an OpenAI-compatible API, with a web chat at /."""
    from banklora.serve.launch import bind, build, run

    with bind(host, port) as sock:  # before the model loads: a taken port is a sentence at once
        served_app, served, loaded = build(model_path or [], base_model=base_model, api_key=api_key, max_batch_size=max_batch_size,
                                           max_queue=max_queue, int8=int8, fp16=fp16, quantize=quantize, dtype=dtype)
        run(served_app, served, loaded, sock=sock, api_key=api_key)


# --------------------------------------------------------------------------------------------- studio
@app.command()
def studio(
    workspace: Annotated[Path, typer.Option(help="The studio's folder: uploaded data, trained adapters, reports, exports, jobs.")] = Path("studio"),
    base_model: BaseModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the studio on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="BANKLORA_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every studio job and file endpoint, /v1 and /metrics.")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Chat requests decoded together.")] = SERVE_MAX_BATCH_SIZE,
    dtype: InferenceDtypeOpt = "auto",
) -> None:
    """The whole job in a browser: data, training runs (a queue of processes the server owns), compare, chat, export (docs/studio.md)."""
    from banklora.basemodel import EMBEDDED_NAME
    from banklora.serve.launch import bind, run
    from banklora.studio.launch import build

    with bind(host, port) as sock:
        studio_app, served, loaded = build(workspace, base_model=base_model or EMBEDDED_NAME, api_key=api_key, max_batch_size=max_batch_size,
                                           dtype=dtype, host=host)
        shown = sock.getsockname()
        log.info("studio at http://%s:%d/studio (workspace %s)", f"[{shown[0]}]" if ":" in shown[0] else shown[0], shown[1],
                 workspace.resolve())
        run(studio_app, served, loaded, sock=sock, api_key=api_key)


# --------------------------------------------------------------------------------------------- export
@app.command()
def export(
    model_path: Annotated[str, typer.Option("--model-path", help="The adapter directory to export.")] = DEFAULT_ADAPTER,
    format: Annotated[str, typer.Option("--format", help="hf (merged fp32 checkpoint: transformers, vLLM), gguf (merged, llama.cpp and Ollama) or gguf-lora (the adapter alone, for a base GGUF).")] = "hf",
    output: Annotated[Optional[Path], typer.Option("--output", help="Directory to write. [default: exports/NAME-FORMAT]")] = None,
    type: Annotated[Optional[str], typer.Option("--type", help="GGUF tensor type: q8_0 (default for gguf), f16, f32 (default for gguf-lora).")] = None,
    base_model: BaseModelOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists.")] = False,
) -> None:
    """Export an adapter: a merged HF checkpoint, a merged GGUF, or a LoRA GGUF, each with a model card (GGUF: an Ollama Modelfile)."""
    from banklora.export import export as run_export

    output = output or Path("exports") / f"{Path(model_path).resolve().name}-{format}{'-' + type.lower() if type else ''}"
    done = run_export(model_path, format, output, gguf_type=type, base_model=base_model, overwrite=overwrite)
    console.print(f"exported in {done.seconds:.0f} s: {done.directory}")
    for name, size in done.files.items():
        console.print(f"  {name:<36} {size / 1e6:9.1f} MB")


# --------------------------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    base_model: BaseModelOpt = None,
    model_path: Annotated[Optional[str], typer.Option(help="Also check that this adapter (or model) ends its answers: P(<end_of_turn>) after the validation answers and greedy answers within 160 tokens.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Data whose validation split --model-path's turn-end check uses. [default: banking]")] = None,
) -> None:
    """Check this machine: versions, device, threads, the embedded model (sha256), a short generation;
    with --model-path, whether that model ends its answers on its own."""
    from banklora.doctor import run_checks

    checks = run_checks(base_model, model_path, tuple(data or ("banking",)))
    for c in checks:
        console.print(f"{'[green]ok[/]  ' if c.ok else '[red]FAIL[/]'} {c.name:<10} {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise BankloraError("some checks failed; see the lines marked FAIL above")
    console.print("everything is ready")


# --------------------------------------------------------------------------------------------- quickstart
@app.command()
@settings_options(defaults=QUICKSTART)
def quickstart(*, flags: dict) -> None:
    """The whole job on the embedded model: data -> train -> compare, then how to chat and serve.

    It trains banklora's recipe on the built-in train split without its question variants (240
    pairs once at lr 1e-3, Gemma's turn tokens trained: 60 steps, the last 12 also against the
    loops of its own greedy answers to 32 training questions), so the whole run fits in 10
    minutes on 2 cores; `banklora train` adds 2 variants of each question (180 steps), whose
    answers loop less and know more of the taught facts (docs/training.md). The compare
    answers the seed's 8 questions and scores the banking-mcq knowledge test. An interrupted
    quickstart continues where it stopped.
    """
    from banklora.basemodel import embedded_checkpoint, is_embedded
    from banklora.config import overrides_from_flags
    from banklora.train import resolve_settings
    from banklora.train import train as run_train

    start = time.perf_counter()
    settings = resolve_settings(None, QUICKSTART | overrides_from_flags(flags), "auto")
    console.rule("[bold]1/3 data")
    if is_embedded(settings.base_model):  # convert the whole model now, as training needs it: converting the tokenizer
        # alone for the data step and the rest later would parse the GGUF twice (+17 s)
        embedded_checkpoint()
    data_stats(data=list(settings.data), split=None, base_model=settings.base_model, max_length=settings.max_length, plot=None)
    console.rule("[bold]2/3 train")
    _print_trained(run_train(settings, resume="auto"))
    console.rule("[bold]3/3 compare")
    output_dir = settings.output_dir
    compare(peft_model_path=[output_dir], questions=None, split=None, max_new_tokens=160, batch_size=COMPARE_BATCH_SIZE, limit=None, report=None,
            base_model=None, compliance_rules=None, fail_below=None, fail_on_regression=False, answers=True, knowledge=None)
    console.rule("[bold]done")
    console.print(f"quickstart finished in {time.perf_counter() - start:.0f} s")
    console.print(f"adapter: {output_dir}", soft_wrap=True)  # paths and commands unbroken, to copy
    console.print(f"report:  {default_report_path(output_dir).with_suffix('.html')} (and .json, .md)", soft_wrap=True)
    console.print(f"chat with it:      banklora chat --model-path {output_dir}", soft_wrap=True)
    console.print(f"serve it:          banklora serve --model-path {output_dir}", soft_wrap=True)
    console.print("                   (OpenAI API at http://127.0.0.1:8000/v1, web chat at /)")
    console.print("a better adapter:  banklora train   (the recipe with 2 variants of each question, ~12 min on 2 cores)")


def main() -> None:
    _setup_logging()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
