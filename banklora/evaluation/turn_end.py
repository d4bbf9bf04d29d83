"""The turn-end check: does a model end its answers on its own?

A pretrained Gemma (the embedded 270M is one) almost never predicted its turn tokens in
pretraining: their rows of the tied embedding / LM head are nearly untrained, so a LoRA adapter on
the projections alone learns a bank's tone but greedy decoding never picks <end_of_turn>, and every
answer runs to the token budget (docs/training.md, "Training recipe"). Two measurements say so:

1) teacher-forced, on reference answers: the probability the model gives <end_of_turn> right
   after the answer's last token, and that token's rank among the vocabulary there;
2) generated: the share of greedy answers that end within the token budget.

`banklora train` runs it on the validation split at the end of every run (metrics.jsonl, the
metadata, the model card) and `banklora doctor --model-path` on demand.
"""

from __future__ import annotations

import collections
import statistics as stats
from dataclasses import asdict, dataclass

import torch

from banklora.config import GenerationSettings
from banklora.data.format import IGNORE_INDEX, encode_conversation, special_ids

BUDGET = 160  # new tokens per generated answer: compare's default budget
# Below these a tuned model is told how to fix it (measured: after one epoch of LoRA alone, mean
# P = 0.0035 and 0 of 24 answers ended; with the turn tokens trained, 0.74 and 13 of 24).
LOW_PROBABILITY, LOW_SHARE = 0.2, 0.5


@dataclass
class TurnEnd:
    examples: int  # reference answers scored teacher-forced
    mean_probability: float  # mean P(<end_of_turn>) right after the answer's last token
    median_rank: float  # median rank of <end_of_turn> there (1 = the most likely token)
    prompts: int  # prompts answered greedily
    ended: int  # ... whose answer ended within the budget
    looped: int  # ... whose answer is a repetition loop (evaluation/metrics.py `loops`)
    budget: int  # new tokens each answer could take
    dtype: str = "float32"  # the weights it answered with (bf16 where the CPU has it: as chat, compare and serve load them)

    @property
    def ended_share(self) -> float:
        return self.ended / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"ended_share": round(self.ended_share, 4), "looped_share": round(self.looped / max(1, self.prompts), 4)}

    def summary(self) -> str:
        return (f"P(<end_of_turn>) after the answer {self.mean_probability:.3f} (median rank {self.median_rank:g}); "
                f"{self.ended} of {self.prompts} greedy answers ended within {self.budget} tokens, {self.looped} looped ({self.dtype} weights)")

    def warning(self) -> str | None:
        """A sentence that names the fix when the model rarely ends its turn, else None."""
        if self.mean_probability >= LOW_PROBABILITY and self.ended_share >= LOW_SHARE:
            return None
        return (f"the model rarely ends its answers ({self.summary()}): chat answers will run to the token budget. "
                "Train Gemma's turn tokens with the adapter (--train-tokens <start_of_turn>,<end_of_turn>, the default) "
                "and check that the data's answers are complete; more epochs help too")


@torch.inference_mode()
def end_probabilities(model, tokenizer, examples, batch_size: int = 8) -> list[tuple[float, int]]:
    """(P(<end_of_turn>), its rank) at the position right after each example's final answer,
    teacher-forced: the conversation and answer in the one formatter's ids, one forward pass per
    batch, logits only at those positions."""
    from banklora.inference.engine import left_padded

    end = special_ids(tokenizer)["end_of_turn"]
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    contexts = []
    for e in examples:
        enc = encode_conversation(tokenizer, e.question() + [{"role": "assistant", "content": e.output}], last_answer_only=True)
        last = max(k for k, label in enumerate(enc.labels) if label != IGNORE_INDEX)  # the answer's <end_of_turn>
        contexts.append(enc.input_ids[:last])  # everything before it: the next token should be <end_of_turn>
    out = []
    for b in range(0, len(contexts), batch_size):
        ids, mask, positions = left_padded(contexts[b : b + batch_size], tokenizer.pad_token_id or 0, device)
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]  # (B, H)
        logits = causal_lm.lm_head(hidden).float()  # (B, V)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = torch.softmax(logits, dim=-1)
        p_end = probs[:, end]
        ranks = (logits > logits[:, end : end + 1]).sum(dim=-1) + 1
        out += list(zip(p_end.tolist(), ranks.tolist()))
    return out


def check(model, tokenizer, examples, budget: int = BUDGET, batch_size: int = 64) -> TurnEnd:
    """The turn-end check on `examples` (with reference answers): teacher-forced probability and
    rank of <end_of_turn>, and greedy answers within `budget` new tokens."""
    from banklora.evaluation import metrics
    from banklora.evaluation.compare import prompt_ids
    from banklora.inference.generate import generate_batch

    was_training = model.training
    model.eval()
    try:
        scored = [e for e in examples if e.output]
        found = end_probabilities(model, tokenizer, scored)
        gens = generate_batch(model, tokenizer, [prompt_ids(tokenizer, e) for e in examples],
                              GenerationSettings(max_new_tokens=budget), batch_size=batch_size)
    finally:
        model.train(was_training)
    return TurnEnd(
        examples=len(found),
        mean_probability=round(stats.fmean(p for p, _ in found), 4) if found else 0.0,
        median_rank=stats.median(r for _, r in found) if found else 0.0,
        prompts=len(gens), ended=sum(g.finished for g in gens), looped=sum(metrics.loops(g.text) for g in gens), budget=budget,
        dtype=weights_dtype(model),
    )


def weights_dtype(model) -> str:
    """The dtype most of `model`'s weights are in ("bfloat16", "float32")."""
    sizes = collections.Counter()
    for param in model.parameters():
        sizes[param.dtype] += param.numel()
    return str(sizes.most_common(1)[0][0]).removeprefix("torch.") if sizes else "float32"
