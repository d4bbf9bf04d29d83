"""Personal data that banks must not train on: find it, report where, mask it.

Kinds: Chinese resident ID numbers (18 characters, ISO 7064 MOD 11-2 check character), bank
card numbers (16-19 digits passing the Luhn check), mainland mobile numbers (1[3-9] + 9 digits)
and e-mail addresses. Numbers are matched only as whole digit runs, so part of a longer number
is never reported, and the checksums keep ordinary figures from raising false alarms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from banklora.data.dataset import Example

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<!\d)\d{16,19}(?!\d)")
_CARD_SPACED = re.compile(r"(?<!\d)\d{4}(?: \d{4}){3}(?: \d{1,3})?(?!\d)")
_MOBILE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
MASKS = {"id_card": "[身份证号]", "bank_card": "[银行卡号]", "mobile": "[手机号]", "email": "[邮箱]"}
_FIELDS = ("instruction", "input", "output")


def valid_id_number(number: str) -> bool:
    """The 18th character of a resident ID is a checksum of the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) for every piece of personal data in `text`, in order."""
    found: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in taken)

    def add(kind: str, m: re.Match) -> None:
        found.append((kind, m.start(), m.end()))
        taken.append((m.start(), m.end()))

    for m in _ID.finditer(text):
        if valid_id_number(m.group()):
            add("id_card", m)
    for pattern in (_CARD, _CARD_SPACED):
        for m in pattern.finditer(text):
            if free(m.start(), m.end()) and luhn_ok(m.group().replace(" ", "")):
                add("bank_card", m)
    for m in _MOBILE.finditer(text):
        if free(m.start(), m.end()):
            add("mobile", m)
    for m in _EMAIL.finditer(text):
        add("email", m)
    return sorted(found, key=lambda f: f[1])


def redact(text: str) -> str:
    for kind, start, end in reversed(find_pii(text)):
        text = text[:start] + MASKS[kind] + text[end:]
    return text


@dataclass(frozen=True)
class Finding:
    source: str  # file:line
    field: str
    kind: str
    masked: str  # the value with its middle hidden, safe to print

    def __str__(self) -> str:
        return f"{self.source}: field '{self.field}': {self.kind} {self.masked}"


def _texts(example: Example) -> list[tuple[str, str]]:
    if example.messages:
        return [(f"messages[{i}]", content) for i, (_, content) in enumerate(example.messages)]
    return [(name, getattr(example, name)) for name in _FIELDS]


def scan(examples: list[Example]) -> list[Finding]:
    findings = []
    for e in examples:
        for field, text in _texts(e):
            for kind, start, end in find_pii(text):
                value = text[start:end]
                findings.append(Finding(e.source, field, kind, value[:3] + "*" * max(0, len(value) - 5) + value[-2:]))
    return findings


def redact_examples(examples: list[Example]) -> list[Example]:
    out = []
    for e in examples:
        changes = {name: redact(getattr(e, name)) for name in _FIELDS}
        if e.messages:
            changes["messages"] = tuple((role, redact(content)) for role, content in e.messages)
        out.append(replace(e, **changes))
    return out
