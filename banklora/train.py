"""LoRA training: setup -> fit -> save.

A plain PyTorch loop around a PEFT model, run through `accelerate` so the same loop trains in one
process or under `torchrun` / `accelerate launch` (DDP, DeepSpeed, FSDP). The loss computes logits
only at answer positions: the LM head (262,144 x 640 for Gemma 3 270M) is ~60% of the model's
FLOPs and its fp32 logits cost 1 MiB per token, so skipping prompt and padding positions is exact
and the biggest CPU win.

The run survives interruptions: checkpoints every `save_every` steps and on Ctrl-C (or SIGTERM)
continue exactly with `--resume` (banklora/checkpoint.py); non-finite steps are skipped, several
in a row abort; the best adapter by validation loss is kept beside the last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import banklora
from banklora import checkpoint, kernels
from banklora.checkpoint import TrainerState
from banklora.config import RESUMABLE_CHANGES, TrainSettings, load_train_settings
from banklora.data.dataset import dataset_hash, load_examples
from banklora.data.format import IGNORE_INDEX, Encoded
from banklora.data.prepare import prepare
from banklora.errors import BankloraError, UsageError
from banklora.modeling import atomic_write_text, load, save_adapter

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # one JSON record per step and per validation
LOSS_CURVE = "loss_curve.png"
BEST_DIR = "best"  # the adapter with the lowest validation loss, inside the final adapter directory


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    meta: dict = field(default_factory=dict)
    main_process: bool = True  # False on the other processes of a multi-process run


# ---------------------------------------------------------------------------------------------
# setup


def setup_lora(model, settings: TrainSettings):
    """Wrap a base model with trainable LoRA layers (PEFT)."""
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "vision" not in name})
    unknown = [t for t in lora.target_modules if t not in linear]
    if unknown:
        raise UsageError(f"--lora-targets: {', '.join(unknown)} is not a linear layer of this model; choose from {', '.join(linear)}")
    targets: list[str] | str = list(lora.target_modules)
    if any("vision_tower" in name for name, _ in model.named_modules()):
        # Gemma 3 4B and larger carry a vision tower: adapt the language model only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})"
    if settings.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    kernels.install(peft_model)  # same math, less kept for backward (banklora/kernels.py)
    return peft_model


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# the loss


HEAD_CHUNK = 128  # answer tokens per LM-head chunk: (128, 262,144) fp32 logits = 128 MiB
LOW_MEMORY_HEAD_CHUNK = 64  # --low-memory: 64 MiB chunks (measured: 0.9x the speed, 170 MiB less at peak)


def _loss_and_softmax_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and softmax of `logits` (V, n): one column per token, the softmax
    written over the logits in place (one exp pass and one (V, n) buffer, where cross_entropy
    followed by softmax takes two of each). The loss is log-sum-exp minus the target's logit, as
    log_softmax computes it."""
    target_logit = logits.gather(0, targets[None, :])[0]
    top = logits.amax(dim=0, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=0, keepdim=True)
    loss = (top + total.log())[0] - target_logit
    return loss, probs.div_(total)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Cross-entropy of a frozen LM head over hidden states, HEAD_CHUNK rows at a time.

    Forward computes each chunk's logits, its per-token loss and, at once, the loss's gradient
    with respect to the hidden state, W^T @ ((softmax - onehot) x softcap'), then drops the
    logits. Backward only scales those stored (N, H) gradients. So the step never holds more than
    one chunk of logits (vs 1 MiB per token for fp32 logits kept for backward), and nothing is
    computed twice. The head's weight is frozen in LoRA training, so it needs no gradient.
    Logits are laid out (V, n), vocabulary first: W @ h^T and W^T @ P run 1.3-1.7x faster on CPU
    than h @ W^T and P @ W (measured on 2 cores), for the same products.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk):
        losses, grads = [], []
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            logits = torch.mm(weight, h.T).float()  # (V, n)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            if not ctx.needs_input_grad[0]:
                losses.append(F.cross_entropy(logits.T, t, reduction="none"))  # the same kernel as the model's own loss
                continue
            slope = 1 - (logits / cap) ** 2 if cap else None  # d(cap * tanh(z / cap)) / dz, before the softmax overwrites them
            loss, dlogits = _loss_and_softmax_(logits, t)
            losses.append(loss)
            dlogits[t, torch.arange(len(t), device=t.device)] -= 1  # softmax - onehot
            if cap:
                dlogits *= slope
            grads.append(torch.mm(weight.T, dlogits.to(weight.dtype)).T.to(hidden.dtype))  # (n, H)
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(0))
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_losses):
        (grads,) = ctx.saved_tensors
        return grads * grad_losses[:, None].to(grads.dtype), None, None, None, None


def token_losses(model, batch: dict[str, torch.Tensor], head_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at each answer token, (N,), and the mask that placed them, (B, T-1).

    Logits are computed only at the N answer positions (the LM head never sees prompt or
    padding), in chunks, with the gradient taken as they go (_ChunkedHeadLoss). Exact: equal to
    the model's own loss and gradients within float rounding (tested).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal_lm.model, causal_lm.lm_head
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    rows, wanted = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or head.bias is not None:  # int8, trained or biased head
        logits = head(rows).float()
        logits = torch.tanh(logits / cap) * cap if cap else logits
        return F.cross_entropy(logits, wanted, reduction="none"), keep
    return _ChunkedHeadLoss.apply(rows, head.weight, wanted, cap, head_chunk or HEAD_CHUNK), keep


def answer_loss(model, batch: dict[str, torch.Tensor], per_example: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, with logits computed only there.

    Equal (to float rounding) to the model's own loss with `labels=`, at a fraction of the cost.
    per_example=True returns each row's own mean, shape (B,): what reference perplexity needs.
    """
    token_loss, keep = token_losses(model, batch)
    if not per_example:
        return token_loss.mean()
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], device=token_loss.device).index_add_(0, rows, token_loss)
    return sums / keep.sum(dim=1).clamp(min=1)


class AnswerLoss(torch.nn.Module):
    """The PEFT model and its answer-only loss as one module, so DDP / FSDP / DeepSpeed wrap the
    whole computation (their gradient hooks need the forward to run through the wrapper)."""

    def __init__(self, peft_model, head_chunk: int | None = None):
        super().__init__()
        self.peft_model, self.head_chunk = peft_model, head_chunk

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of answer-token losses, number of answer tokens): the caller normalises globally."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        token_loss, _ = token_losses(self.peft_model, batch, self.head_chunk)
        return token_loss.sum(), torch.tensor(token_loss.numel(), device=token_loss.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# fit


def _schedule(step: int, warmup: int, total: int) -> float:
    """1) linear warmup, 2) cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """The global batches of one epoch: a function of (seed, epoch), so a resumed run sees the same.

    by_length: shuffle, sort each window of 64 batches by length, cut into batches, shuffle the
    batches. Each batch then holds examples of similar length, so little compute goes to padding,
    while every epoch still sees the examples in a new random mix.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not by_length:
        return [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    window = 64 * global_batch  # a multiple of the batch: only the epoch's last batch can be short
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    rng.shuffle(batches)
    return batches


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, write a checkpoint, stop.
    A second Ctrl-C stops at once, without a checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step to write a checkpoint (press Ctrl-C again to stop at once, without one)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(BankloraError):
    exit_code = 130


@dataclass
class _Run:
    """What the fit loop works with, built by _setup."""

    settings: TrainSettings
    accelerator: object
    loaded: object
    peft_model: object
    module: torch.nn.Module  # AnswerLoss, wrapped by accelerate (DDP/FSDP/DeepSpeed) when distributed
    optimizer: torch.optim.Optimizer
    examples: list
    data: object
    encoded: list[Encoded]
    validation: list[Encoded]
    pad_id: int
    total: int
    warmup: int
    steps_per_epoch: int
    state: TrainerState
    n_trainable: int
    resumed_from: int | None = None


def resolve_settings(config_file: Path | None, overrides: dict, resume: bool | None) -> TrainSettings:
    """The run's settings; when resuming, the checkpoint's settings stand in for flags not given."""
    settings = load_train_settings(config_file, overrides)
    found = checkpoint.latest(settings.checkpoints) if resume else None
    if found is not None:
        settings = load_train_settings(config_file, overrides, base=TrainerState.read(found).settings)
    return settings


def train(settings: TrainSettings, show_progress: bool = True, resume: bool | None = None, on_step=None) -> TrainResult:
    """Train a LoRA adapter as `settings` says and save it atomically to settings.output_dir.

    resume: True = continue from the newest checkpoint in settings.checkpoints; False = discard
    any and start afresh; None = start afresh, but refuse if checkpoints of a run are there.
    on_step(state) is called after every step (progress hooks, tests).
    """
    start = time.perf_counter()
    run = _setup(settings, resume)
    before = run.state.elapsed  # fitting time of the interrupted part, when resuming
    stopped_early = _fit(run, show_progress, on_step)
    result = _save(run, time.perf_counter() - start + before, stopped_early)
    run.accelerator.wait_for_everyone()
    return result


def _setup(settings: TrainSettings, resume: bool | None) -> _Run:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: multi-process CPU runs use gloo
    main = accelerator.is_main_process
    if settings.low_memory:
        _return_freed_memory()
    if settings.quantize:
        _check_qlora(accelerator.device)
    # 1) data
    torch.manual_seed(settings.seed)
    examples = load_examples(settings.data)
    loaded = load(settings.base_model, dtype=settings.dtype, training=True, device=str(accelerator.device), quantize=settings.quantize)
    data = prepare(examples, loaded.tokenizer, settings.max_length, strict=settings.strict, redact=settings.redact)
    _, encoded = data.split("train")
    _, validation = data.split("validation")
    if not encoded:
        raise UsageError(f"no training examples left in {', '.join(settings.data)} ({data.summary()}); check the split fields and --max-length")
    if settings.early_stopping_patience and not validation:
        raise UsageError("--early-stopping-patience needs validation examples (split: validation) in the data")
    # 2) checkpoints of an earlier run
    ckdir = settings.checkpoints
    found = checkpoint.latest(ckdir)
    if resume and found is None:
        raise UsageError(f"--resume: no complete checkpoint in {ckdir}; start without --resume")
    if resume is None and found is not None:
        raise UsageError(f"{ckdir} holds checkpoints of an unfinished run ({found.name}); add --resume to continue it, or --no-resume to discard them and start afresh")
    accelerator.wait_for_everyone()
    if main:
        if not resume:
            shutil.rmtree(ckdir, ignore_errors=True)
        checkpoint.clean_leftovers(ckdir)
        ckdir.mkdir(parents=True, exist_ok=True)
    # 3) model, LoRA, optimizer
    model = setup_lora(loaded.model, settings)
    model.train()
    torch.manual_seed(settings.seed + accelerator.process_index)  # dropout differs per process
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    engine = _engine(accelerator)
    if engine == "deepspeed":
        # no DataLoader goes through prepare(), so DeepSpeed is told the batch size directly
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = settings.batch_size
    if engine and (resume or settings.save_every):
        if resume:
            raise UsageError(f"--resume works for single-process and DDP runs; {engine} shards the optimizer state banklora's checkpoints hold")
        log.warning("%s run: resumable checkpoints are off (they cover single-process and DDP runs)", engine)
        settings = dataclasses.replace(settings, save_every=0)
    module, optimizer = accelerator.prepare(AnswerLoss(model, LOW_MEMORY_HEAD_CHUNK if settings.low_memory else None), optimizer)
    global_batch = settings.batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(len(encoded) / global_batch)
    total = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    state = TrainerState(settings=settings.to_dict(), dataset_sha256=dataset_hash(examples))
    resumed_from = None
    if resume:
        state = _resume(found, settings, state, model, optimizer, accelerator)
        resumed_from = state.step
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    run = _Run(settings, accelerator, loaded, model, module, optimizer, examples, data, encoded, validation, pad_id, total,
               settings.warmup_for(total), steps_per_epoch, state, sum(p.numel() for p in trainable), resumed_from)
    if main:
        log.info("data: %s", data.summary())
        log.info(
            "training %s LoRA parameters on %d examples for %d steps (warmup %d, global batch %d on %d process%s) on %s/%s%s",
            f"{run.n_trainable:,}", len(encoded), total, run.warmup, global_batch, accelerator.num_processes,
            "es" if accelerator.num_processes > 1 else "", accelerator.device, str(loaded.dtype).removeprefix("torch."),
            f"; resumed at step {state.step} from {found}" if resume else "",
        )
        _rewrite_metrics(ckdir / METRICS_FILE, state.step)
    return run


def _return_freed_memory() -> None:
    """--low-memory: allocations of 1 MiB and more (activations) get their own mappings, returned
    to the OS when freed, instead of glibc's heap, whose fragments otherwise keep ~800 MiB of the
    270M model's peak resident. Costs page faults: ~0.8x the step speed (measured, 2 cores)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if libc.mallopt(-3, 1 << 20) != 1:  # M_MMAP_THRESHOLD
            raise OSError("mallopt refused M_MMAP_THRESHOLD")
    except (OSError, AttributeError) as exc:  # not glibc (macOS, musl): nothing to tune
        log.warning("--low-memory: the allocator could not be tuned here (%s); only the smaller LM-head chunks apply", exc)


def _engine(accelerator) -> str | None:
    """"deepspeed" or "fsdp" when `accelerate launch` runs under one of them, else None (one process or DDP)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind)


def _check_qlora(device: torch.device) -> None:
    if device.type != "cuda":
        raise UsageError("--quantize 4bit (QLoRA) needs a CUDA GPU; bitsandbytes' 4-bit layers do not train on this CPU. Train without --quantize (fp32 LoRA)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UsageError("--quantize 4bit needs bitsandbytes: pip install 'banklora[qlora]'") from exc


def _resume(found: Path, settings: TrainSettings, fresh: TrainerState, model, optimizer, accelerator) -> TrainerState:
    saved = TrainerState.read(found)
    now = json.loads(json.dumps(settings.to_dict()))  # tuples as lists, as the checkpoint stored them
    changed = sorted(k for k in set(now) | set(saved.settings) if k not in RESUMABLE_CHANGES and now.get(k) != saved.settings.get(k) and k != "lora")
    changed += [f"lora.{k}" for k in now["lora"] if now["lora"][k] != saved.settings.get("lora", {}).get(k)]
    if changed:
        first = changed[0]
        was = saved.settings.get(first) if "." not in first else saved.settings["lora"].get(first[5:])
        raise UsageError(
            f"--resume: the settings differ from the checkpoint's ({', '.join(changed)}; e.g. {first} was {was!r}); "
            "resume with the same settings (a resumed run repeats the original exactly), or start afresh with --no-resume"
        )
    if saved.dataset_sha256 != fresh.dataset_sha256:
        raise UsageError(f"--resume: the training data changed since {found} was written (sha256 differs); resume with the same data or use --no-resume")
    return checkpoint.restore(found, model, optimizer, accelerator)


def _fit(run: _Run, show_progress: bool, on_step) -> bool:
    """The loop. Returns True when early stopping ended it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    s, acc, state = run.settings, run.accelerator, run.state
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    trainable = [p for p in run.peft_model.parameters() if p.requires_grad]
    metrics = s.checkpoints / METRICS_FILE
    bad_in_row, tokens_here, fit_start, stop_early = 0, 0, time.perf_counter(), False
    lengths, epoch_batches = [len(e) for e in run.encoded], {}
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with _StopRequest() as stop, Progress(*columns, disable=not (show_progress and main), transient=False) as progress:
        task = progress.add_task("train", total=run.total, completed=state.step, stats="")
        while state.step < run.total:
            # 1) this step's examples: the global batch, split across processes
            epoch, k = divmod(state.step, run.steps_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: _epoch_batches(lengths, s.batch_size * world, s.seed, epoch, s.group_by_length)}
            global_batch = epoch_batches[epoch][k]
            local = global_batch[rank::world]
            weight = 1.0 if local else 0.0  # a process with no example left runs a dummy that counts for nothing
            batch = {key: v.to(acc.device) for key, v in collate([run.encoded[i] for i in local or global_batch[:1]], run.pad_id).items()}
            # 2) forward; the loss is the mean over the global batch's answer tokens
            loss_sum, n_tokens = run.module(**batch)
            loss_sum, n_tokens = loss_sum * weight, n_tokens * weight
            n_seen = batch["attention_mask"].sum().to(n_tokens.dtype) * weight
            totals = torch.stack([loss_sum.detach(), n_tokens, n_seen])  # one collective per step for all three sums
            totals = acc.reduce(totals, "sum") if world > 1 else totals
            loss = (totals[0] / totals[1].clamp(min=1)).item()
            # 3) backward and step, unless the loss or the gradient norm is not finite
            grad_norm: float | None = float("nan")
            if math.isfinite(loss):
                acc.backward(loss_sum * world / totals[1].clamp(min=1))  # DDP averages: x world gives the global mean's gradient
                norm = acc.clip_grad_norm_(trainable, s.max_grad_norm)
                grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
            lr = s.lr * _schedule(state.step, run.warmup, run.total)
            if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                run.optimizer.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                state.skipped_steps.append(state.step + 1)
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            n_seen = int(totals[2])
            state.tokens += n_seen
            tokens_here += n_seen
            rate = tokens_here / (time.perf_counter() - fit_start)
            state.losses.append(round(loss, 6) if math.isfinite(loss) else None)
            if main:
                record = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4), "loss": state.losses[-1],
                          "grad_norm": round(grad_norm, 6) if grad_norm is not None and math.isfinite(grad_norm) else None, "lr": lr,
                          "tokens": state.tokens, "tokens_per_second": round(rate, 1),
                          "elapsed_s": round(state.elapsed + time.perf_counter() - fit_start, 2)}
                if bad_in_row:
                    record["skipped"] = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
                    log.warning("step %d skipped: %s", state.step, record["skipped"])
                _append(metrics, record)
                shown = f"loss {loss:.4f}" if math.isfinite(loss) else "loss n/a (skipped)"
                progress.update(task, completed=state.step, stats=f"{shown}  {rate:,.0f} tok/s")
            if bad_in_row >= s.max_bad_steps:
                last = checkpoint.latest(s.checkpoints)
                raise BankloraError(
                    f"training diverged: {bad_in_row} steps in a row (up to step {state.step}) had a non-finite loss or gradient norm; "
                    f"lower --lr (now {s.lr:g}) or check the data. No adapter was written"
                    + (f"; the last good checkpoint is {last}" if last else "")
                )
            # 4) validation, best adapter, early stopping
            epoch_end = state.step % run.steps_per_epoch == 0
            if run.validation and (epoch_end or state.step == run.total or (s.eval_every and state.step % s.eval_every == 0)):
                stop_early = _validate(run, progress.console if main else None)
            if on_step is not None:
                on_step(state)
            # 5) checkpoints: every save_every steps, and when asked to stop
            stop_now = stop.requested
            if world > 1:
                stop_now = bool(acc.reduce(torch.tensor(int(stop_now), device=acc.device), "sum"))
            if stop_now or (s.save_every and state.step % s.save_every == 0 and state.step < run.total and not stop_early):
                saved_state = _with_elapsed(state, fit_start)
                path = checkpoint.save(s.checkpoints, saved_state, run.peft_model, run.optimizer, acc, s.keep_checkpoints)
                if main and not stop_now:
                    log.debug("checkpoint %s", path)
                if stop_now:
                    raise TrainingInterrupted(
                        f"training stopped at step {state.step} of {run.total}; checkpoint {s.checkpoints / f'step-{state.step:06d}'}. "
                        f"Continue exactly where it stopped with: banklora train --output-dir {s.output_dir} --resume"
                        + (" (under the same launcher and number of processes)" if world > 1 else "")
                    )
            if stop_early:
                if main:
                    log.info("early stopping at step %d: no better validation loss in %d evaluations (best %.4f at step %d)",
                             state.step, s.early_stopping_patience, state.best["loss"], state.best["step"])
                break
    state.elapsed += time.perf_counter() - fit_start
    return stop_early and state.step < run.total


def _with_elapsed(state: TrainerState, fit_start: float) -> TrainerState:
    return dataclasses.replace(state, elapsed=state.elapsed + time.perf_counter() - fit_start)


@torch.no_grad()
def _validate(run: _Run, console) -> bool:
    """Validation loss over all processes; keeps the best adapter. Returns True to stop early."""
    s, acc, state = run.settings, run.accelerator, run.state
    world, rank = acc.num_processes, acc.process_index
    mine = sorted(run.validation, key=len)[rank::world]  # similar lengths together: less padding
    # every process runs the same number of forwards (DDP syncs buffers on each): pad with dummies
    n_batches = math.ceil(math.ceil(len(run.validation) / world) / s.batch_size)
    run.module.eval()
    sums = torch.zeros(2, device=acc.device)  # (loss sum, answer tokens)
    for i in range(n_batches):
        chunk = mine[i * s.batch_size : (i + 1) * s.batch_size]
        batch = {k: v.to(acc.device) for k, v in collate(chunk or run.validation[:1], run.pad_id).items()}
        loss_sum, n = run.module(**batch)
        if chunk:
            sums += torch.stack([loss_sum, n])
    run.module.train()
    if world > 1:
        sums = acc.reduce(sums, "sum")
    val = (sums[0] / sums[1].clamp(min=1)).item()
    improved = state.best is None or val < state.best["loss"] - s.early_stopping_min_delta
    state.validation.append({"step": state.step, "loss": round(val, 6)})
    if improved:
        state.best = {"step": state.step, "loss": round(val, 6)}
        state.evals_without_improvement = 0
        if acc.is_main_process:
            meta = _metadata(run, wall=state.elapsed) | {"best": state.best}
            save_adapter(run.peft_model, run.loaded.tokenizer, s.checkpoints / BEST_DIR, meta)
    else:
        state.evals_without_improvement += 1
    acc.wait_for_everyone()
    if console is not None:
        _append(s.checkpoints / METRICS_FILE, {"step": state.step, "validation_loss": round(val, 6), "best": improved})
        console.print(f"step {state.step}: validation loss {val:.4f}{' (best so far)' if improved else ''}", highlight=False)
    return bool(s.early_stopping_patience) and state.evals_without_improvement >= s.early_stopping_patience


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _rewrite_metrics(path: Path, step: int) -> None:
    """On resume, drop the records of steps after the checkpoint: they will be run again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# save


def _save(run: _Run, wall: float, stopped_early: bool) -> TrainResult:
    s, acc, state = run.settings, run.accelerator, run.state
    run.peft_model.eval()
    run.peft_model.peft_config["default"].base_model_name_or_path = str(run.loaded.base.path)
    rate = state.tokens / max(1e-9, state.elapsed)
    meta = _metadata(run, wall) | {"stopped_early": stopped_early}
    output = Path(s.output_dir)
    full = acc.get_state_dict(run.module) if _engine(acc) == "fsdp" else None  # every process takes part in the gather
    if acc.is_main_process:
        if full is not None:
            full = {k.removeprefix("peft_model."): v for k, v in full.items()}
        curve = s.checkpoints / LOSS_CURVE
        plot_loss_curve(state.losses, state.validation, curve, title=f"{output.name}: loss per step")
        extras = {METRICS_FILE: s.checkpoints / METRICS_FILE, LOSS_CURVE: curve}
        if (s.checkpoints / BEST_DIR).is_dir():
            extras[BEST_DIR] = s.checkpoints / BEST_DIR
        save_adapter(run.peft_model, run.loaded.tokenizer, output, meta, extras, state_dict=full)
        shutil.rmtree(s.checkpoints, ignore_errors=True)  # the run is complete: its checkpoints have served
        finite = [x for x in state.losses if x is not None]
        log.info("adapter saved to %s (loss %.4f -> %.4f, %.0f s)%s", output, finite[0] if finite else float("nan"),
                 finite[-1] if finite else float("nan"), wall, f"; best validation adapter in {output / BEST_DIR}" if state.best else "")
    return TrainResult(output, state.losses, wall, rate, meta, acc.is_main_process)


def plot_loss_curve(losses: list[float | None], validation: list[dict], path: Path, title: str) -> None:
    """Training loss per step and validation loss at its steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), [math.nan if x is None else x for x in losses], label="train", color="#1f6feb")
    if validation:
        ax.plot([v["step"] for v in validation], [v["loss"] for v in validation], "o--", label="validation", color="#d1242f")
    ax.set(xlabel="step", ylabel="answer-token loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=96, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _metadata(run: _Run, wall: float) -> dict:
    import accelerate
    import peft
    import transformers

    s, state, data = run.settings, run.state, run.data
    categories: dict[str, int] = {}
    for e in run.examples:
        categories[e.category] = categories.get(e.category, 0) + 1
    return {
        "format": "banklora-adapter/1",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name": run.loaded.base.name, "path": str(run.loaded.base.path), "sha256": run.loaded.base.sha256},
        "lora": s.lora.__dict__ | {"target_modules": list(s.lora.target_modules)},
        "training": {k: v for k, v in s.to_dict().items() if k != "lora"} | {
            "steps": run.total, "steps_done": state.step, "warmup_steps_used": run.warmup, "trainable_parameters": run.n_trainable,
            "processes": run.accelerator.num_processes, "global_batch": s.batch_size * run.accelerator.num_processes,
            "resumed_at_step": run.resumed_from, "skipped_steps": state.skipped_steps,
        },
        "dataset": {
            "sources": list(s.data),
            "sha256": state.dataset_sha256,
            "examples": len(run.examples),
            "used_per_split": {name: len(data.split(name)[0]) for name in ("train", "validation", "test")},
            "dropped": dict(data.dropped),
            "personal_data_masked": data.pii_redacted,
            "categories": categories,
        },
        "validation_loss": state.validation,
        "best_validation": state.best,
        "device": str(run.loaded.device),
        "dtype": str(run.loaded.dtype).removeprefix("torch."),
        "loss_per_step": state.losses,
        "wall_time_seconds": round(wall, 2),
        "train_tokens_per_second": round(state.tokens / max(1e-9, state.elapsed), 1),
        "versions": {
            "banklora": banklora.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
