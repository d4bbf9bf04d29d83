"""Resumable training checkpoints, written atomically, read without pickle.

A checkpoint directory `step-000040/` holds everything a run needs to continue exactly:
  adapter_config.json + adapter_model.safetensors   the LoRA weights (a loadable PEFT adapter)
  optimizer.safetensors + optimizer.json             AdamW moments (tensors) and its param groups
  rng-rank{R}.safetensors                            each process's torch random state (dropout)
  trainer_state.json                                 step, losses, validations, best, settings
trainer_state.json is written last and the directory appears by a rename, so a directory named
step-N is complete; `.step-N.tmp-*` leftovers of a crash are ignored and cleaned. The data order
is a function of (seed, epoch), so the step number alone says where in the data to continue.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from banklora.config import BEFORE_IT_EXISTED, TrainSettings, resumable_changes
from banklora.errors import BankloraError, UsageError
from banklora.io import to_json

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FORMAT = "banklora-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """What the loop knows beyond the weights; saved as JSON in every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of fitting before this process started
    losses: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # {"step", "loss"}
    best: dict | None = None  # {"step", "loss"} of the best validation so far
    evals_without_improvement: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    dataset_sha256: str = ""
    processes: int | None = None  # the global batch is batch_size x processes: a resume must keep it

    def to_json(self) -> str:
        return to_json({"format": FORMAT, **self.__dict__}, indent=1)

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        path = directory / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: unreadable checkpoint state ({exc}); delete {directory} and resume from an older one") from exc
        if raw.pop("format", None) != FORMAT:
            raise UsageError(f"{path}: not a {FORMAT} checkpoint")
        raw["settings"] = BEFORE_IT_EXISTED | raw.get("settings", {})  # what the run trained with before a setting existed
        return cls(**raw)


def check_resumable(found: Path, settings: dict, dataset_sha256: str, processes: int) -> TrainerState:
    """The checkpoint's state, if the run about to start would continue it exactly; else a
    sentence that says what differs (settings, data, or the number of processes)."""
    saved = TrainerState.read(found)
    now = json.loads(json.dumps(settings))  # tuples as lists, as the checkpoint stored them
    # a setting newer than the checkpoint had its default then (read() filled in those whose default changed since)
    defaults = json.loads(json.dumps(TrainSettings().to_dict()))
    then = defaults | {k: v for k, v in saved.settings.items() if k != "lora"} | {"lora": defaults["lora"] | saved.settings.get("lora", {})}
    allowed = resumable_changes()
    changed = sorted(k for k in set(now) | set(then) if k not in allowed and k != "lora" and now.get(k) != then.get(k))
    changed += [f"lora.{k}" for k in now["lora"] if now["lora"][k] != then["lora"].get(k)]
    if changed:
        first = changed[0]
        was = then.get(first) if "." not in first else then["lora"].get(first[5:])
        raise UsageError(
            f"--resume: the settings differ from the checkpoint's ({', '.join(changed)}; e.g. {first} was {was!r}); "
            "resume with the same settings (a resumed run repeats the original exactly), or start afresh with --no-resume"
        )
    if saved.dataset_sha256 != dataset_sha256:
        raise UsageError(f"--resume: the training data changed since {found} was written (sha256 differs); resume with the same data or use --no-resume")
    written_by = saved.processes or len(list(found.glob("rng-rank*.safetensors"))) or 1
    if written_by != processes:
        batch = saved.settings.get("batch_size")
        raise UsageError(
            f"--resume: {found} was written by a run on {written_by} process(es) (global batch {batch} x {written_by}), "
            f"and this run has {processes}: the global batch and the schedule would change. Resume on {written_by} "
            f"process(es) (torchrun --nproc_per_node {written_by} ... when it was more than one), or start afresh with --no-resume"
        )
    return saved


class TrainingInterrupted(BankloraError):
    exit_code = 130


class StopRequest:
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


def complete_checkpoints(directory: Path) -> list[Path]:
    """step-N directories with their state file, oldest first; temporary leftovers are skipped."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def clean_leftovers(directory: Path) -> None:
    """Remove temporary directories of saves a crash interrupted."""
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def remove_run(directory: Path, names: tuple[str, ...] = ()) -> None:
    """Delete what a run wrote in `directory` (step-N checkpoints, temporary leftovers and the
    files or folders `names`), then the folder itself when nothing else is left in it: files of
    the user's in a --checkpoint-dir they named are never touched."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if _STEP_DIR.match(p.name) or (p.name.startswith(".") and ".tmp-" in p.name) or p.name in names:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty: the user's own files stay, and so does the folder
        log.info("kept %s: it holds files banklora did not write", directory)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state_dict as safetensors tensors + JSON, so loading it needs no pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(directory: Path, trainer_state: TrainerState, peft_model, optimizer, accelerator, keep: int) -> Path | None:
    """Write checkpoint step-N atomically (all processes call this; the main one writes).

    Returns the checkpoint directory on the main process.
    """
    target = directory / f"step-{trainer_state.step:06d}"
    # every process must agree on the temporary path: the main process's pid names it
    tmp = Path(_broadcast_str(str(directory / f".{target.name}.tmp-{os.getpid()}"), accelerator))
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    save_file(state, str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)  # as save_adapter
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / STATE_FILE).write_text(trainer_state.to_json())  # last: its presence marks a complete checkpoint
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def restore(checkpoint: Path, peft_model, optimizer, accelerator) -> TrainerState:
    """Load weights, optimizer moments and this process's random state from `checkpoint`."""
    from peft import set_peft_model_state_dict

    trainer_state = TrainerState.read(checkpoint)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(accelerator.device))
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"{checkpoint}: the checkpoint does not fit this model ({len(missing)} LoRA tensors missing, "
            f"{len(result.unexpected_keys)} unexpected, e.g. {(missing + list(result.unexpected_keys))[0]})"
        )
    meta = json.loads((checkpoint / "optimizer.json").read_text())
    tensors = load_file(str(checkpoint / "optimizer.safetensors"), device=str(accelerator.device))
    optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    rng_file = checkpoint / f"rng-rank{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        log.warning("%s has no random state for process %d (another number of processes?): dropout will differ",
                    checkpoint, accelerator.process_index)
    return trainer_state


def _broadcast_str(value: str, accelerator) -> str:
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
