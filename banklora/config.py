"""Typed settings with the seed's defaults. Defaults < YAML file < command-line flags.

Each check in __post_init__ names the flag to change, so a bad value reads as a sentence.
The resolved settings are saved next to every adapter (banklora_meta.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from banklora.errors import UsageError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank: higher = more capacity and memory."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.1
    bias: str = "none"
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers that get adapters (names inside each decoder layer)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning."""
    use_dora: bool = False
    """DoRA: learn a magnitude per output feature besides the direction; ~2x slower steps."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",")]
        self.target_modules = tuple(t for t in self.target_modules if t)
        if not self.target_modules:
            raise UsageError("--lora-targets needs at least one module name, e.g. q_proj,v_proj")
        if self.r < 1:
            raise UsageError(f"--lora-r must be at least 1 (got {self.r})")
        if self.alpha <= 0:
            raise UsageError(f"--lora-alpha must be positive (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        if self.bias not in ("none", "all", "lora_only"):
            raise UsageError(f"lora bias must be none, all or lora_only (got {self.bias!r})")


@dataclass
class TrainSettings:
    base_model: str = "gemma-3-270m"
    """The embedded Gemma 3 270M, a local HF checkpoint directory, or a hub id."""
    data: tuple[str, ...] = ("banking",)
    """Data sources: built-in names ("banking") and JSON/JSONL files, concatenated."""
    output_dir: str = "outputs/lora_banking"
    epochs: float = 3
    batch_size: int = 4
    lr: float = 2e-4
    max_length: int = 512
    """Examples longer than this (in Gemma tokens) are dropped and counted, never truncated."""
    warmup_steps: int = 100
    warmup_cap: float = 0.1
    """Warmup never exceeds this fraction of the run (the seed's 100 steps exceed small runs)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    """auto = float32 on CPU, bfloat16 on CUDA where supported."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); the order stays random."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (for quick checks); None = run all epochs."""
    strict: bool = False
    """Fail instead of dropping duplicates and over-long examples."""
    redact: bool = False
    """Mask personal data (ID, card and mobile numbers, e-mail) instead of refusing to train."""
    quantize: str | None = None
    """"4bit" = QLoRA: the frozen base in 4-bit NF4 (CUDA + bitsandbytes only), adapters in bf16."""
    eval_every: int = 0
    """Validation loss every N steps as well as at each epoch end; 0 = epoch ends only."""
    early_stopping_patience: int | None = None
    """Stop after this many validations in a row without a new best; None = never stop early."""
    early_stopping_min_delta: float = 0.0
    """A validation loss must beat the best by more than this to count as better."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps; 0 = only on Ctrl-C."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted as new ones land."""
    checkpoint_dir: str | None = None
    """Checkpoints, metrics.jsonl and the best adapter while training [<output_dir>-checkpoints]."""
    max_bad_steps: int = 5
    """Non-finite loss or gradient norm skips the step; this many in a row abort the run."""
    low_memory: bool = False
    """Lower peak memory for slower steps: freed activations go back to the OS at once (glibc
    mmap threshold 1 MiB) and LM-head chunks of 64 tokens (measured: 0.5x the reference's peak,
    0.8x banklora's default speed on 2 cores; README, Performance)."""
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        self.data = tuple(self.data)
        if self.dtype in ("fp16", "float16", "half"):
            raise UsageError(
                "--dtype fp16 is refused for Gemma: its activations reach ~8e5 and overflow float16; "
                "use --dtype bf16 on a GPU or fp32 (the CPU default)"
            )
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--lr", self.lr)):
            if value <= 0:
                raise UsageError(f"{flag} must be positive (got {value})")
        if self.max_length < 16:
            raise UsageError(f"--max-length must be at least 16 tokens (got {self.max_length})")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if not 0 <= self.warmup_cap <= 1:
            raise UsageError(f"warmup_cap must be in [0, 1] (got {self.warmup_cap})")
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every)):
            if value < 0:
                raise UsageError(f"{flag} must be 0 (off) or a number of steps (got {value})")
        if self.keep_checkpoints < 1:
            raise UsageError(f"--keep-checkpoints must be at least 1 (got {self.keep_checkpoints})")
        if self.max_bad_steps < 1:
            raise UsageError(f"max_bad_steps must be at least 1 (got {self.max_bad_steps})")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise UsageError(f"--early-stopping-patience must be at least 1 (got {self.early_stopping_patience})")
        if self.quantize not in (None, "4bit"):
            raise UsageError(f"--quantize takes 4bit (QLoRA) or nothing (got {self.quantize!r})")
        if self.quantize and self.dtype == "fp32":
            raise UsageError("--quantize 4bit computes in bf16; drop --dtype fp32")

    @property
    def checkpoints(self) -> Path:
        """Where checkpoints, metrics.jsonl and the best adapter live while training."""
        return Path(self.checkpoint_dir or f"{self.output_dir.rstrip('/')}-checkpoints")

    def warmup_for(self, total_steps: int) -> int:
        """The seed's warmup, capped to warmup_cap of the run."""
        return min(self.warmup_steps, int(self.warmup_cap * total_steps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy (deterministic)."""
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or positive (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")


# Settings that may change when a run resumes: none of them moves the weights.
RESUMABLE_CHANGES = frozenset({"save_every", "keep_checkpoints", "max_bad_steps", "eval_every",
                               "early_stopping_patience", "early_stopping_min_delta", "low_memory"})


def load_train_settings(config_file: Path | None, overrides: dict, base: dict | None = None) -> TrainSettings:
    """Defaults < `base` (a checkpoint's settings, when resuming) < YAML file < flags.

    `overrides` holds only the flags the user gave.
    """
    overrides = dict(overrides)
    values: dict = {}
    if config_file is not None:
        import yaml

        if not config_file.is_file():
            raise UsageError(f"--config {config_file} does not exist")
        try:
            values = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {config_file}: not valid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise UsageError(f"--config {config_file}: expected a mapping of settings at the top level")
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"--config {config_file}: unknown setting(s) {unknown}; known: {sorted(known)}")
    for key in ("lr", "epochs", "warmup_cap", "weight_decay", "max_grad_norm", "early_stopping_min_delta"):
        # YAML reads "1e-3" (no dot) as a string; accept it as the number it is meant to be.
        if isinstance(values.get(key), str):
            try:
                values[key] = float(values[key])
            except ValueError as exc:
                raise UsageError(f"--config {config_file}: {key} must be a number (got {values[key]!r})") from exc
    base = dict(base or {})
    lora = dict(base.pop("lora", None) or {})
    lora.update(values.pop("lora", None) or {})
    lora.update(overrides.pop("lora", {}))
    values = base | values
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainSettings(**values, lora=LoraSettings(**lora))
    except TypeError as exc:
        raise UsageError(f"--config {config_file}: {exc}") from exc
