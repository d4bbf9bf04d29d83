"""Writing files so that a reader never sees half of one, and JSON that every parser accepts.

Python's json writes NaN and Infinity by default, which is not JSON: a diverged loss would make
the metadata unreadable to other tools. Here non-finite floats become null, and dumps refuses
anything else that JSON cannot hold (allow_nan=False).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path


def finite(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(value, indent: int | None = None) -> str:
    """Strict JSON text: non-finite numbers as null, Chinese kept readable."""
    return json.dumps(finite(value), indent=indent, ensure_ascii=False, allow_nan=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_figure(fig, path: Path, **savefig) -> None:
    """A matplotlib figure saved as PNG beside `path`, then renamed into place (closed after)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, **savefig)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def read_head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a file, or b"" when it cannot be read: enough to tell a file banklora wrote."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_png_from_matplotlib(path: Path) -> bool:
    """A PNG that matplotlib wrote (its Software text chunk says so): a plot banklora may redraw."""
    head = read_head(path, 256)
    return head.startswith(b"\x89PNG") and b"Matplotlib" in head


def atomic_write_json(path: Path, value, indent: int | None = 2) -> None:
    atomic_write_text(path, to_json(value, indent) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """One strict JSON record per line (metrics.jsonl)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(to_json(record) + "\n")


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete directory `tmp` where `target` is, keeping the previous `target` if the
    rename fails: a reader sees the old directory or the new one, never a mix."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    remove(old)
    if target.exists() or target.is_symlink():
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old.exists() or old.is_symlink():
            old.rename(target)
        raise
    remove(old)  # a file or a link the user allowed to be replaced (--overwrite) goes too


def remove(path: Path) -> None:
    """Delete a directory tree, a file or a link, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
