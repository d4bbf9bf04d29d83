"""From loaded examples to what training may use: duplicates and over-long examples dropped and
counted, personal data refused or masked, splits separated.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from banklora.data import privacy
from banklora.data.dataset import Example
from banklora.data.format import Encoded, encode_conversation
from banklora.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    examples: list[Example]  # kept, in order
    encoded: list[Encoded]  # their token ids, same order
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    drops: list[str] = field(default_factory=list)  # "file:line: reason", for the log
    pii_redacted: int = 0

    def split(self, name: str) -> tuple[list[Example], list[Encoded]]:
        pairs = [(e, x) for e, x in zip(self.examples, self.encoded) if e.split == name]
        return [e for e, _ in pairs], [x for _, x in pairs]

    def summary(self) -> str:
        kept = Counter(e.split for e in self.examples)
        parts = [", ".join(f"{kept[s]} {s}" for s in ("train", "validation", "test") if kept[s]) or "none kept"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())))
        if self.pii_redacted:
            parts.append(f"{self.pii_redacted} personal data item(s) masked")
        return "; ".join(parts)


def _question_key(e: Example) -> str:
    return re.sub(r"\s+", " ", (e.prompt if not e.messages else repr(e.messages)).casefold()).strip()


def prepare(examples: list[Example], tokenizer, max_length: int, *, strict: bool = False, redact: bool = False) -> Prepared:
    """Validate and encode. Personal data fails unless redact; strict turns every drop into a failure."""
    findings = privacy.scan(examples)
    if findings and not redact:
        shown = "\n  ".join(str(f) for f in findings[:10])
        more = f"\n  ... and {len(findings) - 10} more" if len(findings) > 10 else ""
        raise UsageError(f"the data holds personal data that must not be trained on:\n  {shown}{more}\nremove it, or pass --redact to mask it")
    if findings:
        examples = privacy.redact_examples(examples)
    out = Prepared([], [], pii_redacted=len(findings))
    seen: dict[str, str] = {}
    for e in examples:
        key = _question_key(e)
        if key in seen:
            out.dropped["duplicate"] += 1
            out.drops.append(f"{e.source}: duplicate of {seen[key]}")
            continue
        enc = encode_conversation(tokenizer, e.conversation())
        if len(enc) > max_length:  # not "seen": a later copy that fits is kept, not called a duplicate
            out.dropped["over max length"] += 1
            out.drops.append(f"{e.source}: {len(enc)} tokens, over --max-length {max_length}")
            continue
        seen[key] = e.source
        out.examples.append(e)
        out.encoded.append(enc)
    if strict and out.drops:
        raise UsageError("--strict: these examples would be dropped:\n  " + "\n  ".join(out.drops))
    for line in out.drops:
        log.warning("skipped %s", line)
    return out
