"""Typed settings with the seed's defaults. Defaults < YAML file < command-line flags.

Every training setting exists once: a dataclass field with its docstring. The command-line
options of train, sweep and quickstart are generated from these fields (`flags()`): the flag
name, its type, its help text (the docstring) and its default. Each check in __post_init__ names
the flag to change, so a bad value reads as a sentence. The resolved settings are saved next to
every adapter (banklora_meta.json).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from banklora.errors import UsageError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "fp32", "bf16")
MAX_VARIANTS = 4  # question variants banklora/data/augment.py can make: a synonym swap and three phrasings
# Gemma's turn tokens: in a pretrained (not instruction-tuned) Gemma their rows of the tied embedding /
# LM head are nearly untrained, so a tuned model never ends its turn unless they are trained too.
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def _refuse_non_finite(settings, prefix: str = "") -> None:
    """Every float setting must be a finite number: NaN or inf would pass each range check below
    (all comparisons with NaN are false) and fail later, after the model has loaded."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")
            raise UsageError(f"{flag} must be a finite number (got {value}), e.g. {f.default if isinstance(f.default, float) else 1.0}")


def _resumable(default, **kw):
    """A setting that may change when a run resumes: it does not move the weights."""
    return field(default=default, metadata={"resumable": True, **kw})


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank: higher = more capacity and memory."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.1
    """Dropout on the LoRA input during training."""
    bias: str = "none"
    """Train biases too: none, all or lora_only (Gemma's linears have none)."""
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"flag": "--lora-targets", "comma": True})
    """Linear layers that get adapters (names inside each decoder layer), comma-separated."""
    use_rslora: bool = field(default=False, metadata={"flag": "--rslora"})
    """rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning."""
    use_dora: bool = field(default=False, metadata={"flag": "--dora"})
    """DoRA: learn a magnitude per output feature besides the direction; ~2x slower steps."""
    train_tokens: tuple[str, ...] = field(default=TURN_TOKENS, metadata={"flag": "--train-tokens", "comma": True})
    """Control tokens whose embedding rows (tied to the LM head) are trained beside LoRA (PEFT's trainable tokens), comma-separated; none = off. A pretrained Gemma never learnt to end a turn without them."""

    def __post_init__(self) -> None:
        _refuse_non_finite(self, "lora-")
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",")]
        self.target_modules = tuple(t for t in self.target_modules if t)
        if isinstance(self.train_tokens, str):
            self.train_tokens = self.train_tokens.split(",")
        self.train_tokens = tuple(dict.fromkeys(t.strip() for t in self.train_tokens if t.strip()))
        if self.train_tokens in (("none",), ("",)):
            self.train_tokens = ()
        if not self.target_modules:
            raise UsageError("--lora-targets needs at least one module name, e.g. q_proj,v_proj")
        if self.r < 1:
            raise UsageError(f"--lora-r must be at least 1 (got {self.r})")
        if self.alpha <= 0:
            raise UsageError(f"--lora-alpha must be positive (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        if self.bias not in ("none", "all", "lora_only"):
            raise UsageError(f"--lora-bias must be none, all or lora_only (got {self.bias!r})")


@dataclass
class TrainSettings:
    base_model: str = "gemma-3-270m"
    """Base model: gemma-3-270m (embedded), a local HF checkpoint directory, or a hub id."""
    data: tuple[str, ...] = ("banking",)
    """Data source, repeatable: a built-in set (banking, banking-seed), a name from banklora_datasets.yaml, or a JSON/JSONL/CSV/TSV file."""
    output_dir: str = "outputs/lora_banking"
    """Where the adapter goes."""
    epochs: float = 1.0
    """Passes over the training split, with its question variants (--augment): one over the built-in split and 2 variants of each question is the measured recipe (docs/training.md, "Training recipe")."""
    batch_size: int = 4
    """Examples per optimizer step (per process)."""
    lr: float = 1e-3
    """Peak learning rate."""
    max_length: int = 512
    """Examples longer than this (in Gemma tokens) are dropped and counted, never truncated."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    warmup_cap: float = 0.1
    """Warmup never exceeds this fraction of the run (the seed's 100 steps exceed small runs)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    augment: int = 2
    """Question variants added per training example before training (banklora data augment's synonyms and phrasings; validation and test untouched). 2 triples the training split: one epoch costs what three did without, and beat three epochs on the held-out answers (docs/training.md, "Training recipe"). 0 = off (the quickstart, to fit 10 minutes)."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise of scale alpha / sqrt(tokens x hidden) on the input embeddings while training (5 in the paper); 0 = off."""
    unlikelihood: float = 2.0
    """Token-level unlikelihood (Welleck et al. 2019): the loss adds this weight x -log(1 - p) of every token the answer already said, where the reference says another; it trains answers not to loop (2 measured best: docs/training.md, "Training recipe"). 0 = off."""
    unlikelihood_context: int = 0
    """0 = unlikelihood on every token the answer already said; N = only on the tokens that followed the same N tokens earlier in the answer (what a loop copies next), so words an answer uses again elsewhere are not pushed down."""
    sequence_unlikelihood: float = 0.0
    """Sequence-level unlikelihood (Welleck et al. 2019): for the run's last --sequence-unlikelihood-steps steps, the model's own greedy answers to --sequence-unlikelihood-prompts training questions that loop join each batch, and each token the loop repeated is pushed down with this weight x -log(1 - p), without cross-entropy; 0 = off."""
    sequence_unlikelihood_steps: int = 12
    """Steps at the end of the run that train on the model's own loops (--sequence-unlikelihood)."""
    sequence_unlikelihood_prompts: int = 64
    """Training questions the model answers greedily (160 tokens) to find its loops, once, when those steps begin."""
    seed: int = 42
    """Random seed: data order, LoRA initialisation, dropout."""
    dtype: str = "auto"
    """auto = on CPUs with AVX512-BF16 or AMX, bf16 autocast over fp32 weights (LoRA, optimizer and loss in fp32; 1.5x the fp32 speed, measured); fp32 on other CPUs; bf16 on CUDA where supported. fp32 or bf16 to choose (fp16 is refused for Gemma)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); the order stays random."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (quick checks); unset = run all epochs."""
    strict: bool = False
    """Fail instead of dropping duplicates and over-long examples."""
    redact: bool = False
    """Mask personal data (ID, card and mobile numbers, e-mail) instead of refusing to train."""
    quantize: str | None = None
    """4bit = QLoRA: the frozen base in 4-bit NF4 (CUDA + bitsandbytes: pip install 'banklora[qlora]')."""
    eval_every: int = _resumable(0)
    """Validation loss every N steps as well as at each epoch end; 0 = epoch ends only."""
    early_stopping_patience: int | None = _resumable(None)
    """Stop after this many validations in a row without a new best; unset = never stop early."""
    early_stopping_min_delta: float = _resumable(0.0)
    """A validation loss must beat the best by more than this to count as better."""
    save_every: int = _resumable(50)
    """Write a resumable checkpoint every N steps; 0 = only on Ctrl-C."""
    keep_checkpoints: int = _resumable(2)
    """Newest checkpoints kept; older ones are deleted as new ones land."""
    checkpoint_dir: str | None = None
    """Checkpoints, metrics.jsonl and the best adapter while training; unset = <output-dir>-checkpoints."""
    max_bad_steps: int = _resumable(5)
    """Non-finite loss or gradient norm skips the step; this many in a row abort the run."""
    low_memory: bool = _resumable(False)
    """Lower peak memory for slower steps: freed activations go back to the OS at once and
    LM-head chunks of 64 tokens (0.5x the reference's peak, 0.8x the speed; docs/performance.md)."""
    report_to: tuple[str, ...] = _resumable(("tensorboard",), comma=True)
    """Experiment tracking, comma-separated: tensorboard (event files in <output-dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI, else sqlite:///<output-dir's folder>/mlflow.db; pip install 'banklora[mlflow]'); none = off."""
    turn_end_budget: int = _resumable(160)
    """The turn-end check at the end of training: validation prompts answered greedily with this many new tokens at most, and the P(<end_of_turn>) after their reference answers; 0 = skip it."""
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        # one source may be given as a string (YAML `data: my.jsonl`): a tuple of it, not of its characters
        self.data = (self.data,) if isinstance(self.data, (str, Path)) else tuple(self.data)
        self.data = tuple(str(d) for d in self.data)
        if not self.data:
            raise UsageError("--data needs at least one source, e.g. --data banking")
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
        if type(self.augment) is not int or not 0 <= self.augment <= MAX_VARIANTS:
            raise UsageError(f"--augment must be 0 (off) or 1-{MAX_VARIANTS} question variants per training example (got {self.augment})")
        if self.neftune_alpha < 0:
            raise UsageError(f"--neftune-alpha must be 0 (off) or positive, e.g. 5 (got {self.neftune_alpha})")
        from banklora.tracking import check_reporters

        self.report_to = check_reporters(tuple(self.report_to.split(",")) if isinstance(self.report_to, str) else tuple(self.report_to))
        if self.unlikelihood < 0:
            raise UsageError(f"--unlikelihood must be 0 (off) or positive, e.g. 0.5 (got {self.unlikelihood})")
        if self.unlikelihood_context < 0:
            raise UsageError(f"--unlikelihood-context must be 0 (every token said before) or a number of tokens, e.g. 2 (got {self.unlikelihood_context})")
        if self.sequence_unlikelihood < 0:
            raise UsageError(f"--sequence-unlikelihood must be 0 (off) or positive, e.g. 4 (got {self.sequence_unlikelihood})")
        for flag, value in (("--sequence-unlikelihood-steps", self.sequence_unlikelihood_steps),
                            ("--sequence-unlikelihood-prompts", self.sequence_unlikelihood_prompts)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1 (got {value})")
        if self.max_length < 16:
            raise UsageError(f"--max-length must be at least 16 tokens (got {self.max_length})")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if not 0 <= self.warmup_cap <= 1:
            raise UsageError(f"--warmup-cap must be in [0, 1] (got {self.warmup_cap})")
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every), ("--warmup-steps", self.warmup_steps),
                            ("--turn-end-budget", self.turn_end_budget)):
            if value < 0:
                raise UsageError(f"{flag} must be 0 (off) or a number of steps (got {value})")
        if self.keep_checkpoints < 1:
            raise UsageError(f"--keep-checkpoints must be at least 1 (got {self.keep_checkpoints})")
        if self.max_bad_steps < 1:
            raise UsageError(f"--max-bad-steps must be at least 1 (got {self.max_bad_steps})")
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


# Answers compare generates together by default: with the 270M model and an adapter on 2 cores, a
# decoding step costs 6.8 ms per row at 32 rows, 4.4 at 72 and 4.1 at 128 (measured), and a row
# holds only its KV cache (about 37 KB per token for the 270M model).
# What a run trained with before a setting existed, where today's default differs: a checkpoint written then
# lacks the key and resumes with this value, not today's default.
BEFORE_IT_EXISTED = {"augment": 0}
# The quickstart: train's recipe over the 240 pairs without their variants (60 steps of train's 180), to fit 10 minutes,
# and sequence-level unlikelihood over its last 12 steps: on the 72 test questions, greedy, 72 answers end and none loops
# where 70 and 22 without; a fresh clone's make quickstart 532 s (docs/training.md, "Training recipe")
QUICKSTART = {"data": ("banking",), "epochs": 1.0, "lr": 1e-3, "augment": 0, "sequence_unlikelihood": 0.5, "sequence_unlikelihood_prompts": 32}

COMPARE_BATCH_SIZE = 128
# Rows the server (and studio's chat) decodes together. Measured with bench/serve_load.py, the quickstart
# adapter, 2 cores, back to back: 16 clients 98.9 tokens/s (TTFT p95 5.5 s, half of them waiting for a
# slot) with 8, 140.4 (0.7 s) with 16; 8 clients the same with either (102.1, 100.3). docs/performance.md
SERVE_MAX_BATCH_SIZE = 16


# The repetition penalty chat, the server and the web chat use unless told otherwise (compare stays
# plain greedy). Measured on the 48 validation questions, greedy, 160 tokens (docs/training.md, Turn tokens):
# the 1-epoch quickstart adapter's answers ended 30 -> 44 and looped 32 -> 14 with it; the 3-epoch
# adapter's ended 39 -> 47 and looped 11 -> 2.
CHAT_REPETITION_PENALTY = 1.15


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy (deterministic)."""
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    """OpenAI's: each token's logit is lowered by this x the times it is already in the answer; -2..2, 0 = off."""
    presence_penalty: float = 0.0
    """OpenAI's: a token's logit is lowered by this once it is in the answer; -2..2, 0 = off."""
    repetition_penalty: float = 1.0
    """vLLM's: tokens of the prompt or the answer have their logit divided by this (multiplied when negative); > 0, 1 = off."""

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or positive (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        for flag, value in (("--frequency-penalty", self.frequency_penalty), ("--presence-penalty", self.presence_penalty)):
            if not -2 <= value <= 2:
                raise UsageError(f"{flag} must be in [-2, 2], 0 = off (got {value:g})")
        if not 0 < self.repetition_penalty < float("inf"):
            raise UsageError(f"--repetition-penalty must be positive, 1 = off, e.g. 1.2 (got {self.repetition_penalty:g})")

    def decoding(self) -> str:
        """How answers are picked, for report headers: "greedy" or the sampling settings, then
        each penalty that is on (e.g. "greedy, repetition_penalty 1.3")."""
        parts = ["greedy" if self.temperature == 0 else f"sampling at temperature {self.temperature:g}, top_p {self.top_p:g}"]
        for name, value, off in (("repetition_penalty", self.repetition_penalty, 1), ("frequency_penalty", self.frequency_penalty, 0),
                                 ("presence_penalty", self.presence_penalty, 0)):
            if value != off:
                parts.append(f"{name} {value:g}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------- flags from fields
@dataclass(frozen=True)
class Flag:
    """One command-line option generated from a settings field."""

    key: str  # "epochs", or "lora.r" for the LoRA settings
    flag: str  # "--epochs", "--lora-r"
    type: type  # what the CLI parses: int, float, str, bool, or list (repeatable str)
    help: str  # the field's docstring
    default: object

    @property
    def param(self) -> str:
        """The Python parameter name the CLI passes the value as."""
        return self.flag.removeprefix("--").replace("-", "_")


@lru_cache(maxsize=None)
def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _cli_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if f.metadata.get("comma"):
        return str
    if typing.get_origin(hint) is tuple:
        return list
    return args[0] if args and typing.get_origin(hint) is not tuple else hint


@lru_cache(maxsize=None)
def flags() -> tuple[Flag, ...]:
    """Every training setting as a command-line option, in the order of the fields."""
    out = []
    for cls, prefix in ((TrainSettings, ""), (LoraSettings, "lora.")):
        docs = _docstrings(cls)
        for f in dataclasses.fields(cls):
            if f.name == "lora":
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            flag = f.metadata.get("flag") or "--" + ("lora-" if prefix else "") + f.name.replace("_", "-")
            out.append(Flag(prefix + f.name, flag, _cli_type(cls, f), docs.get(f.name, ""), default))
    return tuple(out)


def overrides_from_flags(values: dict[str, object]) -> dict:
    """{parameter name: value or None} from the CLI -> the overrides load_train_settings takes
    (only the flags given; LoRA settings nested under "lora")."""
    out: dict = {"lora": {}}
    for f in flags():
        value = values.get(f.param)
        if value is None:
            continue
        value = tuple(value) if f.type is list else value
        if f.key.startswith("lora."):
            out["lora"][f.key[5:]] = value
        else:
            out[f.key] = value
    return out


def resumable_changes() -> frozenset[str]:
    """Settings that may change when a run resumes: none of them moves the weights."""
    return frozenset(f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("resumable"))


# ------------------------------------------------------------------------------- YAML
def load_train_settings(config_file: Path | None, overrides: dict, base: dict | None = None) -> TrainSettings:
    """Defaults < `base` (a checkpoint's settings, when resuming) < YAML file < flags.

    `overrides` holds only the flags the user gave.
    """
    overrides = dict(overrides)
    values: dict = {}
    if config_file is not None:
        values = _read_yaml(config_file)
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


def _read_yaml(config_file: Path) -> dict:
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
    if "lora" in values and not isinstance(values["lora"], dict):
        raise UsageError(f"--config {config_file}: lora must be a mapping of LoRA settings (r, alpha, ...)")
    for f in flags():
        section = values.get("lora", {}) if f.key.startswith("lora.") else values
        name = f.key.removeprefix("lora.")
        # YAML reads "1e-3" (no dot) as a string; accept it as the number it is meant to be
        if f.type is float and isinstance(section.get(name), str):
            try:
                section[name] = float(section[name])
            except ValueError as exc:
                raise UsageError(f"--config {config_file}: {f.key} must be a number (got {section[name]!r})") from exc
    return values
