"""LoRA training: setup -> fit -> save.

A plain PyTorch loop around a PEFT model. The loss computes logits only at answer positions:
the LM head (262,144 x 640 for Gemma 3 270M) is ~60% of the model's FLOPs and its fp32 logits
cost 1 MiB per token, so skipping prompt and padding positions is exact and the biggest CPU win.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import banklora
from banklora.config import TrainSettings
from banklora.data.dataset import dataset_hash, load_examples
from banklora.data.format import IGNORE_INDEX, Encoded
from banklora.data.prepare import prepare
from banklora.errors import BankloraError, UsageError
from banklora.modeling import load, save_adapter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# setup


def setup_lora(model, settings: TrainSettings):
    """Wrap a base model with trainable LoRA layers (PEFT)."""
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    targets: list[str] | str = list(lora.target_modules)
    if any("vision_tower" in name for name, _ in model.named_modules()):
        # Gemma 3 4B and larger carry a vision tower: adapt the language model only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


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


def answer_loss(model, batch: dict[str, torch.Tensor], per_example: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, with logits computed only there.

    Equal (to float rounding) to the model's own loss with `labels=`, at a fraction of the cost.
    per_example=True returns each row's own mean, shape (B,): what reference perplexity needs.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(causal_lm, "model", None), getattr(causal_lm, "lm_head", None)
    if (decoder is None or head is None) and not per_example:  # an unknown architecture: the full computation
        return model(**batch).loss
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    logits = head(hidden[:, :-1][keep]).float()  # (N, V), N = answer tokens in the batch
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if not per_example:
        return F.cross_entropy(logits, targets[keep])
    token_loss = F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], device=token_loss.device).index_add_(0, rows, token_loss)
    return sums / keep.sum(dim=1).clamp(min=1)


@torch.no_grad()
def validation_loss(model, encoded: list[Encoded], batch_size: int, pad_id: int, device) -> float:
    """Mean answer-token loss over the validation examples (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += answer_loss(model, batch).item() * n
        count += n
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# fit


def _schedule(step: int, warmup: int, total: int) -> float:
    """1) linear warmup, 2) cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(n: int, batch_size: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train(settings: TrainSettings, show_progress: bool = True) -> TrainResult:
    """Train a LoRA adapter as `settings` says and save it atomically to settings.output_dir."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    start = time.perf_counter()
    # 1) setup: data, model, LoRA, optimizer
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    examples = load_examples(settings.data)
    loaded = load(settings.base_model, dtype=settings.dtype, training=True)
    tokenizer = loaded.tokenizer
    data = prepare(examples, tokenizer, settings.max_length, strict=settings.strict, redact=settings.redact)
    _, encoded = data.split("train")
    _, validation = data.split("validation")
    if not encoded:
        raise UsageError(f"no training examples left in {', '.join(settings.data)} ({data.summary()}); check the split fields and --max-length")
    log.info("data: %s", data.summary())
    model = setup_lora(loaded.model, settings)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    warmup = settings.warmup_for(total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, warmup, total))
    log.info(
        "training %s LoRA parameters on %d examples for %d steps (warmup %d) on %s/%s",
        f"{n_trainable:,}", len(encoded), total, warmup, loaded.device, str(loaded.dtype).removeprefix("torch."),
    )

    # 2) fit
    rng = random.Random(settings.seed)
    losses: list[float] = []
    val_losses: list[dict] = []
    tokens, fit_start = 0, time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=total, stats="")
        step = 0
        while step < total:
            for indices in _batches(len(encoded), settings.batch_size, rng):
                if step >= total:
                    break
                batch = {k: v.to(loaded.device) for k, v in collate([encoded[i] for i in indices], pad_id).items()}
                loss = answer_loss(model, batch)
                if not torch.isfinite(loss):
                    raise BankloraError(f"training diverged: the loss is {loss.item()} at step {step + 1}; lower --lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += int(batch["attention_mask"].sum())
                losses.append(round(loss.item(), 6))
                rate = tokens / (time.perf_counter() - fit_start)
                progress.update(task, advance=1, stats=f"loss {losses[-1]:.4f}  {rate:,.0f} tok/s")
                if validation and (step % steps_per_epoch == 0 or step == total):
                    val = validation_loss(model, validation, settings.batch_size, pad_id, loaded.device)
                    val_losses.append({"step": step, "loss": round(val, 6)})
                    progress.console.log(f"step {step}: validation loss {val:.4f}")
                    model.train()
    fit_seconds = time.perf_counter() - fit_start

    # 3) save
    model.eval()
    wall = time.perf_counter() - start
    model.peft_config["default"].base_model_name_or_path = str(loaded.base.path)
    meta = _metadata(settings, loaded, examples, data, losses, val_losses, total, warmup, n_trainable, wall, tokens / fit_seconds)
    output = save_adapter(model, tokenizer, Path(settings.output_dir), meta)
    log.info("adapter saved to %s (loss %.4f -> %.4f, %.0f s)", output, losses[0], losses[-1], wall)
    return TrainResult(output, losses, wall, tokens / fit_seconds, meta)


def _metadata(settings, loaded, examples, data, losses, val_losses, total, warmup, n_trainable, wall, rate) -> dict:
    import accelerate
    import peft
    import transformers

    categories: dict[str, int] = {}
    for e in examples:
        categories[e.category] = categories.get(e.category, 0) + 1
    return {
        "format": "banklora-adapter/1",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name": loaded.base.name, "path": str(loaded.base.path), "sha256": loaded.base.sha256},
        "lora": settings.lora.__dict__ | {"target_modules": list(settings.lora.target_modules)},
        "training": {k: v for k, v in settings.to_dict().items() if k != "lora"} | {"steps": total, "warmup_steps_used": warmup, "trainable_parameters": n_trainable},
        "dataset": {
            "sources": list(settings.data),
            "sha256": dataset_hash(examples),
            "examples": len(examples),
            "used_per_split": {name: len(data.split(name)[0]) for name in ("train", "validation", "test")},
            "dropped": dict(data.dropped),
            "personal_data_masked": data.pii_redacted,
            "categories": categories,
        },
        "validation_loss": val_losses,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "loss_per_step": losses,
        "wall_time_seconds": round(wall, 2),
        "train_tokens_per_second": round(rate, 1),
        "versions": {
            "banklora": banklora.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
