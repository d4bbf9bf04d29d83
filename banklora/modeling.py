"""The one loader, and the adapter on disk.

`load()` is the only function in banklora that builds a model: a base model, or a base model
plus one or more LoRA adapters. Training, compare, chat and doctor all call it; the serving fast
paths (banklora/inference/fast_paths.py) are applied here too. An adapter directory is plain PEFT
(adapter_config.json + adapter_model.safetensors) plus the tokenizer with its chat template,
banklora_meta.json and a model card (README.md), written to a temporary directory, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from banklora import basemodel, card
from banklora.adapter_dir import (  # noqa: F401  (META_FILE, ADAPTER_WEIGHTS: read through modeling by callers)
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, DAMAGED_ADAPTER, META_FILE, adapter_config, is_adapter_dir, read_meta,
)
from banklora.basemodel import BaseModelInfo
from banklora.config import DTYPES
from banklora.data.format import GEMMA_CHAT_TEMPLATE, special_ids
from banklora.errors import BankloraError, UsageError
from banklora.io import replace_dir, to_json
from banklora.inference import fast_paths
from banklora.inference.fast_paths import ServingSettings

log = logging.getLogger(__name__)



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


def load_tokenizer(base_model: str | None = None):
    """The tokenizer of a base model, without loading (or hashing) its weights; checked to be
    Gemma's, so a wrong base is a sentence, not a traceback later."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(basemodel.tokenizer_path(base_model))
    tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
    special_ids(tokenizer)
    return tokenizer


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX512-BF16 or AMX), so torch's oneDNN kernels run bf16
    matmuls faster than fp32 ones; without it they are emulated, many times slower."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def mixed_precision(setting: str, device: torch.device) -> str | None:
    """"bf16" when training on `device` runs the frozen base's products in bf16 under autocast
    over fp32 weights (LoRA, AdamW state, the residual stream and the loss stay fp32): on CPUs
    with AVX512-BF16 or AMX for --dtype auto, on every CPU for --dtype bf16. None otherwise
    (fp32; CUDA's bf16 loads bf16 weights, pick_dtype)."""
    if device.type != "cpu" or setting == "fp32":
        return None
    if setting == "bf16":
        if not cpu_bf16():
            log.warning("--dtype bf16: this CPU has neither AVX512-BF16 nor AMX, so bf16 products are emulated and much slower than fp32")
        return "bf16"
    return "bf16" if cpu_bf16() else None


def pick_dtype(setting: str, device: torch.device, training: bool = False) -> torch.dtype:
    """The weights' dtype. bf16 on CUDA. On CPU: for answering (chat, compare, serve, the turn-end
    check), bf16 where the CPU multiplies it natively (cpu_bf16): half the bytes read per token,
    measured 2x faster generation (docs/performance.md); fp32 elsewhere, where bf16 products are
    emulated and many times slower. Training on CPU loads fp32 weights: its bf16 runs under
    autocast over them (mixed_precision)."""
    if setting in ("fp16", "float16", "half"):
        raise UsageError("fp16 is refused for Gemma: activations reach ~8e5 and overflow float16; use bf16 or fp32")
    if setting not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {setting!r})")
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        if device.type == "cpu" and not cpu_bf16():
            log.warning("--dtype bf16: this CPU has neither AVX512-BF16 nor AMX, so bf16 products are emulated and much slower than fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and not training and cpu_bf16() else torch.float32


@contextlib.contextmanager
def frozen_in_bf16(model):
    """The base's floating-point weights in bf16 while the block runs, the fp32 tensors put back
    after: a model with fp32 weights answers as `load` loads it for answering on a CPU with native
    bf16, at the same ~2x speed (the turn-end check after bf16 mixed-precision training; compare's
    answers). Trainable weights and the adapters' own (LoRA, trained token rows) stay fp32, as
    PEFT keeps them over a bf16 base."""
    kept = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and param.dtype == torch.float32 and not any(part in name for part in _ADAPTER_PARTS):
            kept[param] = param.data
            param.data = param.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for param, data in kept.items():
            param.data = data


ANSWERING_ATTENTION = "sdpa"  # how a model loaded for answering attends (training loads eager)
_ADAPTER_PARTS = ("lora_", "trainable_tokens_")  # PEFT's names for an adapter's own weights


@contextlib.contextmanager
def merged_adapter(peft_model, *, copies: bool = True):
    """The active adapter merged into the base's weights while the block runs (PEFT's
    merge_adapter), the base's tensors put back bit for bit after: one product per linear instead
    of the LoRA products beside it (the 270M's knowledge test in fp32: 41 -> 31 s, option
    likelihoods within 7e-6 of the unmerged ones). The LoRA layers' base weights are merged into
    copies (copies=True; the 270M's: 400 MB in fp32), or, copies=False, into tensors that already
    are (frozen_in_bf16's); PEFT puts trained token rows back itself. Unmerging alone would move
    the weights by float rounding."""
    from peft.tuners.lora import LoraLayer

    kept = {}
    if copies:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                kept[weight] = weight.data
                weight.data = weight.data.clone()
    peft_model.merge_adapter()
    try:
        yield peft_model
    finally:
        peft_model.unmerge_adapter()
        for weight, data in kept.items():
            weight.data = data


def load(
    model_path: str | None = None,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    training: bool = False,
    more_adapters: tuple[str, ...] = (),
    names: tuple[str, ...] | None = None,
    quantize: str | None = None,
    serve: ServingSettings | None = None,
    verify: bool = False,
    tokenizer=None,
) -> Loaded:
    """Load a base model, or base + adapter when `model_path` is an adapter directory.

    model_path: an adapter directory (its base comes from its metadata unless base_model is
    given), or a base model (embedded name, directory, hub id). training=True loads a base for
    LoRA training (eager attention, as transformers recommends for Gemma 3).
    more_adapters are loaded beside the first, each checked against the same base; adapters are
    named after their directories unless `names` names them (Loaded.adapter_names);
    model.set_adapter(name) switches.
    quantize="4bit" loads the base in NF4 through bitsandbytes (QLoRA; CUDA only).
    serve: the CPU fast paths for answering (merge, int8 head, fp16 weights; banklora/inference/fast_paths.py).
    verify=True checks the base weights' sha256 (about 1 s per GB), for commands where that is
    small next to their own run; without it, only files changed since their last hash are hashed.
    tokenizer: the base's tokenizer when the caller has loaded it already (load_tokenizer), so its
    33 MB of JSON are not parsed twice.
    """
    serve = serve or ServingSettings()
    adapter_dir, meta = None, None
    if model_path is not None and is_adapter_dir(model_path):
        adapter_dir = Path(model_path)
        meta = read_meta(adapter_dir)
        from_adapter = None if base_model else adapter_dir  # the base named by the adapter, not by the user's --base-model
        base_model = base_model or meta.get("base_model", {}).get("name") or _peft_base(adapter_dir)
    elif model_path is not None:
        path = Path(model_path).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"{model_path} is neither an adapter (no {ADAPTER_CONFIG}) nor a model directory (no config.json)")
        if not path.exists() and not basemodel.is_embedded(model_path) and not basemodel.looks_like_hub_id(model_path):
            raise UsageError(f"{model_path} does not exist; train an adapter there with `banklora train --output-dir {model_path}`")
        base_model = model_path
    adapters = [adapter_dir, *map(Path, more_adapters)] if adapter_dir is not None else []
    if more_adapters and adapter_dir is None:
        raise UsageError("more adapters were given, but the first model path is not an adapter")
    dev = pick_device(device)
    serve.check(training=training, device=dev, adapters=len(adapters))
    base = resolve_base(base_model, verify=verify, named_by=from_adapter if adapter_dir is not None else None)
    for path in adapters:
        check_adapter(path, meta if path == adapter_dir else read_meta(path), base)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer is None or adapter_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else base.path)
        tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
    special_ids(tokenizer)  # a non-Gemma tokenizer: a sentence now, before the weights load
    torch_dtype = pick_dtype(dtype, dev, training)
    if torch_dtype == torch.bfloat16 and (serve.int8_head or serve.fp16_weights):  # fast paths over fp32 weights
        if dtype == "bf16":
            raise UsageError("--int8 and --fp16 are fast paths over fp32 weights; drop them, or --dtype bf16 (bf16 weights are faster "
                             "where the CPU has AVX512-BF16 or AMX)")
        torch_dtype = torch.float32
    if serve.int8_weights and torch_dtype != torch.bfloat16:
        raise UsageError("--quantize int8 multiplies int8 weights with bf16 inputs, which needs bf16 weights: a CPU with AVX512-BF16 "
                         "or AMX and --dtype auto or bf16 (`banklora doctor` says what this CPU has); elsewhere --int8 puts the LM "
                         "head in int8")
    extra = {}
    if quantize not in (None, "4bit"):
        raise UsageError(f"--quantize takes 4bit (QLoRA) or nothing (got {quantize!r}); the int8 head is ServingSettings(int8_head=True)")
    if quantize == "4bit":
        _check_qlora(dev)
        from transformers import BitsAndBytesConfig

        torch_dtype = torch.bfloat16
        extra = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": dev}}
    model = AutoModelForCausalLM.from_pretrained(
        base.path, dtype=torch_dtype, use_safetensors=True, attn_implementation="eager" if training else ANSWERING_ATTENTION, **extra
    )
    if quantize != "4bit":
        model = model.to(dev)
    names = list(names) if names else adapter_names([str(p) for p in adapters])
    for name in names:
        if not name or "." in name:
            raise UsageError(f"adapter name {name!r}: use letters, digits, '-' or '_' (no '.': PEFT names its modules after adapters)")
    if adapters:
        from peft import PeftModel

        # PEFT cannot load an adapter without trained token rows after one with them (a KeyError on the token
        # wrapper's delta; the other order works): those load first. The first one named stays active.
        rows = [bool(adapter_config(a).get("trainable_token_indices")) for a in adapters]
        order = sorted(range(len(adapters)), key=lambda i: rows[i])
        with warnings.catch_warnings():
            for i in order:  # PEFT saves trained token rows once, under the tied embedding, then misses the head's copy
                for wording in _TIED_HEAD_ROWS if rows[i] else ():
                    warnings.filterwarnings("ignore", category=UserWarning, message=re.escape(wording.format(name=names[i])) + r"\Z")
            model = PeftModel.from_pretrained(model, adapters[order[0]], adapter_name=names[order[0]], is_trainable=False)
            for i in order[1:]:
                model.load_adapter(adapters[i], adapter_name=names[i], is_trainable=False)
        model.set_adapter(names[0])
    model.eval()
    if not training:
        model = fast_paths.apply(model, serve, dev, len(adapters))
    return Loaded(model, tokenizer, base, dev, torch_dtype, adapter_dir, meta, names)


# PEFT's warning on loading an adapter with trained token rows whose name holds its LoRA prefix "lora_" (the
# default lora_banking does): the LM head shares the rows with the tied embedding, which PEFT saved, so nothing
# is missing. Only this exact message is silenced, in PEFT's wording before 0.22 and since; any other missing key
# is still reported.
_TIED_HEAD_ROWS = ("Found missing adapter keys while loading the checkpoint: ['base_model.model.lm_head.token_adapter.trainable_tokens_delta.{name}'].",
                   "Found missing adapter keys: ['base_model.model.lm_head.token_adapter.trainable_tokens_delta.{name}'] while loading the checkpoint.")


def add_lora(model, lora, quantized: bool = False, tokenizer=None):
    """The base model wrapped with new trainable LoRA layers (PEFT), as `lora` (LoraSettings) says,
    and the embedding rows of `lora.train_tokens` trained beside them (PEFT's trainable tokens,
    tied to the LM head where the model ties it; `tokenizer` looks their ids up)."""
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "vision" not in name})
    unknown = [t for t in lora.target_modules if t not in linear]
    if unknown:
        raise UsageError(f"--lora-targets: {', '.join(unknown)} is not a linear layer of this model; choose from {', '.join(linear)}")
    targets: list[str] | str = list(lora.target_modules)
    if any("vision_tower" in name for name, _ in model.named_modules()):
        # Gemma 3 4B and larger carry a vision tower: adapt the language model only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})"
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    token_rows = None
    if lora.train_tokens:
        embed = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
        token_rows = {embed.rsplit(".", 1)[-1]: train_token_ids(tokenizer, lora.train_tokens)}
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, target_modules=targets,
                        use_rslora=lora.use_rslora, use_dora=lora.use_dora, trainable_token_indices=token_rows, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_token_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """The ids of --train-tokens in this tokenizer: each must be one token the tokenizer knows."""
    if tokenizer is None:
        raise ValueError("train_tokens needs the tokenizer to look their ids up")
    ids = []
    for token in tokens:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise UsageError(f"--train-tokens: {token!r} is not a token of this tokenizer; name control tokens such as "
                             f"<start_of_turn>,<end_of_turn>,<eos>, or pass --train-tokens none")
        ids.append(int(i))
    return ids


def _check_qlora(device: torch.device) -> None:
    if device.type != "cuda":
        raise UsageError("--quantize 4bit (QLoRA) needs a CUDA GPU; bitsandbytes' 4-bit layers do not train on this CPU. Train without --quantize (fp32 LoRA)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UsageError("--quantize 4bit needs bitsandbytes: pip install 'banklora[qlora]'") from exc


def adapter_names(paths: list[str]) -> list[str]:
    """Short unique names for adapters: their directory names ("." as "_": PEFT names modules
    after its adapters), numbered when they repeat."""
    names: list[str] = []
    for p in paths:
        name = (Path(p).resolve().name or "adapter").replace(".", "_")
        candidate, i = name, 2
        while candidate in names or candidate == "base":
            candidate, i = f"{name}-{i}", i + 1
        names.append(candidate)
    return names


def _peft_base(adapter_dir: Path) -> str | None:
    return adapter_config(adapter_dir).get("base_model_name_or_path")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def resolve_base(spec: str | None, *, verify: bool, named_by: Path | None = None) -> BaseModelInfo:
    """basemodel.resolve; when the adapter at `named_by` named the base (the user passed no
    --base-model), a base that is not here is said as such, not as a flag the user never gave."""
    try:
        return basemodel.resolve(spec, verify=verify)
    except UsageError as exc:
        if named_by is None:
            raise
        reason = str(exc).removeprefix(f"--base-model {spec}: ")
        raise UsageError(f"{named_by} was trained on base model {spec!r}, which is not on this machine ({reason}); "
                         "pass that base model's directory or hub id with --base-model") from exc


def _check_finite(weights: Path) -> None:
    """Every adapter tensor finite: a NaN in one LoRA matrix makes every answer empty and every
    export carry it. The adapter is a few MB, so reading it all costs milliseconds."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        bad = [name for name in f.keys() if not torch.isfinite(f.get_tensor(name)).all()]
    if bad:
        raise UsageError(f"{weights}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); the adapter is damaged; {DAMAGED_ADAPTER}")


def check_adapter(adapter_dir: Path, meta: dict | None, base: BaseModelInfo) -> None:
    """The adapter's files are whole and it belongs to this base (by the base weights' sha256)."""
    if not is_adapter_dir(adapter_dir):
        raise UsageError(f"{adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UsageError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; banklora loads safetensors adapters only")
    basemodel.check_safetensors(weights, DAMAGED_ADAPTER)
    _check_finite(weights)
    trained_on = (meta or {}).get("base_model", {}).get("sha256")
    if trained_on and trained_on != base.sha256:
        raise UsageError(
            f"adapter {adapter_dir} was trained on base model "
            f"{meta['base_model'].get('name')} (sha256 {trained_on[:12]}), but {base.name} has sha256 "
            f"{base.sha256[:12]}; pass the base it was trained on with --base-model"
        )


def save_adapter(model, tokenizer, output_dir: Path, meta: dict, extras: dict[str, Path] | None = None, state_dict: dict | None = None) -> Path:
    """Write adapter + tokenizer + metadata + model card to a temporary directory, then rename it
    into place.

    extras: {name: file or directory} copied in as well (metrics, loss curve, the best adapter).
    state_dict: the model's full state when it is sharded across processes (FSDP), else None.
    A crash at any point leaves either the previous adapter or the new one, never half of one.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad} if state_dict is None else {n: p for n, p in state_dict.items() if "lora_" in n}
        bad = [n for n, p in tensors.items() if not torch.isfinite(p).all()]
        if bad:
            raise BankloraError(f"refusing to save: {len(bad)} adapter tensors hold NaN or inf (e.g. {bad[0]})")
        # save_embedding_layers=False: LoRA never trains the embeddings here, and PEFT would ask the hub about the base
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False)
        tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(to_json(meta, indent=2))
        (tmp / card.FILE).write_text(card.model_card(meta, adapter_config(tmp)), encoding="utf-8")  # in place of PEFT's empty template
        for name, source in (extras or {}).items():
            (shutil.copytree if Path(source).is_dir() else shutil.copy2)(source, tmp / name)
        replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
