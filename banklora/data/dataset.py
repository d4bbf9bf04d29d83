"""Banking Q&A examples: the schema, the built-in sets, and loading with validation.

A data file is JSON (a list of records, or {"examples": [...]}) or JSONL (one record a line).
A record: {"instruction": str, "input": str (optional), "output": str, "category": str
(optional), "keywords": [str] (optional), "id": str (optional), "language": str (optional)}.
Every problem is reported as file:line, field, and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Sequence

from banklora.data.format import user_text
from banklora.errors import UsageError

BUILTIN = {
    "banking": "banking_seed.json",  # the 16 training pairs
    "banking-eval": "banking_eval.json",  # the 8 comparison questions with keywords
}
_TEXT_FIELDS = ("instruction", "input", "output", "category", "id", "language")


@dataclass(frozen=True)
class Example:
    instruction: str
    output: str
    input: str = ""
    category: str = "general"
    keywords: tuple[str, ...] = ()
    id: str = ""
    language: str = "zh"
    source: str = field(default="", compare=False)  # "file:line", for messages

    @property
    def prompt(self) -> str:
        """The user turn as the model sees it."""
        return user_text(self.instruction, self.input)

    def to_record(self) -> dict:
        record = asdict(self)
        record["keywords"] = list(self.keywords)
        del record["source"]
        return record


def builtin_path(name: str) -> Path:
    return Path(str(files("banklora.data").joinpath(BUILTIN[name])))


def load_examples(specs: Sequence[str]) -> list[Example]:
    """Load and concatenate data sources: a built-in name ("banking") or a JSON/JSONL file."""
    if not specs:
        raise UsageError("no data given: pass --data banking (built-in) or --data FILE.jsonl")
    examples: list[Example] = []
    for spec in specs:
        examples += load_file(builtin_path(spec) if spec in BUILTIN else Path(spec), shown=spec)
    return examples


def load_file(path: Path, shown: str | None = None) -> list[Example]:
    shown = shown or str(path)
    if not path.is_file():
        names = ", ".join(BUILTIN)
        raise UsageError(f"data file {shown} does not exist; pass a JSON or JSONL file, or a built-in set ({names})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    records = _jsonl_records(text, shown) if path.suffix.lower() == ".jsonl" else _json_records(text, shown)
    examples = [_to_example(record, f"{shown}:{line}") for line, record in records]
    if not examples:
        raise UsageError(f"{shown} holds no examples; add records with instruction and output fields")
    return examples


def _jsonl_records(text: str, shown: str) -> list[tuple[int, object]]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{shown}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from exc
    return records


def _json_records(text: str, shown: str) -> list[tuple[int, object]]:
    """Records of a JSON document with the line each starts on."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{shown}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(doc, dict) and isinstance(doc.get("examples"), list):
        items = doc["examples"]
        start = text.index("[", text.index('"examples"'))
    elif isinstance(doc, list):
        items, start = doc, text.index("[")
    else:
        raise UsageError(f'{shown}:1: expected a JSON list of records or an object with an "examples" list')
    # Walk the array once more with raw_decode to learn where each record starts.
    decoder, pos, records = json.JSONDecoder(), start + 1, []
    for item in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        records.append((text.count("\n", 0, pos) + 1, item))
        pos = end
    return records


def _to_example(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected an object with instruction and output fields, got {type(record).__name__}")
    for name in ("instruction", "output"):
        if name not in record:
            raise UsageError(f"{where}: field '{name}' is missing; every example needs instruction and output")
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    for name in ("instruction", "output"):
        if not record[name].strip():
            raise UsageError(f"{where}: field '{name}' is empty; write the {'question' if name == 'instruction' else 'answer'} or remove the record")
    keywords = record.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise UsageError(f"{where}: field 'keywords' must be a list of non-empty strings")
    return Example(
        instruction=record["instruction"],
        output=record["output"],
        input=record.get("input") or "",
        category=record.get("category") or "general",
        keywords=tuple(k.strip() for k in keywords),
        id=record.get("id") or "",
        language=record.get("language") or "zh",
        source=where,
    )


def dataset_hash(examples: Iterable[Example]) -> str:
    """sha256 of the examples' content, independent of file layout."""
    payload = json.dumps([e.to_record() for e in examples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
