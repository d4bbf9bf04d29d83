"""The model's own loops, found and marked for sequence-level unlikelihood training.

Token-level unlikelihood (banklora/loss.py) pushes down, at each reference token, the tokens the
reference already said: it acts on the reference answers, where the model never loops. A greedy
answer loops on its own text: "1. 立即联系银行官方客服热线… 2. 立即联系银行官方客服热线…", item after
item. Welleck et al. 2019 ("Neural text generation with unlikelihood training", section 5.2) train
on the model's own continuations instead: where the model repeated a span, the repeated tokens
are pushed down, -log(1 - p(token)), in the context the model itself made. banklora does that
near the end of training (--sequence-unlikelihood): the model answers some training questions
greedily, and each answer that loops (evaluation/metrics.py `loops`, compare's definition) joins
the batches with its repeats marked, and no cross-entropy (it is not a reference).

Only a loop's content is marked: tokens of a span of LOOP_NGRAM tokens said before, and of those
only the ones with a letter or a CJK character. The list markers, punctuation and line breaks a
copy also repeats are what a legitimate list needs (marked, they taught answers to stop breaking
lines: measured on the quickstart adapter, its reference perplexity rose from 22.0 to 26.5).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from banklora.data.format import IGNORE_INDEX, Encoded, encode_conversation

LOOP_NGRAM = 6  # tokens: a span this long said again is a copy (a list item's, a sentence's); shorter
#                 repeats (信用卡, 手机银行) are a bank's vocabulary
_CONTENT = re.compile(r"[^\W\d_]")  # a letter or a CJK character


@dataclass
class OwnLoops:
    """What the model's greedy answers to training questions gave, for training."""

    answers: list[Encoded]  # the looping answers, each with its repeats in `negatives`
    prompts: int  # questions answered
    looped: int  # answers that loop
    tokens: int  # repeats marked, over all answers

    def summary(self) -> str:
        return f"{self.looped} of {self.prompts} greedy answers to training questions loop; {self.tokens} repeated tokens to push down"

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "looped": self.looped, "tokens": self.tokens}

    def pick(self, k: int, seed: int) -> list[Encoded]:
        """k of the answers (all when fewer), drawn by `seed` alone: a resumed run draws the same."""
        return random.Random(seed).sample(self.answers, min(k, len(self.answers)))


def repeated_tokens(answer: list[int], is_content, n: int = LOOP_NGRAM) -> list[bool]:
    """For each token of `answer` (ids), whether it is a repeat to push down: inside a span of n
    tokens that occurred earlier in the answer, and content (is_content(id)), not a marker,
    punctuation or spacing."""
    marked = [False] * len(answer)
    seen = set()
    for end in range(n, len(answer) + 1):
        span = tuple(answer[end - n : end])
        if span in seen:
            for k in range(end - n, end):
                marked[k] = marked[k] or is_content(answer[k])
        seen.add(span)
    return marked


def content_tokens(tokenizer):
    """is_content(id): whether the token's text has a letter or a CJK character (cached)."""
    known: dict[int, bool] = {}

    def is_content(token: int) -> bool:
        if token not in known:
            known[token] = bool(_CONTENT.search(tokenizer.decode([token])))
        return known[token]

    return is_content


def marked_answer(tokenizer, example, answer: str, is_content) -> Encoded | None:
    """The example's question with `answer` (the model's own) in the formatter's ids, its repeats in
    `negatives` and no labels; None when nothing repeats."""
    encoded = encode_conversation(tokenizer, example.question() + [{"role": "assistant", "content": answer}], last_answer_only=True)
    positions = [k for k, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    marks = repeated_tokens([encoded.input_ids[k] for k in positions], is_content)
    if not any(marks):
        return None
    negatives = [IGNORE_INDEX] * len(encoded)
    for k, mark in zip(positions, marks):
        if mark:
            negatives[k] = encoded.input_ids[k]
    return Encoded(encoded.input_ids, [IGNORE_INDEX] * len(encoded), negatives)


def own_loops(model, tokenizer, examples, budget: int, batch_size: int = 64) -> OwnLoops:
    """Greedy answers of `model` (as it is: the caller puts it in eval mode and its answering
    dtype) to the examples' questions, within `budget` new tokens; the looping ones, marked."""
    from banklora.config import GenerationSettings
    from banklora.evaluation import metrics
    from banklora.evaluation.compare import prompt_ids
    from banklora.inference.generate import generate_batch

    gens = generate_batch(model, tokenizer, [prompt_ids(tokenizer, e) for e in examples], GenerationSettings(max_new_tokens=budget),
                          batch_size=batch_size)
    is_content = content_tokens(tokenizer)
    looping = [(e, g.text) for e, g in zip(examples, gens) if metrics.loops(g.text)]
    answers = [a for a in (marked_answer(tokenizer, e, text, is_content) for e, text in looping) if a is not None]
    return OwnLoops(answers, len(gens), len(looping), sum(sum(x != IGNORE_INDEX for x in a.negatives) for a in answers))
