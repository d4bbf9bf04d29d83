"""What the fast serving paths cost in answer quality: the merged adapter in fp32 against the same
with an int8 LM head (--int8), fp16 decoder weights (--fp16), or both; or chat's default path
(bf16 weights on CPUs with native bf16) against `--quantize int8` (int8 weights for decoding).

    .venv/bin/python bench/serving_quality.py --adapter outputs/lora_banking                   # int8 head, the seed's 8 questions
    .venv/bin/python bench/serving_quality.py --adapter outputs/lora_banking --variant int8+fp16 --questions banking --split test
    .venv/bin/python bench/serving_quality.py --adapter outputs/lora_banking --variant quantize-int8 --questions banking --split test

Both answer the same questions greedily with compare's token budget (160); each answer is
scored with compare's metrics, and the pair gets compare's paired statistics (mean delta,
bootstrap CI, Wilcoxon p, win/tie/loss). Also printed: answer tokens/s of each. compare's
reference NLL is teacher-forced in one pass (a prompt's path: bf16 weights under --quantize
int8); --decode-nll N also scores the first N reference answers one token at a time through the
decoding path (cached, one row), where --quantize int8 reads its int8 weights.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--questions", default="banking-eval")
    parser.add_argument("--split")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--variant", choices=["int8", "fp16", "int8+fp16", "quantize-int8"], default="int8")
    parser.add_argument("--decode-nll", type=int, default=0, metavar="N", help="score N reference answers token by token (decoding path)")
    args = parser.parse_args()

    from banklora.config import GenerationSettings
    from banklora.data.dataset import load_examples
    from banklora.evaluation import compliance
    from banklora.evaluation.compare import compare_pair, prompt_ids, reference_nll, score
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load
    from banklora.inference.fast_paths import ServingSettings

    examples = load_examples([args.questions], split=args.split, questions=True)[: args.limit]
    rules = compliance.load_rules(None)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    answers, speed, stepwise = {}, {}, {}
    fast = args.variant
    reference = "default" if fast == "quantize-int8" else "fp32"  # the same weights the fast path starts from
    for name in (reference, fast):
        if name == "quantize-int8":
            serve = ServingSettings(merge=True, int8_weights=True)
        else:
            serve = ServingSettings(merge=True, int8_head="int8" in name, fp16_weights="fp16" in name)
        loaded = load(args.adapter, dtype="fp32" if name == "fp32" else "auto", serve=serve)
        prompts = [prompt_ids(loaded.tokenizer, e) for e in examples]
        start = time.perf_counter()
        gens = generate_batch(loaded.model, loaded.tokenizer, prompts, settings, batch_size=8)
        speed[name] = sum(g.new_tokens for g in gens) / (time.perf_counter() - start)
        nlls = reference_nll(loaded.model, loaded.tokenizer, examples, 8)
        answers[name] = [score(e, g, n, rules) for e, g, n in zip(examples, gens, nlls)]
        stepwise[name] = [_decode_nll(loaded.model, loaded.tokenizer, e) for e in [e for e in examples if e.output][: args.decode_nll]]
        del loaded
    rows = [{"answers": {m: answers[m][i] for m in answers}} for i in range(len(examples))]
    pair = compare_pair(rows, reference, fast)
    print(f"{len(examples)} questions from {args.questions}{f' ({args.split})' if args.split else ''}, greedy, {args.max_new_tokens} new tokens")
    print(f"answer tokens/s (batches of 8): {reference} {speed[reference]:.1f}, {fast} {speed[fast]:.1f} ({speed[fast] / speed[reference]:.2f}x)")
    print(f"same answer text: {sum(a['answer'] == b['answer'] for a, b in zip(answers[reference], answers[fast]))}/{len(examples)}")
    print(f"{'metric':<16}{reference:>8}{fast:>14}{'mean delta':>12}{'95% CI':>20}{'p':>9}  finding")
    for key, s in pair["metrics"].items():
        a = [x[key] for x in answers[reference] if x[key] is not None]
        b = [x[key] for x in answers[fast] if x[key] is not None]
        ci = f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
        print(f"{key:<16}{sum(a) / len(a):>8.3f}{sum(b) / len(b):>14.3f}{s['mean_delta']:>+12.3f}{ci:>20}{s['p_value']:>9.3g}  {s['verdict']}")
    if stepwise[reference]:
        from scipy.stats import wilcoxon

        a, b = stepwise[reference], stepwise[fast]
        deltas = [y - x for x, y in zip(a, b)]
        print(f"reference NLL through the decoding path, {len(a)} answers: {reference} {sum(a) / len(a):.4f}, {fast} {sum(b) / len(b):.4f}; "
              f"mean delta {sum(deltas) / len(deltas):+.4f}, max |delta| {max(map(abs, deltas)):.4f}, Wilcoxon p {wilcoxon(a, b).pvalue:.3g}")


def _decode_nll(model, tokenizer, example) -> float:
    """Mean NLL per token of the reference answer (and its <end_of_turn>), the prompt in one pass
    and then one answer token per forward with the KV cache, as decoding reads the weights."""
    import torch
    from transformers import DynamicCache

    from banklora.data.format import IGNORE_INDEX, encode_conversation

    enc = encode_conversation(tokenizer, example.question() + [{"role": "assistant", "content": example.output}], last_answer_only=True)
    start = next(k for k, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    ids = torch.tensor([enc.input_ids])
    cache, total = DynamicCache(), 0.0
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :start], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        for k in range(start, ids.shape[1]):
            total -= torch.log_softmax(logits, -1)[ids[0, k]].item()
            if k + 1 < ids.shape[1]:
                logits = model(input_ids=ids[:, k : k + 1], past_key_values=cache, use_cache=True).logits[0, -1].float()
    return total / (ids.shape[1] - start)


if __name__ == "__main__":
    main()
