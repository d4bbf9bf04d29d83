"""The one loader, and the adapter on disk.

`load()` is the only function in banklora that builds a model: a base model, or a base model
plus a LoRA adapter. Training, compare, chat and doctor all call it. An adapter directory is
plain PEFT (adapter_config.json + adapter_model.safetensors) plus the tokenizer with its chat
template and banklora_meta.json, and it is written to a temporary directory, then renamed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from banklora import basemodel
from banklora.data.format import GEMMA_CHAT_TEMPLATE
from banklora.errors import BankloraError, UsageError

log = logging.getLogger(__name__)

META_FILE = "banklora_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class BaseModelInfo:
    name: str  # what the user asked for: "gemma-3-270m", a directory, or a hub id
    path: Path  # local directory holding config, safetensors and tokenizer
    sha256: str  # of the weight files' contents: identifies the base an adapter belongs to


@dataclass
class Loaded:
    model: torch.nn.Module  # a transformers model, or a peft.PeftModel around one
    tokenizer: object
    base: BaseModelInfo
    device: torch.device
    dtype: torch.dtype
    adapter_path: Path | None = None
    meta: dict | None = None  # the adapter's banklora_meta.json
    adapter_names: list[str] = field(default_factory=list)


def resolve_base(spec: str) -> BaseModelInfo:
    """Find a base model: the embedded name, a local HF checkpoint directory, or a hub id."""
    path = base_path(spec)
    manifest = basemodel.read_manifest(path)
    if manifest is not None:  # the embedded model: hashed once, at conversion
        sha = manifest["weights_sha256"]
    else:
        sha = basemodel.combine_digests([basemodel.sha256_file(w) for w in sorted(path.glob("*.safetensors"))])
    name = basemodel.EMBEDDED_NAME if spec in (basemodel.EMBEDDED_NAME, "embedded") else spec
    return BaseModelInfo(name, path, sha)


def base_path(spec: str) -> Path:
    """The local directory of a base model (converting or downloading it if needed), checked."""
    if spec in (basemodel.EMBEDDED_NAME, "embedded"):
        return basemodel.embedded_checkpoint()
    path = Path(spec).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(spec):
            raise UsageError(f"--base-model {spec}: no such directory, and not a hub id of the form owner/name")
        path = _download(spec)
    if not (path / "config.json").is_file():
        raise UsageError(f"--base-model {spec}: {path} has no config.json; point it at a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"--base-model {spec}: {path} has no .safetensors weights; banklora loads safetensors only (no pickle files)")
    return path.resolve()


def load_tokenizer(base_model: str | None = None):
    """The tokenizer of a base model, without loading (or hashing) its weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path(base_model or basemodel.EMBEDDED_NAME))
    tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
    return tokenizer


def _looks_like_hub_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") == 1


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        raise UsageError(f"--base-model {repo_id}: not a local directory, and the hub did not provide it ({type(exc).__name__}); download it first or pass a directory") from exc


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmul is hundreds of times slower without AVX512-BF16), bf16 on CUDA."""
    if setting in ("fp16", "float16", "half"):
        raise UsageError("fp16 is refused for Gemma: activations reach ~8e5 and overflow float16; use bf16 or fp32")
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        if device.type == "cpu":
            log.warning("bf16 on this CPU is much slower than fp32 unless it has AVX512-BF16 or AMX")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_meta(adapter_dir: Path) -> dict:
    meta_path = adapter_dir / META_FILE
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{meta_path}:{exc.lineno}: not valid JSON; the adapter's metadata is damaged") from exc


def load(
    model_path: str | None = None,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    training: bool = False,
    more_adapters: tuple[str, ...] = (),
    quantize: str | None = None,
    merge: bool = False,
    fp16_weights: bool = False,
) -> Loaded:
    """Load a base model, or base + adapter when `model_path` is an adapter directory.

    model_path: an adapter directory (its base comes from its metadata unless base_model is
    given), or a base model (embedded name, directory, hub id). training=True loads a base for
    LoRA training (eager attention, as transformers recommends for Gemma 3).
    more_adapters are loaded beside the first, each checked against the same base; adapters are
    named after their directories (Loaded.adapter_names); model.set_adapter(name) switches.
    quantize="4bit" loads the base in NF4 through bitsandbytes (QLoRA; CUDA only); "int8" (CPU,
    inference only) quantizes the LM head's weights to int8 after loading (and merging).
    On CPU a merged model's linear layers become DecodeLinear (faster for the few rows of each
    decoding step); fp16_weights=True (CPU, inference only) adds an fp16 copy of the decoder's
    weights for single-stream decoding: half the weight traffic per generated token.
    merge=True folds a single adapter into the base weights (W + B @ A * scale): the same outputs
    to float rounding, without LoRA's extra matmuls at every layer; for serving one adapter.
    """
    adapter_dir, meta = None, None
    if model_path is not None and is_adapter_dir(model_path):
        adapter_dir = Path(model_path)
        meta = read_meta(adapter_dir)
        base_model = base_model or meta.get("base_model", {}).get("name") or _peft_base(adapter_dir)
    elif model_path is not None:
        path = Path(model_path).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"{model_path} is neither an adapter (no {ADAPTER_CONFIG}) nor a model directory (no config.json)")
        if not path.exists() and model_path not in (basemodel.EMBEDDED_NAME, "embedded") and not _looks_like_hub_id(model_path):
            raise UsageError(f"{model_path} does not exist; train an adapter there with `banklora train --output-dir {model_path}`")
        base_model = model_path
    base = resolve_base(base_model or basemodel.EMBEDDED_NAME)
    if adapter_dir is not None:
        _check_adapter(adapter_dir, meta, base)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    for wanted, what in ((quantize == "int8", "int8"), (fp16_weights, "fp16")):
        if wanted and (training or dev.type != "cpu"):
            raise UsageError(f"{what} weights are for CPU inference (chat, serving); on a GPU bf16 is already fast")
    merged = merge and not more_adapters  # one adapter folded in, or a base model alone
    if fp16_weights and adapter_dir is not None and not merged:
        raise UsageError("fp16 weights need the adapter merged (one adapter, merge=True)")
    extra = {}
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        torch_dtype = torch.bfloat16
        extra = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": dev}}
    model = AutoModelForCausalLM.from_pretrained(
        base.path,
        dtype=torch_dtype,
        use_safetensors=True,
        attn_implementation="eager" if training else "sdpa",
        **extra,
    )
    if quantize != "4bit":
        model = model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else base.path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    names: list[str] = []
    if adapter_dir is not None:
        from peft import PeftModel

        names = adapter_names([str(adapter_dir), *more_adapters])
        model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=names[0], is_trainable=False)
        for name, path in zip(names[1:], more_adapters):
            path = Path(path)
            if not is_adapter_dir(path):
                raise UsageError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
            _check_adapter(path, read_meta(path), base)
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        model.set_adapter(names[0])
        if merged:
            model = model.merge_and_unload()
    elif more_adapters:
        raise UsageError("more adapters were given, but the first model path is not an adapter")
    model.eval()
    if quantize == "int8":
        model = _int8_head(model)
    if dev.type == "cpu" and not training and (merged or fp16_weights):  # a plain model here: no LoRA layers to keep intact
        _decode_linears(model, fp16=fp16_weights)
    return Loaded(model, tokenizer, base, dev, torch_dtype, adapter_dir, meta, names)


def _int8_head(model):
    """Dynamic int8 quantization of the LM head (weights int8 per output row, activations quantized
    on the fly). The head (262,144 x 640) is ~60% of each decoded token's work and weight traffic.
    Only the head: with the decoder's layers in int8 too, Gemma's large activations (~8e5) lose
    their precision and the answers fall apart (measured: reference perplexity 27 -> 70-98)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that its quantized tensor types will move
        # one scale per output row: a single scale per tensor ruins Gemma's answers (measured)
        return quantize_dynamic(model, {"lm_head": per_channel_dynamic_qconfig}, dtype=torch.qint8)


class DecodeLinear(torch.nn.Module):
    """A frozen linear layer for CPU generation, where each decoding step multiplies a few rows.

    Measured on 2 cores over the 270M decoder's 126 projections: F.linear takes 75-100 ms for 2-16
    rows where W @ x^T takes 37-67 ms (the same fp32 products, another summation order), and for
    one row an fp16 copy of W (half the bytes read) takes 17 ms against 40. So: one row (and two)
    with the fp16 copy when there is one, up to SMALL_ROWS with W @ x^T, more (the prompt) with
    F.linear. An fp16 product that is not finite (Gemma's activations can exceed fp16's range) is
    redone in fp32, so nothing overflows. The fp32 weight is the original parameter (still tied
    where the model ties it).
    """

    HALF_ROWS, SMALL_ROWS = 2, 16

    def __init__(self, linear: torch.nn.Linear, fp16: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight16", linear.weight.detach().to(torch.float16) if fp16 else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.SMALL_ROWS or x.dtype != self.weight.dtype:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        y = None
        if self.weight16 is not None and rows <= self.HALF_ROWS:
            y = torch.nn.functional.linear(flat.to(torch.float16), self.weight16).to(x.dtype)
            if not bool(torch.isfinite(y).all()):
                y = None
        if y is None:
            y = torch.mm(self.weight, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _decode_linears(model, fp16: bool) -> None:
    """Every plain linear layer becomes a DecodeLinear; fp16 copies for all but the LM head (an
    fp16 head reads twice the bytes of the int8 one and measured slower)."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, DecodeLinear(child, fp16=fp16 and child is not head))


def adapter_names(paths: list[str]) -> list[str]:
    """Short unique names for adapters: their directory names, numbered when they repeat."""
    names: list[str] = []
    for p in paths:
        name = Path(p).resolve().name or "adapter"
        candidate, i = name, 2
        while candidate in names or candidate == "base":
            candidate, i = f"{name}-{i}", i + 1
        names.append(candidate)
    return names


def _peft_base(adapter_dir: Path) -> str | None:
    return json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def _check_adapter(adapter_dir: Path, meta: dict | None, base: BaseModelInfo) -> None:
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; banklora loads safetensors adapters only")
    trained_on = (meta or {}).get("base_model", {}).get("sha256")
    if trained_on and trained_on != base.sha256:
        raise UsageError(
            f"adapter {adapter_dir} was trained on base model "
            f"{meta['base_model'].get('name')} (sha256 {trained_on[:12]}), but {base.name} has sha256 "
            f"{base.sha256[:12]}; pass the base it was trained on with --base-model"
        )


def save_adapter(model, tokenizer, output_dir: Path, meta: dict, extras: dict[str, Path] | None = None, state_dict: dict | None = None) -> Path:
    """Write adapter + tokenizer + metadata to a temporary directory, then rename into place.

    extras: {name: file or directory} copied in as well (metrics, loss curve, the best adapter).
    state_dict: the model's full state when it is sharded across processes (FSDP), else None.
    A crash at any point leaves either the previous adapter or the new one, never half of one.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad} if state_dict is None else {n: p for n, p in state_dict.items() if "lora_" in n}
        bad = [n for n, p in tensors.items() if not torch.isfinite(p).all()]
        if bad:
            raise BankloraError(f"refusing to save: {len(bad)} adapter tensors hold NaN or inf (e.g. {bad[0]})")
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=_json_default))
        for name, source in (extras or {}).items():
            (shutil.copytree if Path(source).is_dir() else shutil.copy2)(source, tmp / name)
        if output_dir.exists():
            output_dir.rename(old)
        try:
            tmp.rename(output_dir)
        except OSError:
            if old.exists():
                old.rename(output_dir)  # put the previous adapter back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if output_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
    return output_dir


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to metadata")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a report so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
