"""What the fast serving paths cost in answer quality: the merged adapter in fp32 against the same
with an int8 LM head (--int8), fp16 decoder weights (--fp16), or both.

    .venv/bin/python bench/serving_quality.py --adapter outputs/lora_banking                   # int8 head, the seed's 8 questions
    .venv/bin/python bench/serving_quality.py --adapter outputs/lora_banking --variant int8+fp16 --questions banking --split test

Both answer the same questions greedily with compare's token budget (160); each answer is
scored with compare's metrics, and the pair gets compare's paired statistics (mean delta,
bootstrap CI, Wilcoxon p, win/tie/loss). Also printed: answer tokens/s of each.
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
    parser.add_argument("--variant", choices=["int8", "fp16", "int8+fp16"], default="int8")
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
    answers, speed = {}, {}
    fast = args.variant
    for name in ("fp32", fast):
        loaded = load(args.adapter, serve=ServingSettings(merge=True, int8_head="int8" in name, fp16_weights="fp16" in name))
        prompts = [prompt_ids(loaded.tokenizer, e) for e in examples]
        start = time.perf_counter()
        gens = generate_batch(loaded.model, loaded.tokenizer, prompts, settings, batch_size=8)
        speed[name] = sum(g.new_tokens for g in gens) / (time.perf_counter() - start)
        nlls = reference_nll(loaded.model, loaded.tokenizer, examples, 8)
        answers[name] = [score(e, g, n, rules) for e, g, n in zip(examples, gens, nlls)]
        del loaded
    rows = [{"answers": {m: answers[m][i] for m in answers}} for i in range(len(examples))]
    pair = compare_pair(rows, "fp32", fast)
    print(f"{len(examples)} questions from {args.questions}{f' ({args.split})' if args.split else ''}, greedy, {args.max_new_tokens} new tokens")
    print(f"answer tokens/s (batches of 8): fp32 {speed['fp32']:.1f}, {fast} {speed[fast]:.1f} ({speed[fast] / speed['fp32']:.2f}x)")
    print(f"same answer text: {sum(a['answer'] == b['answer'] for a, b in zip(answers['fp32'], answers[fast]))}/{len(examples)}")
    print(f"{'metric':<16}{'fp32':>8}{fast:>10}{'mean delta':>12}{'95% CI':>20}{'p':>9}  finding")
    for key, s in pair["metrics"].items():
        a = [x[key] for x in answers["fp32"] if x[key] is not None]
        b = [x[key] for x in answers[fast] if x[key] is not None]
        ci = f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
        print(f"{key:<16}{sum(a) / len(a):>8.3f}{sum(b) / len(b):>10.3f}{s['mean_delta']:>+12.3f}{ci:>20}{s['p_value']:>9.3g}  {s['verdict']}")


if __name__ == "__main__":
    main()
