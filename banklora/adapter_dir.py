"""An adapter directory on disk: its file names, its config and banklora's metadata, read with
a sentence when damaged. No torch here: the model card and the exporters read adapters without
loading a model (banklora/modeling.py loads and saves them)."""

from __future__ import annotations

import json
from pathlib import Path

from banklora.errors import UsageError

META_FILE = "banklora_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DAMAGED_ADAPTER = "train the adapter again, or restore the directory from a backup"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_meta(adapter_dir: Path) -> dict:
    meta_path = Path(adapter_dir) / META_FILE
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{meta_path}:{exc.lineno}: not valid JSON; the adapter's metadata is damaged; {DAMAGED_ADAPTER}") from exc


def adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is damaged: not valid JSON ({exc}); {DAMAGED_ADAPTER}") from exc
