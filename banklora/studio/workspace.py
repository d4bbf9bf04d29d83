"""The studio's workspace: one directory that holds everything the web pages make.

    data/       uploaded data files, stored under generated names (upload-<hex>.<ext>) beside a
                small JSON record of the name the user gave
    runs/       adapters trained from the studio (runs/<name>) and their checkpoints
    reports/    compare reports (<job>.json / .md / .html)
    exports/    exports (<job>/...) and their downloads
    jobs/       one JSON record and one log per job

Every path a request names goes through `Workspace.resolve`, which refuses `..`, absolute paths
and symlinks that lead out of the workspace.
"""

from __future__ import annotations

import csv
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from banklora.errors import UsageError
from banklora.io import atomic_write_json

UPLOAD_LIMIT = 20 * 1024 * 1024  # bytes: the built-in set is ~0.3 MB; 20 MB is tens of thousands of examples
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # also a served model's name: PEFT adapter names allow no dots
UPLOAD_NAME = re.compile(r"upload-[0-9a-f]{12}\.(jsonl|json|csv|tsv)")  # fullmatch: no trailing newline


class OutsideWorkspace(UsageError):
    """A request named a path that does not resolve inside the workspace."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: Path) -> "Workspace":
        root = Path(root).expanduser().resolve()
        for sub in ("data", "runs", "reports", "exports", "jobs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return cls(root)

    data = property(lambda self: self.root / "data")
    runs = property(lambda self: self.root / "runs")
    reports = property(lambda self: self.root / "reports")
    exports = property(lambda self: self.root / "exports")
    jobs = property(lambda self: self.root / "jobs")

    def resolve(self, relative: str) -> Path:
        """`relative` (a path a request named) as a path inside the workspace, symlinks followed;
        OutsideWorkspace when it is absolute, climbs with `..` or resolves outside."""
        if not relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
            raise OutsideWorkspace(f"{relative!r}: give a path inside the studio's workspace, not an absolute one")
        parts = re.split(r"[/\\]", relative)
        if any(p in ("..", "") for p in parts) or "\0" in relative:
            raise OutsideWorkspace(f"{relative!r}: '..', empty parts and NUL are not allowed in a workspace path")
        try:
            path = (self.root / relative).resolve()
        except (OSError, ValueError) as exc:  # a part too long for the file system, a link loop
            raise OutsideWorkspace(f"{relative!r}: not a path in the workspace ({exc})") from exc
        if not path.is_relative_to(self.root):
            raise OutsideWorkspace(f"{relative!r} leads outside the studio's workspace")
        return path

    # ---------------------------------------------------------------- uploads
    def store_upload(self, filename: str, body: bytes) -> tuple[str, Path]:
        """Check an uploaded data file as `--data` would read it, then keep it under a generated
        name. Returns (name, path). Nothing is stored when the check fails (UsageError)."""
        from banklora.data.dataset import load_file

        shown = Path(filename or "").name
        suffix = Path(shown).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise UsageError(f"{shown or 'the upload'}: a data file must end in {', '.join(UPLOAD_SUFFIXES)} (JSONL, JSON, CSV, TSV)")
        if len(body) > UPLOAD_LIMIT:
            raise UsageError(f"{shown}: {len(body):,} bytes is over the upload limit of {UPLOAD_LIMIT:,}")
        name = f"upload-{secrets.token_hex(6)}{suffix}"
        tmp = self.data / f".part-{name}"  # the suffix stays: it says how to read the file
        try:
            tmp.write_bytes(body)
            try:
                examples = load_file(tmp, shown=shown)  # the CLI's own reader: the same errors, with the user's file name
            except (ValueError, RecursionError, csv.Error) as exc:  # what the reader does not put in a sentence itself
                raise UsageError(f"{shown}: could not be read as {suffix[1:].upper()} ({type(exc).__name__}: {exc})") from exc
            atomic_write_json(self.data / f"{name}.meta.json", {"filename": shown, "examples": len(examples), "uploaded": time.time()})
            tmp.rename(self.data / name)
        finally:
            tmp.unlink(missing_ok=True)
        return name, self.data / name

    def upload_path(self, name: str) -> Path:
        if not isinstance(name, str) or not UPLOAD_NAME.fullmatch(name) or not (self.data / name).is_file():
            raise UsageError(f"{name!r} is not a data set of this workspace; upload it first")
        return self.data / name

    def uploads(self) -> list[dict]:
        out = []
        for meta in sorted(self.data.glob("upload-*.meta.json"), key=lambda p: p.stat().st_mtime):
            name = meta.name.removesuffix(".meta.json")
            if not (self.data / name).is_file():
                continue
            try:
                out.append({"name": name, **json.loads(meta.read_text(encoding="utf-8"))})
            except ValueError:  # a record damaged outside the studio: the file stays usable under its stored name
                out.append({"name": name, "filename": name, "examples": None})
        return out

    # ---------------------------------------------------------------- runs
    def run_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise UsageError(f"run name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit")
        return self.runs / name

    def adapters(self) -> list[tuple[str, Path]]:
        """Adapters trained in the workspace (complete ones: written atomically, so present = complete), oldest first."""
        from banklora.modeling import is_adapter_dir

        found = [p for p in self.runs.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name) and is_adapter_dir(p)]
        return [(p.name, p) for p in sorted(found, key=lambda p: p.stat().st_mtime)]
