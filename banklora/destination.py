"""Where a command may write: the one rule for every path banklora creates or replaces.

- Replace only what banklora wrote (an adapter, an export, a report, a checkpoint folder: told
  by its marker files) or an empty directory; anything else needs --overwrite.
- Never a path the command reads (the adapter, the base model, the data, the caches) or a
  folder that holds one, even with --overwrite; never the current directory or one above it.
- Find out before any work starts that the destination can be written, so a long run never
  ends in a failed write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from banklora.errors import UsageError

Reads = Iterable[tuple[str, "str | Path | None"]]  # (what, path): "the adapter", outputs/lora_banking


def check(path: str | Path | None, flag: str, *, directory: bool, overwrite: bool = False, reads: Reads = (),
          ours: Callable[[Path], bool] | None = None, example: str = "") -> Path:
    """Refuse `path` as the destination of `flag` unless the rule above allows it; return it.

    directory: the command writes a directory there (else a file).
    ours(path): True when an existing destination is banklora's own and may be replaced
    without --overwrite (None: every existing destination needs --overwrite).
    """
    noun = "directory" if directory else "file"
    hint = f", e.g. {flag} {example}" if example else ""
    text = "" if path is None else str(path)
    if not text.strip():
        raise UsageError(f"{flag} is empty; name a {noun}{hint}")
    target = Path(text).expanduser()
    resolved = target.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(f"{flag} {text} is the current directory or a folder above it; name a new {noun}{hint}")
    for what, read in reads:
        if read is None or not str(read):
            continue
        source = Path(read).expanduser().resolve()
        if resolved == source or resolved in source.parents:
            relation = "is" if resolved == source else "holds"
            raise UsageError(f"{flag} {text} {relation} {what} ({read}), which this command reads; "
                             f"banklora never replaces it, even with --overwrite: name another {noun}{hint}")
    if target.exists() or target.is_symlink():
        if not directory and target.is_dir():
            raise UsageError(f"{flag} {text} is a directory; name a file{hint or ' inside it'}")
        if not (_empty_dir(target) or (ours is not None and ours(target)) or overwrite):
            what = "a file" if not target.is_dir() else f"a directory banklora did not write (it holds {_sample(target)})"
            raise UsageError(f"{flag} {text} exists and is {what}; name another {noun}, or pass --overwrite to replace it")
    check_writable(target, flag)
    return target


def check_writable(target: Path, flag: str) -> None:
    """Refuse `target` when its folder cannot be written: tried with a temporary file in the
    nearest folder that exists (permission bits do not tell for root or read-only mounts)."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {target}: {folder} is a file, not a folder; name a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".banklora-probe-", dir=folder)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot write in {folder} ({exc.strerror or exc}); choose a folder you can write to") from exc
    os.close(fd)
    os.unlink(probe)


def holds(*names: str) -> Callable[[Path], bool]:
    """An `ours` test: a directory holding one of these marker files (banklora_meta.json, ...)."""
    return lambda path: path.is_dir() and any((path / n).exists() for n in names)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def _sample(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
