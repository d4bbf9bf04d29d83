"""Banking compliance flags on answers, from a rule file users can extend.

Rules (compliance_rules.yaml): `forbidden` patterns flag an answer that makes the statement
(guaranteed returns, asking for passwords or SMS codes) unless a negation (不要, 切勿, 谨防,
never, ...) stands just before it: "切勿告诉他人验证码" is advice, not a violation. `required`
patterns flag an answer to a question in the rule's categories that lacks all of them (the
wealth-management risk warning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from banklora.errors import UsageError

_NEGATION = re.compile(r"不|勿|没有|无需|无须|并非|谨防|警惕|拒绝|防范|骗|never|not\b|n't|\bno\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[。！？!?；;\n]|\.\s")
_QUOTES = {"“": "”", "「": "」", '"': '"', "‘": "’"}


def _negated_or_quoted(answer: str, start: int, end: int) -> bool:
    """True when the match is advice against it (a negation earlier in its sentence or inside
    it: "切勿告诉他人验证码", "验证码不要告诉他人") or a quoted mention ("谨防“保本保收益”的宣传")."""
    before = answer[max(0, start - 80) : start]
    cuts = list(_SENTENCE_END.finditer(before))
    clause = before[cuts[-1].end() :] if cuts else before
    if _NEGATION.search(clause) or _NEGATION.search(answer[start:end]):
        return True
    opening = answer[start - 1 : start] if start else ""
    return opening in _QUOTES and answer[end : end + 1] == _QUOTES[opening]


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str  # "forbidden" or "required"
    description: str
    patterns: tuple[re.Pattern, ...]
    categories: tuple[str, ...] = ()

    def violated(self, answer: str, category: str) -> bool:
        if self.kind == "required":
            return (not self.categories or category in self.categories) and not any(p.search(answer) for p in self.patterns)
        for p in self.patterns:
            for m in p.finditer(answer):
                if not _negated_or_quoted(answer, m.start(), m.end()):
                    return True
        return False


def load_rules(extra: Path | None = None) -> list[Rule]:
    """The built-in rules, plus those in `extra` (same YAML format)."""
    rules = _parse(files("banklora.evaluation").joinpath("compliance_rules.yaml").read_text(encoding="utf-8"), "built-in rules")
    if extra is not None:
        if not extra.is_file():
            raise UsageError(f"--compliance-rules {extra} does not exist")
        rules += _parse(extra.read_text(encoding="utf-8"), str(extra))
    return rules


def _parse(text: str, where: str) -> list[Rule]:
    import yaml

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML ({exc})") from exc
    rules = []
    for i, r in enumerate(doc.get("rules", []) if isinstance(doc, dict) else []):
        if not isinstance(r, dict) or not r.get("id") or r.get("kind") not in ("forbidden", "required") or not r.get("patterns"):
            raise UsageError(f"{where}: rule {i + 1} needs id, kind (forbidden or required) and patterns")
        try:
            patterns = tuple(re.compile(p, re.IGNORECASE) for p in r["patterns"])
        except re.error as exc:
            raise UsageError(f"{where}: rule {r['id']}: bad pattern ({exc})") from exc
        rules.append(Rule(r["id"], r["kind"], r.get("description", ""), patterns, tuple(r.get("categories") or ())))
    return rules


def flags(answer: str, category: str, rules: list[Rule]) -> list[str]:
    """Ids of the rules this answer violates."""
    return [rule.id for rule in rules if rule.violated(answer, category)]
