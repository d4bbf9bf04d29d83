"""Deterministic question variants for the training split: phrasing templates and banking synonyms.

Only training examples are varied; validation and test are never touched, and each variant keeps
its source's answer. The same input always gives the same variants (no randomness), so an
augmented dataset can be rebuilt and its hash compared.
"""

from __future__ import annotations

import re
from dataclasses import replace

from banklora.data.dataset import Example

# Pairs of interchangeable terms, each used in both directions. Curated: each pair means the
# same thing to a retail-bank customer in the sentences where it occurs.
SYNONYMS_ZH = (
    ("信用卡", "贷记卡"),
    ("借记卡", "储蓄卡"),
    ("手机银行", "手机银行App"),
    ("网上银行", "网银"),
    ("房贷", "住房贷款"),
    ("提前还款", "提前还贷"),
    ("利率", "利息水平"),
    ("网点", "营业网点"),
    ("怎么办", "该如何处理"),
    ("怎么", "如何"),
    ("可以", "能"),
    ("需要", "要"),
    ("办理", "申请"),
    ("查询", "查看"),
    ("有什么", "有哪些"),
)
SYNONYMS_EN = (
    ("How do I", "How can I"),
    ("What is", "What's"),
    ("bank card", "debit card"),
    ("online banking", "internet banking"),
    ("mobile banking", "the mobile banking app"),
)
TEMPLATES_ZH = ("请问，{q}", "{q}麻烦详细说明一下。", "想咨询一下：{q}")
TEMPLATES_EN = ("Could you tell me: {q}", "{q} Please explain the steps.", "Quick question: {q}")


_VARIANT_ID = re.compile(r"-aug\d+$")  # the id variants() gives


def _swap(text: str, pairs) -> str | None:
    """Replace the first term of the table that occurs in `text` (either direction), else None."""
    for a, b in pairs:
        if a in text and b not in text:
            return text.replace(a, b, 1)
        if b in text:
            return text.replace(b, a, 1)
    return None


def variants(example: Example, count: int = 2) -> list[Example]:
    """Up to `count` new phrasings of a training example's question (same answer)."""
    if example.split != "train" or example.messages or _VARIANT_ID.search(example.id or ""):
        return []  # a variant `data augment` wrote is not varied again
    en = example.language == "en"
    synonyms, templates = (SYNONYMS_EN, TEMPLATES_EN) if en else (SYNONYMS_ZH, TEMPLATES_ZH)
    seed = sum(map(ord, example.id or example.instruction))  # deterministic template choice
    texts: list[str] = []
    swapped = _swap(example.instruction, synonyms)
    if swapped:
        texts.append(swapped)
    for k in range(len(templates)):
        template = templates[(seed + k) % len(templates)]
        texts.append(template.format(q=texts[0] if texts and k == 0 else example.instruction))
    seen, out = {example.instruction}, []
    for i, text in enumerate(texts):
        if text not in seen and len(out) < count:
            seen.add(text)
            out.append(replace(example, instruction=text, id=f"{example.id or 'example'}-aug{len(out) + 1}",
                               source=f"{example.source} (question variant {len(out) + 1})" if example.source else ""))
    return out


def augment(examples: list[Example], count: int = 2) -> list[Example]:
    """The examples followed by variants of each training example, none the same question as one
    already there (so a file this wrote, augmented again, gains nothing)."""
    out = list(examples)
    asked = {(e.instruction, e.input) for e in examples}
    for e in examples:
        for v in variants(e, count):
            if (v.instruction, v.input) not in asked:
                asked.add((v.instruction, v.input))
                out.append(v)
    return out
