"""LoRA training, as a recipe: setup data -> setup model -> setup optimizer -> maybe resume -> fit -> save.

A plain PyTorch loop around a PEFT model, run through `accelerate` so the same loop trains in one
process or under `torchrun` / `accelerate launch` (DDP, DeepSpeed, FSDP). The objective is the
answer-only loss of banklora/loss.py; batches come from banklora/data/batching.py.

The run survives interruptions: checkpoints every `save_every` steps and on Ctrl-C (or SIGTERM)
continue exactly with `--resume` (banklora/checkpoint.py); non-finite steps are skipped, several
in a row abort; the best adapter by validation loss is kept beside the last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from banklora import basemodel, card, checkpoint, destination, kernels, loops, loss, progress, tracking
from banklora.checkpoint import StopRequest, TrainerState, TrainingInterrupted  # noqa: F401  (TrainingInterrupted: part of the API)
from banklora.config import TrainSettings, load_train_settings
from banklora.data.batching import collate, epoch_batches
from banklora.data.augment import augment
from banklora.data.dataset import dataset_hash, load_examples, source_paths
from banklora.data.prepare import Prepared, prepare
from banklora.errors import BankloraError, UsageError
from banklora.io import atomic_write_json
from banklora.inference.fast_paths import contiguous_head_input, packed_linears
from banklora.modeling import ANSWERING_ATTENTION, META_FILE, add_lora, frozen_in_bf16, load, load_tokenizer, merged_adapter, mixed_precision, save_adapter, train_token_ids

log = logging.getLogger(__name__)

OWN_LOOPS_BUDGET = 160  # new tokens per greedy answer when --sequence-unlikelihood looks for the model's loops: compare's budget
BEST_DIR = "best"  # the adapter with the lowest validation loss, inside the final adapter directory
OWN_LOOPS_FILE = "own_loops.json"  # the model's looping answers that --sequence-unlikelihood trains on, kept for --resume
RUN_FILES = (progress.METRICS_FILE, progress.LOSS_CURVE, BEST_DIR, tracking.TENSORBOARD_DIR, tracking.MLFLOW_RUN_FILE, OWN_LOOPS_FILE)  # what a run writes in its checkpoint folder besides step-N
Resume = bool | None | str  # True: continue; False: discard checkpoints; None: refuse if any; "auto": continue if any


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float | None] = field(default_factory=list)
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    meta: dict = field(default_factory=dict)
    main_process: bool = True  # False on the other processes of a multi-process run


@dataclass
class _Run:
    """What the fit loop works with, built by the setup steps."""

    settings: TrainSettings
    accelerator: object
    examples: list
    data: Prepared
    encoded: list  # the train split's token ids, in the data's order
    validation: list  # the validation split's
    tokenizer: object  # the base's, loaded once for the data checks and the model
    loaded: object = None
    peft_model: object = None
    module: torch.nn.Module | None = None  # AnswerLoss, wrapped by accelerate (DDP/FSDP/DeepSpeed) when distributed
    optimizer: torch.optim.Optimizer | None = None
    state: TrainerState | None = None
    total: int = 0
    warmup: int = 0
    steps_per_epoch: int = 0
    resumed_from: int | None = None
    precision: str | None = None  # "bf16": the forward under bf16 autocast over fp32 weights (modeling.mixed_precision)
    epoch_order: tuple[int, list] = (-1, [])  # (epoch, its global batches as indices into encoded)
    trackers: tracking.Trackers | None = None  # on the main process when --report-to names any
    own_loops: loops.OwnLoops | None = None  # --sequence-unlikelihood: found when its steps begin

    @property
    def pad_id(self) -> int:
        pad = self.loaded.tokenizer.pad_token_id
        return pad if pad is not None else 0


def resolve_settings(config_file: Path | None, overrides: dict, resume: Resume) -> TrainSettings:
    """The run's settings; when resuming, the checkpoint's settings stand in for flags not given."""
    settings = load_train_settings(config_file, overrides)
    found = checkpoint.latest(settings.checkpoints) if resume in (True, "auto") else None
    if found is not None:
        settings = load_train_settings(config_file, overrides, base=TrainerState.read(found).settings)
    return settings


def train(settings: TrainSettings, show_progress: bool = True, resume: Resume = None, on_step=None, overwrite: bool = False) -> TrainResult:
    """Train a LoRA adapter as `settings` says and save it atomically to settings.output_dir.

    resume: True = continue from the newest checkpoint in settings.checkpoints; False = discard
    any and start afresh; None = start afresh, but refuse if checkpoints of a run are there;
    "auto" = continue when there is a checkpoint, else start afresh (quickstart, sweep).
    on_step(state) is called after every step (progress hooks, tests).
    overwrite: --output-dir may replace a directory banklora did not write (banklora.destination).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    start = time.perf_counter()
    _check_destinations(settings, overwrite)
    if resume == "auto":
        resume = checkpoint.latest(settings.checkpoints) is not None or None
    on_cpu = not torch.cuda.is_available()
    precision = mixed_precision(settings.dtype, torch.device("cpu")) if on_cpu else None
    # accelerate keeps one AcceleratorState per process, and a second Accelerator silently inherits the first's
    # mixed precision: a fp32 run after a bf16 one (sweep, tests, notebooks) would train in bf16. Reset it (the
    # process group, PartialState, stays).
    AcceleratorState._reset_state()
    # cpu=True: multi-process CPU runs use gloo; mixed_precision: accelerate runs the forward under bf16 autocast
    run = _Run(settings, Accelerator(cpu=on_cpu, mixed_precision=precision), *_setup_data(settings))
    run.precision = precision
    found = _setup_checkpoints(run, resume)
    try:
        _setup_model(run)
        _setup_optimizer(run)
        if resume:
            _resume(run, found)
        if run.accelerator.is_main_process and settings.report_to:
            run.trackers = tracking.Trackers(settings.report_to, settings.checkpoints, settings.output_dir, settings.to_dict(), run.resumed_from)
        _log_start(run, found)
        before = run.state.elapsed  # fitting time of the interrupted part, when resuming
        stopped_early = _fit(run, show_progress, on_step)
        result = _save(run, time.perf_counter() - start + before, stopped_early)
    except BaseException:
        if run.trackers is not None:
            run.trackers.close(finished=False)
        if run.accelerator.is_main_process and checkpoint.latest(settings.checkpoints) is None:
            checkpoint.remove_run(settings.checkpoints, RUN_FILES)  # nothing to resume from: leave no litter
        raise
    run.accelerator.wait_for_everyone()
    return result


def _check_destinations(s: TrainSettings, overwrite: bool) -> None:
    """0) where the adapter and the checkpoints go, refused before anything loads when banklora
    must not write there (banklora.destination): never the base, the data or the caches."""
    reads = basemodel.read_paths(s.base_model) + source_paths(s.data)
    output = destination.check(s.output_dir, "--output-dir", directory=True, overwrite=overwrite, reads=reads,
                               ours=destination.holds(META_FILE), example="outputs/my_adapter").resolve()
    # the checkpoint folder keeps the user's own files (only the run's are removed): no --overwrite needed
    ckpt = destination.check(s.checkpoints, "--checkpoint-dir", directory=True, overwrite=True, reads=reads).resolve()
    if ckpt == output or ckpt in output.parents or output in ckpt.parents:
        raise UsageError(f"--checkpoint-dir {s.checkpoints} and --output-dir {s.output_dir} must be separate folders, neither inside the other: "
                         "the checkpoints are removed once the adapter is saved")


# ---------------------------------------------------------------------------------------------
# setup


def _setup_data(settings: TrainSettings) -> tuple[list, Prepared, list, list, object]:
    """1) the data, checked (privacy, duplicates, lengths, --strict) before any weights load."""
    examples = load_examples(settings.data)
    if settings.augment:
        from accelerate import PartialState

        before = len(examples)
        examples = augment(examples, settings.augment)
        if PartialState().is_main_process and any(e.split == "train" for e in examples):
            if len(examples) > before:
                log.info("--augment %d: %d question variants added to the training split", settings.augment, len(examples) - before)
            else:
                log.warning("--augment %d: none of the training examples could be varied (conversations in chat format and variants "
                            "already made by banklora data augment are not); training on them as written", settings.augment)
    tokenizer = load_tokenizer(settings.base_model)
    train_token_ids(tokenizer, settings.lora.train_tokens)  # a token the tokenizer lacks: a sentence before any weights load
    data = prepare(examples, tokenizer, settings.max_length, strict=settings.strict, redact=settings.redact)
    encoded, validation = data.split("train")[1], data.split("validation")[1]
    if not encoded:
        raise UsageError(f"no training examples left in {', '.join(settings.data)} ({data.summary()}); check the split fields and --max-length")
    if settings.early_stopping_patience and not validation:
        raise UsageError("--early-stopping-patience needs validation examples (split: validation) in the data")
    return examples, data, encoded, validation, tokenizer


def _setup_checkpoints(run: _Run, resume: bool | None) -> Path | None:
    """2) an earlier run's checkpoints: continue them, discard them, or refuse to guess."""
    s, acc = run.settings, run.accelerator
    found = checkpoint.latest(s.checkpoints)
    if resume and found is None:
        raise UsageError(f"--resume: no complete checkpoint in {s.checkpoints}; start without --resume")
    if resume is None and found is not None:
        raise UsageError(f"{s.checkpoints} holds checkpoints of an unfinished run ({found.name}); add --resume to continue it, or --no-resume to discard them and start afresh")
    if resume:  # checked before the model loads: a refusal costs nothing
        checkpoint.check_resumable(found, s.to_dict(), dataset_hash(run.examples), acc.num_processes)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not resume:
            checkpoint.remove_run(s.checkpoints, RUN_FILES)
        checkpoint.clean_leftovers(s.checkpoints)
        s.checkpoints.mkdir(parents=True, exist_ok=True)
    return found


def _setup_model(run: _Run) -> None:
    """3) the base model (its weights verified) with trainable LoRA layers."""
    s, acc = run.settings, run.accelerator
    if s.low_memory:
        kernels.return_freed_memory()
    torch.manual_seed(s.seed)  # LoRA's initialisation
    run.loaded = load(s.base_model, dtype="fp32" if run.precision else s.dtype, training=True, device=str(acc.device), quantize=s.quantize, verify=True, tokenizer=run.tokenizer)
    run.peft_model = add_lora(run.loaded.model, s.lora, quantized=bool(s.quantize), tokenizer=run.loaded.tokenizer)
    # a name other machines can resolve (the hub id the base came from); the local path and sha256 are in the metadata
    run.peft_model.peft_config["default"].base_model_name_or_path = run.loaded.base.hub_id
    kernels.install(run.peft_model)  # same math, less kept for backward (banklora/kernels.py)
    if s.neftune_alpha:
        run.peft_model.get_input_embeddings().register_forward_hook(neftune_hook(s.neftune_alpha))
    run.peft_model.train()
    torch.manual_seed(s.seed + acc.process_index)  # dropout differs per process


def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023, as TRL and transformers apply it): while training, add uniform
    noise in +-alpha / sqrt(L x d) to the embedding output (B, L, d); validation and inference
    (module.eval()) see the clean embeddings. Gemma scales its embeddings inside the module, so the
    noise lands on what the decoder reads."""

    def hook(module, args, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


def _setup_optimizer(run: _Run) -> None:
    """4) AdamW over the LoRA weights, the loss module, and the step budget."""
    s, acc = run.settings, run.accelerator
    trainable = [p for p in run.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    engine = _engine(acc)
    if engine == "deepspeed":
        # no DataLoader goes through prepare(), so DeepSpeed is told the batch size directly
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s.batch_size
    if engine and s.save_every:
        log.warning("%s run: resumable checkpoints are off (they cover single-process and DDP runs)", engine)
        run.settings = s = dataclasses.replace(s, save_every=0)
    if engine and s.sequence_unlikelihood:
        log.warning("%s run: --sequence-unlikelihood is off (the model answers with its whole weights, which %s shards)", engine, engine)
        run.settings = s = dataclasses.replace(s, sequence_unlikelihood=0.0)
    head_chunk = loss.LOW_MEMORY_HEAD_CHUNK if s.low_memory else None
    run.module, run.optimizer = acc.prepare(loss.AnswerLoss(run.peft_model, head_chunk, s.unlikelihood, s.unlikelihood_context,
                                                            s.sequence_unlikelihood), optimizer)
    run.steps_per_epoch = math.ceil(len(run.encoded) / (s.batch_size * acc.num_processes))
    run.total = s.max_steps or math.ceil(s.epochs * run.steps_per_epoch)
    run.warmup = s.warmup_for(run.total)
    run.state = TrainerState(settings=s.to_dict(), dataset_sha256=dataset_hash(run.examples), processes=acc.num_processes)


def _resume(run: _Run, found: Path) -> None:
    """5) continue exactly: weights, optimizer moments, random state, step."""
    if _engine(run.accelerator):
        raise UsageError(f"--resume works for single-process and DDP runs; {_engine(run.accelerator)} shards the optimizer state banklora's checkpoints hold")
    run.state = checkpoint.restore(found, run.peft_model, run.optimizer, run.accelerator)
    run.state.processes = run.accelerator.num_processes
    run.resumed_from = run.state.step
    if run.accelerator.is_main_process:
        progress.rewrite_up_to(run.settings.checkpoints / progress.METRICS_FILE, run.state.step)


def _log_start(run: _Run, found: Path | None) -> None:
    acc = run.accelerator
    if acc.is_main_process:
        log.info("data: %s", run.data.summary())
        log.info("training %s LoRA parameters on %d examples for %d steps (warmup %d, global batch %d on %d process%s) on %s/%s%s",
                 f"{_trainable_count(run):,}", len(run.encoded), run.total, run.warmup, run.settings.batch_size * acc.num_processes,
                 acc.num_processes, "es" if acc.num_processes > 1 else "", acc.device, card.precision(run),
                 f"; resumed at step {run.state.step} from {found}" if run.resumed_from is not None else "")


def _trainable_count(run: _Run) -> int:
    return sum(p.numel() for p in run.peft_model.parameters() if p.requires_grad)


def _engine(accelerator) -> str | None:
    """"deepspeed" or "fsdp" when `accelerate launch` runs under one of them, else None (one process or DDP)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind)


# ---------------------------------------------------------------------------------------------
# fit


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate of `step` (0-based) as a fraction of the peak:
    1) linear warmup over `warmup` steps, 2) cosine decay to 10% of the peak at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))


def _fit(run: _Run, show_progress: bool, on_step) -> bool:
    """The loop. Returns True when early stopping ended it before the last step."""
    s, acc, state = run.settings, run.accelerator, run.state
    main = acc.is_main_process
    bad_in_row, tokens_here, fit_start, stop_early = 0, 0, time.perf_counter(), False
    with StopRequest() as stop, progress.Progress(run.total, state.step, show_progress and main) as bar:
        while state.step < run.total:
            step_loss, grad_norm, n_seen = _train_step(run)
            lr = s.lr * lr_factor(state.step, run.warmup, run.total)
            stepped = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
            if stepped:
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            bad_in_row = 0 if stepped else bad_in_row + 1
            state.step += 1
            state.tokens += n_seen
            tokens_here += n_seen
            rate = tokens_here / (time.perf_counter() - fit_start)
            state.losses.append(round(step_loss, 6) if math.isfinite(step_loss) else None)
            if not stepped:
                state.skipped_steps.append(state.step)
            if main:
                reason = None if stepped else "non-finite loss" if not math.isfinite(step_loss) else "non-finite gradient norm"
                _log_step(run, step_loss, grad_norm, lr, rate, state.elapsed + time.perf_counter() - fit_start, reason)
                bar.update(state.step, (f"loss {step_loss:.4f}" if math.isfinite(step_loss) else "loss n/a (skipped)") + f"  {rate:,.0f} tok/s")
            if bad_in_row >= s.max_bad_steps:
                last = checkpoint.latest(s.checkpoints)
                raise BankloraError(
                    f"training diverged: {bad_in_row} steps in a row (up to step {state.step}) had a non-finite loss or gradient norm; "
                    f"lower --lr (now {s.lr:g}) or check the data. No adapter was written" + (f"; the last good checkpoint is {last}" if last else "")
                )
            epoch_end = state.step % run.steps_per_epoch == 0
            if run.validation and (epoch_end or state.step == run.total or (s.eval_every and state.step % s.eval_every == 0)):
                stop_early = _validate(run, bar if main else None)
            if on_step is not None:
                on_step(state)
            _maybe_checkpoint(run, stop, fit_start, stop_early)
            if stop_early:
                if main:
                    log.info("early stopping at step %d: no better validation loss in %d evaluations (best %.4f at step %d)",
                             state.step, s.early_stopping_patience, state.best["loss"], state.best["step"])
                break
    state.elapsed += time.perf_counter() - fit_start
    return stop_early and state.step < run.total


def _train_step(run: _Run) -> tuple[float, float | None, int]:
    """One global batch: forward, backward (unless the loss is not finite), clip.
    Returns (mean answer-token loss over the global batch, gradient norm, tokens seen)."""
    s, acc, state = run.settings, run.accelerator, run.state
    world, rank = acc.num_processes, acc.process_index
    # 1) this step's examples: the global batch, split across processes
    epoch, k = divmod(state.step, run.steps_per_epoch)
    if run.epoch_order[0] != epoch:
        lengths = [len(e) for e in run.encoded]
        run.epoch_order = (epoch, epoch_batches(lengths, s.batch_size * world, s.seed, epoch, s.group_by_length))
    global_batch = run.epoch_order[1][k]
    local = global_batch[rank::world]
    weight = 1.0 if local else 0.0  # a process with no example left runs a dummy that counts for nothing
    rows = [run.encoded[i] for i in local or global_batch[:1]]
    if s.sequence_unlikelihood and state.step >= run.total - s.sequence_unlikelihood_steps:
        rows += _own_loops(run).pick(s.batch_size * world, s.seed * 100_003 + state.step)[rank::world] if local else []
    batch = {key: v.to(acc.device) for key, v in collate(rows, run.pad_id).items()}
    # 2) forward; the loss is the mean over the global batch's answer tokens
    objective, n_tokens, loss_sum = run.module(**batch)  # the objective is the loss unless --unlikelihood adds to it
    objective, n_tokens, loss_sum = objective * weight, n_tokens * weight, loss_sum * weight
    n_seen = batch["attention_mask"].sum().to(n_tokens.dtype) * weight
    totals = torch.stack([loss_sum, n_tokens, n_seen, objective.detach()])  # one collective per step for all the sums
    totals = acc.reduce(totals, "sum") if world > 1 else totals
    step_loss = (totals[0] / totals[1].clamp(min=1)).item()
    # 3) backward and clip, unless the loss is not finite
    grad_norm: float | None = float("nan")
    if math.isfinite(step_loss) and math.isfinite(totals[3].item()):
        acc.backward(objective * world / totals[1].clamp(min=1))  # DDP averages: x world gives the global mean's gradient
        norm = acc.clip_grad_norm_([p for p in run.peft_model.parameters() if p.requires_grad], s.max_grad_norm)
        grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
    return step_loss, grad_norm, int(totals[2])


def _own_loops(run: _Run) -> loops.OwnLoops:
    """The model's looping answers to training questions (--sequence-unlikelihood), found once when
    its steps begin: greedy, with the weights it answers with (bf16 where the run is), on a
    sample of the training questions fixed by the seed. Kept in the checkpoint folder, so a run
    resumed inside those steps trains on the same answers."""
    if run.own_loops is not None:
        return run.own_loops
    s, acc = run.settings, run.accelerator
    kept = s.checkpoints / OWN_LOOPS_FILE
    if run.resumed_from is not None and kept.is_file():
        from banklora.data.format import Encoded

        saved = json.loads(kept.read_text())
        run.own_loops = loops.OwnLoops([Encoded(**a) for a in saved["answers"]], saved["prompts"], saved["looped"], saved["tokens"])
        return run.own_loops
    start = time.perf_counter()
    questions = run.data.split("train")[0]
    sample = random.Random(s.seed).sample(questions, min(s.sequence_unlikelihood_prompts, len(questions)))
    with _answering(run):
        run.own_loops = loops.own_loops(run.peft_model, run.loaded.tokenizer, sample, budget=OWN_LOOPS_BUDGET)
    if acc.is_main_process:
        log.info("sequence unlikelihood (%.0f s): %s", time.perf_counter() - start, run.own_loops.summary())
        _record(run, {"step": run.state.step, "own_loops": run.own_loops.to_dict()})
        atomic_write_json(kept, run.own_loops.to_dict() | {"answers": [dataclasses.asdict(a) for a in run.own_loops.answers]}, indent=None)
    return run.own_loops


@contextlib.contextmanager
def _answering(run: _Run):
    """The model as it answers after training, for greedy answers in the middle of a run or at
    its end: eval mode, bf16 weights in a bf16 mixed-precision run (as compare, chat and serve load
    it here) with the adapter merged into those copies (as chat answers: measured 1.3x faster than
    the LoRA products beside them, 32 answers 15.5 -> 12 s), SDPA attention where training runs
    eager (as `load` loads a model for answering: 48 answers 23 -> 17 s), the LM head's input
    contiguous and the frozen linears packed; all put back after. The fp32 weights the run trains
    over are never merged into: merging and unmerging them would move them by float rounding."""
    causal_lm = run.peft_model.get_base_model()
    was_training, trained_with = run.peft_model.training, causal_lm.config._attn_implementation
    run.peft_model.eval()
    causal_lm.set_attn_implementation(ANSWERING_ATTENTION)
    contiguous_head_input(run.peft_model)
    try:
        with _merged_into_bf16_copies(run.peft_model) if run.precision == "bf16" else contextlib.nullcontext(), packed_linears(run.peft_model):
            yield
    finally:
        causal_lm.set_attn_implementation(trained_with)
        run.peft_model.train(was_training)


@contextlib.contextmanager
def _merged_into_bf16_copies(peft_model):
    """The base's weights as bf16 copies (frozen_in_bf16) with the adapter merged into them (PEFT's
    merge_adapter) while the block runs; unmerged, and the fp32 weights put back, after. Merging
    happens only here, inside the copies, never into the weights a run trains over."""
    with frozen_in_bf16(peft_model), merged_adapter(peft_model, copies=False):
        yield


def _log_step(run: _Run, step_loss: float, grad_norm, lr: float, rate: float, elapsed: float, skipped: str | None) -> None:
    state = run.state
    record = {"step": state.step, "total_steps": run.total, "epoch": round(state.step / run.steps_per_epoch, 4), "loss": state.losses[-1],
              "grad_norm": None if grad_norm is None else round(grad_norm, 6), "lr": lr, "tokens": state.tokens,
              "tokens_per_second": round(rate, 1), "elapsed_s": round(elapsed, 2)}
    if skipped:
        record["skipped"] = skipped
        log.warning("step %d skipped: %s", state.step, skipped)
    _record(run, record)


def _record(run: _Run, record: dict) -> None:
    """A step's, validation's or check's record: into metrics.jsonl and the trackers (--report-to)."""
    progress.append(run.settings.checkpoints / progress.METRICS_FILE, record)
    if run.trackers is not None:
        run.trackers.log(record)


def _maybe_checkpoint(run: _Run, stop: StopRequest, fit_start: float, stop_early: bool) -> None:
    """Checkpoints every save_every steps, and when asked to stop (then stop)."""
    s, acc, state = run.settings, run.accelerator, run.state
    stop_now = stop.requested
    if acc.num_processes > 1:
        stop_now = bool(acc.reduce(torch.tensor(int(stop_now), device=acc.device), "sum"))
    if not (stop_now or (s.save_every and state.step % s.save_every == 0 and state.step < run.total and not stop_early)):
        return
    saved_state = dataclasses.replace(state, elapsed=state.elapsed + time.perf_counter() - fit_start)
    checkpoint.save(s.checkpoints, saved_state, run.peft_model, run.optimizer, acc, s.keep_checkpoints)
    if stop_now:
        raise TrainingInterrupted(
            f"training stopped at step {state.step} of {run.total}; checkpoint {s.checkpoints / f'step-{state.step:06d}'}. "
            f"Continue exactly where it stopped with: banklora train --output-dir {s.output_dir} --resume"
            + (" (under the same launcher and number of processes)" if acc.num_processes > 1 else "")
        )


@torch.no_grad()
def _validate(run: _Run, bar) -> bool:
    """Validation loss over all processes; keeps the best adapter. Returns True to stop early."""
    s, acc, state = run.settings, run.accelerator, run.state
    world, rank = acc.num_processes, acc.process_index
    validation = run.validation
    mine = sorted(validation, key=len)[rank::world]  # similar lengths together: less padding
    # every process runs the same number of forwards (DDP syncs buffers on each): pad with dummies
    n_batches = math.ceil(math.ceil(len(validation) / world) / s.batch_size)
    run.module.eval()
    sums = torch.zeros(2, device=acc.device)  # (loss sum, answer tokens)
    for i in range(n_batches):
        chunk = mine[i * s.batch_size : (i + 1) * s.batch_size]
        batch = {k: v.to(acc.device) for k, v in collate(chunk or validation[:1], run.pad_id).items()}
        _, n, loss_sum = run.module(**batch)
        if chunk:
            sums += torch.stack([loss_sum, n])
    run.module.train()
    if world > 1:
        sums = acc.reduce(sums, "sum")
    val = (sums[0] / sums[1].clamp(min=1)).item()
    improved = math.isfinite(val) and (state.best is None or val < state.best["loss"] - s.early_stopping_min_delta)
    state.validation.append({"step": state.step, "loss": round(val, 6) if math.isfinite(val) else None})
    if improved:
        state.best = {"step": state.step, "loss": round(val, 6)}
        state.evals_without_improvement = 0
        if acc.is_main_process:
            save_adapter(run.peft_model, run.loaded.tokenizer, s.checkpoints / BEST_DIR, card.training_metadata(run, wall=state.elapsed) | {"best": state.best})
    else:
        state.evals_without_improvement += 1
    acc.wait_for_everyone()
    if bar is not None:
        _record(run, {"step": state.step, "validation_loss": state.validation[-1]["loss"], "best": improved})
        bar.print(f"step {state.step}: validation loss {val:.4f}{' (best so far)' if improved else ''}")
    return bool(s.early_stopping_patience) and state.evals_without_improvement >= s.early_stopping_patience


# ---------------------------------------------------------------------------------------------
# save


def _turn_end(run: _Run) -> dict:
    """The turn-end check on the validation split (banklora/evaluation/turn_end.py): logged, in
    metrics.jsonl, and returned for the metadata; a warning names the fix when answers do not end."""
    from banklora.evaluation import turn_end

    start = time.perf_counter()
    # a run in bf16 mixed precision is checked with bf16 weights, as compare, chat and serve load it here; the LM
    # head takes its input contiguous, as the loader arranges for answering (measured: the check 45 -> 24 s on 16 answers)
    with _answering(run):
        result = turn_end.check(run.peft_model, run.loaded.tokenizer, run.data.split("validation")[0], budget=run.settings.turn_end_budget)
    log.info("turn-end check on %d validation examples (%.0f s): %s", result.prompts, time.perf_counter() - start, result.summary())
    if result.warning():
        log.warning(result.warning())
    _record(run, {"step": run.state.step, "turn_end": result.to_dict()})
    return result.to_dict()


def _unsaved(run: _Run, output: Path, exc: OSError) -> str:
    """The sentence for an adapter that could not be written, after keeping the trained run as a
    checkpoint that --resume finishes (single-process runs; the others keep their last one)."""
    s = run.settings
    said = f"could not write the adapter to {output} ({exc.strerror or exc})"
    if run.accelerator.num_processes > 1:
        return f"{said}; the newest checkpoint in {s.checkpoints} is kept"
    try:
        kept = checkpoint.save(s.checkpoints, run.state, run.peft_model, run.optimizer, run.accelerator, s.keep_checkpoints)
    except OSError as again:
        return f"{said}, nor a checkpoint to {s.checkpoints} ({again.strerror or again}); make room and train again"
    return (f"{said}; the trained run is kept as checkpoint {kept}: make room (or fix the folder), then finish it with "
            f"banklora train --output-dir {s.output_dir} --resume")


def _save(run: _Run, wall: float, stopped_early: bool) -> TrainResult:
    s, acc, state = run.settings, run.accelerator, run.state
    run.peft_model.eval()
    meta = card.training_metadata(run, wall) | {"stopped_early": stopped_early}
    if run.own_loops is not None:
        meta["own_loops"] = run.own_loops.to_dict()
    if acc.is_main_process and s.turn_end_budget and run.validation and not _engine(acc):
        try:
            meta["turn_end"] = _turn_end(run)
        except Exception as exc:  # a diagnosis must never cost the trained adapter
            log.warning("the turn-end check failed (%s: %s); the adapter is saved without it", type(exc).__name__, exc)
    output = Path(s.output_dir)
    full = acc.get_state_dict(run.module) if _engine(acc) == "fsdp" else None  # every process takes part in the gather
    if acc.is_main_process:
        if full is not None:
            full = {k.removeprefix("peft_model."): v for k, v in full.items()}
        curve = s.checkpoints / progress.LOSS_CURVE
        progress.plot_loss_curve(state.losses, state.validation, curve, title=f"{output.name}: loss per step")
        extras = {progress.METRICS_FILE: s.checkpoints / progress.METRICS_FILE, progress.LOSS_CURVE: curve}
        if run.trackers is not None:
            run.trackers.close(finished=True)  # the event files complete before they are copied
            run.trackers = None
        for name in (BEST_DIR, tracking.TENSORBOARD_DIR):
            if (s.checkpoints / name).is_dir():
                extras[name] = s.checkpoints / name
        try:
            save_adapter(run.peft_model, run.loaded.tokenizer, output, meta, extras, state_dict=full)
        except OSError as exc:  # a full disk, a folder gone: the trained run must not go with it
            raise BankloraError(_unsaved(run, output, exc)) from exc
        checkpoint.remove_run(s.checkpoints, RUN_FILES)  # the run is complete: its checkpoints have served
        finite = [x for x in state.losses if x is not None]
        log.info("adapter saved to %s (loss %.4f -> %.4f, %.0f s)%s", output, finite[0] if finite else float("nan"),
                 finite[-1] if finite else float("nan"), wall, f"; best validation adapter in {output / BEST_DIR}" if state.best else "")
    return TrainResult(output, state.losses, wall, state.tokens / max(1e-9, state.elapsed), meta, acc.is_main_process)
