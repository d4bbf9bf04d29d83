"""`banklora export`: a trained adapter taken to the engines banks run.

- hf: the adapter merged into the base in fp32, saved as a plain Gemma3ForCausalLM checkpoint
  (safetensors, `model.layers.*`, tied embeddings, no `lm_head.weight`) that transformers, vLLM
  and llama.cpp's converter load with no banklora code (banklora/export/hf.py).
- gguf: the merged model as one GGUF file for llama.cpp and Ollama, q8_0 (default), f16 or f32.
- gguf-lora: the adapter alone as a llama.cpp LoRA GGUF, to apply on a base GGUF the user has
  (the embedded Q4_K_M among them) with `llama-server -m base.gguf --lora adapter.gguf`.

Every GGUF gets an Ollama Modelfile beside it (banklora/export/gguf.py). Each export is built in a
temporary directory beside the output and renamed into place when complete, with
banklora_meta.json (lineage: base + sha256, adapter + its metadata, every file's size and sha256).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from banklora.errors import UsageError

log = logging.getLogger(__name__)

TYPES = {"hf": (), "gguf": ("q8_0", "f16", "f32"), "gguf-lora": ("f32", "f16", "q8_0")}
DEFAULT_TYPE = {"gguf": "q8_0", "gguf-lora": "f32"}
META = "banklora_meta.json"
FORMAT = "banklora-export/1"


@dataclass
class Exported:
    directory: Path
    files: dict[str, int]  # file name -> bytes
    seconds: float


def export(model_path: str, fmt: str, output: str | Path, *, gguf_type: str | None = None, base_model: str | None = None,
           overwrite: bool = False) -> Exported:
    """Export the adapter at `model_path` as `fmt` (hf, gguf, gguf-lora) into the directory `output`."""
    from banklora.modeling import is_adapter_dir, read_meta

    start = time.perf_counter()
    if fmt not in TYPES:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(TYPES)}")
    if fmt == "hf" and gguf_type is not None:
        raise UsageError("--type applies to --format gguf and gguf-lora; the hf checkpoint is always fp32")
    gguf_type = (gguf_type or DEFAULT_TYPE.get(fmt) or "").lower() or None
    if fmt != "hf" and gguf_type not in TYPES[fmt]:
        raise UsageError(f"--type {gguf_type}: --format {fmt} offers {', '.join(TYPES[fmt])} "
                         "(Q4_K_M and the other K-quants: run llama.cpp's llama-quantize on the f16 or q8_0 file)")
    if not is_adapter_dir(model_path):
        hint = "no such directory" if not Path(model_path).exists() else "no adapter_config.json there"
        raise UsageError(f"--model-path {model_path}: not a LoRA adapter directory ({hint}); train one with `banklora train`")
    from banklora import basemodel, destination

    adapter = Path(model_path)
    base_spec = base_model or read_meta(adapter).get("base_model", {}).get("path")
    reads = [("the adapter", adapter)] + basemodel.read_paths(base_spec)
    # an existing export is replaced only with --overwrite too: a user may have shipped it
    output = destination.check(output, "--output", directory=True, overwrite=overwrite, reads=reads, example=f"exports/{adapter.resolve().name}-{fmt}")
    if fmt == "gguf-lora":
        from banklora.export.gguf import check_lora_exportable

        check_lora_exportable(adapter)

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lineage = _lineage(adapter, base_model) | {"output": str(output)}
        if fmt == "hf":
            from banklora.export.hf import write_merged

            write_merged(adapter, base_model, tmp, lineage)
        elif fmt == "gguf":
            from banklora.export.gguf import write_model

            write_model(adapter, base_model, tmp, gguf_type, lineage)
        else:
            from banklora.export.gguf import write_lora

            write_lora(adapter, tmp, gguf_type, lineage)
        files = _file_table(tmp)
        meta = {"format": FORMAT, "kind": fmt, "type": gguf_type or "f32", "created_at": _now(), **lineage, "files": files}
        from banklora.io import atomic_write_json, replace_dir

        atomic_write_json(tmp / META, meta)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(output, {name: f["bytes"] for name, f in files.items()}, time.perf_counter() - start)


def _lineage(adapter: Path, base_model: str | None) -> dict:
    """Where the export comes from: the base (name, sha256) and the adapter (path, sha256, its metadata)."""
    import banklora
    from banklora import basemodel
    from banklora.modeling import check_adapter, read_meta, resolve_base

    meta = read_meta(adapter)
    base = resolve_base(base_model or meta.get("base_model", {}).get("name") or None, verify=True, named_by=None if base_model else adapter)
    check_adapter(adapter, meta, base)  # whole, and trained on this base
    weights = adapter / "adapter_model.safetensors"
    return {
        "base_model": {"name": base.name, "sha256": base.sha256, "hub_id": base.hub_id},
        "adapter": {"name": adapter.resolve().name, "path": str(adapter.resolve()),
                    "sha256": basemodel.sha256_file(weights) if weights.is_file() else None, "meta": meta},
        "banklora_version": banklora.__version__,
    }


def _file_table(directory: Path) -> dict:
    from banklora.basemodel import sha256_file

    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(directory.iterdir()) if p.is_file()}


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_export_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())
