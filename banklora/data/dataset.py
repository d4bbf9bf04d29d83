"""Banking Q&A examples: the schema, the built-in sets, named datasets, and loading with validation.

Sources (`--data`, repeatable): a built-in name, a name registered in banklora_datasets.yaml, or
a file. Files: alpaca-style JSON (a list, or {"examples": [...]}) or JSONL records
{"instruction", "input"?, "output", "category"?, "keywords"?, "id"?, "language"?, "split"?};
chat-style JSONL records {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]};
CSV / TSV with instruction,input,output columns (keywords separated by "|").
Every problem is reported as file:line, field, and what to do. The standard library's json and
csv readers are used directly: they keep the line numbers those messages need.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Sequence

from banklora.data.format import user_text
from banklora.errors import UsageError

BUILTIN = {
    "banking": "banking.jsonl",  # the curated set: 360 pairs, 12 categories, zh + en, fixed splits
    "banking-seed": "banking_seed.json",  # the seed's 16 pairs (quickstart)
    "banking-eval": "banking_eval.json",  # the seed's 8 comparison questions with keywords
    "banking-paraphrase": "banking_paraphrase.jsonl",  # 72 train questions in a customer's words, train answers as references
}
SPLITS = ("train", "validation", "test")
REGISTRY_ENV = "BANKLORA_REGISTRY"
REGISTRY_FILE = "banklora_datasets.yaml"  # in the working directory, shared by a team in its repo
_TEXT_FIELDS = ("instruction", "input", "output", "category", "id", "language", "split", "as_of")


@dataclass(frozen=True)
class Example:
    instruction: str
    output: str
    input: str = ""
    category: str = "general"
    keywords: tuple[str, ...] = ()
    id: str = ""
    language: str = "zh"
    split: str = "train"
    as_of: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # chat-style records: (role, content) turns
    source: str = field(default="", compare=False)  # "file:line", for messages

    @property
    def prompt(self) -> str:
        """The (first) user turn as the model sees it."""
        return user_text(self.instruction, self.input)

    def conversation(self) -> list[dict]:
        """The example as chat messages: what the formatter encodes for training."""
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.output}]

    def question(self) -> list[dict]:
        """The conversation the reference answer responds to: every turn but the final answer.
        Compare generates from it and scores the reference after it, so both see the same turns."""
        return self.conversation()[:-1] if self.messages else [{"role": "user", "content": self.prompt}]

    @property
    def last_question(self) -> str:
        """The user turn the final answer responds to (for a one-turn example, the prompt)."""
        return self.question()[-1]["content"]

    def to_record(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("source", "messages")}
        record["keywords"] = list(self.keywords)
        if self.messages:
            record["messages"] = self.conversation()
        return record


def builtin_path(name: str) -> Path:
    return Path(str(files("banklora.data").joinpath(BUILTIN[name])))


# ------------------------------------------------------------------------------- named datasets
def registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or REGISTRY_FILE)


def read_registry(path: Path | None = None) -> dict[str, dict]:
    """Named datasets: {name: {"path": ..., "description": ...}}; paths relative to the file."""
    import yaml

    path = path or registry_path()
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc}); fix or remove the dataset registry") from exc
    entries = doc.get("datasets", {}) if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) and "path" in v for v in entries.values()):
        raise UsageError(f'{path}: expected "datasets:" mapping names to {{path: FILE}} entries')
    return {name: dict(entry, path=str((path.parent / entry["path"]).resolve())) for name, entry in entries.items()}


def register_dataset(name: str, data_path: Path, description: str = "", registry: Path | None = None) -> Path:
    """Add (or replace) a named dataset in the registry file; the file must load first."""
    import yaml

    registry = registry or registry_path()
    if name in BUILTIN:
        raise UsageError(f"{name} is a built-in dataset name; choose another")
    load_file(data_path)  # refuse to register a file that does not load
    doc = yaml.safe_load(registry.read_text(encoding="utf-8")) if registry.is_file() else None
    doc = doc or {}
    doc.setdefault("datasets", {})[name] = {"path": os.path.relpath(data_path.resolve(), registry.resolve().parent), "description": description}
    from banklora.io import atomic_write_text

    atomic_write_text(registry, yaml.safe_dump(doc, allow_unicode=True, sort_keys=True))
    return registry


# ------------------------------------------------------------------------------- loading
def load_examples(specs: Sequence[str], split: str | None = None, questions: bool = False) -> list[Example]:
    """Load and concatenate sources: built-in names, registered names, or files; optionally one split.

    questions=True loads evaluation questions, whose reference answer (output) may be missing.
    """
    if not specs:
        raise UsageError("no data given: pass --data banking (built-in) or --data FILE.jsonl")
    registry = None
    examples: list[Example] = []
    for spec in specs:
        if spec in BUILTIN:
            examples += load_file(builtin_path(spec), shown=spec, questions=questions)
            continue
        if not Path(spec).exists():
            registry = read_registry() if registry is None else registry
            if spec in registry:
                examples += load_file(Path(registry[spec]["path"]), questions=questions)
                continue
        examples += load_file(Path(spec), shown=spec, questions=questions)
    if split is not None:
        if split not in SPLITS:
            raise UsageError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
        examples = [e for e in examples if e.split == split]
    return examples


def source_paths(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """The files behind data sources (built-in, registered or paths), for banklora.destination;
    sources that do not resolve are left to load_examples to report."""
    found, registry = [], None
    for spec in specs:
        if spec in BUILTIN:
            found.append(("the data", builtin_path(spec)))
        elif Path(spec).exists():
            found.append(("the data", Path(spec)))
        else:
            registry = read_registry() if registry is None else registry
            if spec in registry:
                found.append(("the data", Path(registry[spec]["path"])))
    return found


def load_file(path: Path, shown: str | None = None, questions: bool = False) -> list[Example]:
    shown = shown or str(path)
    if path.is_dir():
        raise UsageError(f"data {shown} is a directory; pass a JSON, JSONL, CSV or TSV file in it (--data may be repeated)")
    if not path.is_file():
        names = ", ".join(BUILTIN)
        raise UsageError(f"data file {shown} does not exist; pass a JSON, JSONL, CSV or TSV file, a built-in set ({names}), or a name from {registry_path()}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(text, shown)
    elif suffix in (".csv", ".tsv"):
        records = _csv_records(text, shown, "\t" if suffix == ".tsv" else ",")
    else:
        records = _json_records(text, shown)
    examples = [_to_example(record, f"{shown}:{line}", questions) for line, record in records]
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


def _csv_records(text: str, shown: str, delimiter: str) -> list[tuple[int, object]]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = reader.fieldnames or []
    missing = [c for c in ("instruction", "output") if c not in columns]
    if missing:
        raise UsageError(f"{shown}:1: header lacks column(s) {missing}; the first row must name instruction,input,output")
    records = []
    for row in reader:
        if None in row:
            raise UsageError(f"{shown}:{reader.line_num}: more fields than the header has columns; quote fields that contain '{delimiter}'")
        record = {k: v for k, v in row.items() if v not in (None, "")}
        if "keywords" in record:
            record["keywords"] = [k.strip() for k in record["keywords"].split("|") if k.strip()]
        record.setdefault("output", "")
        record.setdefault("instruction", "")
        records.append((reader.line_num, record))
    return records


def _to_example(record: object, where: str, questions: bool = False) -> Example:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected an object with instruction and output fields, got {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record, where)
    if questions and not (record.get("output") or "").strip():
        record = dict(record, output="")  # a question without a reference answer
        _check_text_fields(record, where)
        if "instruction" not in record or not record["instruction"].strip():
            raise UsageError(f"{where}: field 'instruction' is missing or empty; write the question")
        return _example(record, where, instruction=record["instruction"], output="")
    for name in ("instruction", "output"):
        if name not in record:
            raise UsageError(f"{where}: field '{name}' is missing; every example needs instruction and output (or messages)")
    _check_text_fields(record, where)
    for name in ("instruction", "output"):
        if not record[name].strip():
            raise UsageError(f"{where}: field '{name}' is empty; write the {'question' if name == 'instruction' else 'answer'} or remove the record")
    return _example(record, where, instruction=record["instruction"], output=record["output"])


def _chat_example(record: dict, where: str) -> Example:
    """A chat-style record: system text joins the first user turn; every assistant turn is trained."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns: list[tuple[str, str]] = []
    system = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise UsageError(f"{where}: field 'messages[{i}]' must be {{\"role\": system|user|assistant, \"content\": string}}")
        if not m["content"].strip():
            raise UsageError(f"{where}: field 'messages[{i}].content' is empty")
        if m["role"] == "system":
            if i != 0:
                raise UsageError(f"{where}: field 'messages[{i}]': a system message may only come first")
            system = m["content"].strip()
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise UsageError(f"{where}: field 'messages[{i}].role' is {m['role']!r}; expected {expected!r} (turns alternate, user first)")
        turns.append((m["role"], m["content"].strip()))
    if not turns or turns[-1][0] != "assistant":
        raise UsageError(f"{where}: field 'messages' must end with an assistant turn (the answer to learn)")
    if system:
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    _check_text_fields(record, where)
    return _example(record, where, instruction=turns[0][1], output=turns[-1][1], messages=tuple(turns))


def _check_text_fields(record: dict, where: str) -> None:
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if record.get("split", "train") not in SPLITS:
        raise UsageError(f"{where}: field 'split' must be one of {', '.join(SPLITS)} (got {record['split']!r})")
    keywords = record.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise UsageError(f"{where}: field 'keywords' must be a list of non-empty strings")


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_language(text: str) -> str:
    """zh or en for a record without a `language` field: zh when Chinese characters are at least a
    tenth of the letters (an answer naming "APP", "ATM" or "USD" stays zh), else en."""
    han, latin = len(_HAN.findall(text)), len(_LATIN.findall(text))
    return "zh" if han and han >= 0.1 * (han + latin) else "en"


def _example(record: dict, where: str, **fields) -> Example:
    return Example(
        input=record.get("input") or "",
        category=record.get("category") or "general",
        keywords=tuple(k.strip() for k in record.get("keywords") or []),
        id=record.get("id") or "",
        language=record.get("language") or detect_language(" ".join((fields["instruction"], record.get("input") or "", fields["output"]))),
        split=record.get("split") or "train",
        as_of=record.get("as_of") or "",
        source=where,
        **fields,
    )


def dataset_hash(examples: Iterable[Example]) -> str:
    """sha256 of the examples' content, independent of file layout."""
    payload = json.dumps([e.to_record() for e in examples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_jsonl(examples: Iterable[Example], path: Path) -> Path:
    """Write examples as JSONL, atomically."""
    from banklora.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in examples))
    return path
