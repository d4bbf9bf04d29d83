"""Compare's wall time before and now, in one run.

    .venv/bin/python bench/compare_speed.py --adapter outputs/lora_banking
    .venv/bin/python bench/compare_speed.py --adapter outputs/lora_banking --limit 32 --batch-sizes 8,32,128

The 72-question test split of the built-in set (or its first --limit questions), base and
adapter, greedy, 160 new tokens, the knowledge test included. "before" runs the same
run_compare with the two paths compare used before swapped back in: answers in left-padded
batches of 8 through transformers' `generate`, where every row decodes until the slowest answer
of its batch ends, and teacher-forced scoring (reference answers, knowledge options) as one pass
over prompt + answer per example, 8 at a time in the order given. "now" runs it as compare does
today (the continuous-batching engine, prompts scored once and shared by their answers), at each
of --batch-sizes (default 128, compare's). Printed: wall time of each whole compare, the ratio to
before, on how many answers each agrees with before (all must: greedy decoding on the same
weights), the largest difference of any reference or option NLL from before (float rounding
only), and how many answers ended before the token budget (continuous batching gains most where
answers end at different lengths). --report keeps the first "now" run's compare report (the
adapter's figures on the test split).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from unittest import mock

import torch


def fixed_batches(model, tokenizer, prompts, settings, batch_size=8, on_answer=None):
    """compare's generation before the engine: left-padded batches through `generate`."""
    from transformers import GenerationConfig

    from banklora.data.format import stop_token_ids
    from banklora.inference.generate import Generation

    stops = stop_token_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=0, top_k=None)
    out_all = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        seconds = time.perf_counter() - start
        for row in range(len(chunk)):
            new = out[row, width:].tolist()
            n = next((k for k, t in enumerate(new) if t in stops), len(new))
            out_all.append(Generation(tokenizer.decode(new[:n], skip_special_tokens=True).strip(), n, n < len(new), seconds, 0.0))
            if on_answer is not None:
                on_answer(len(out_all))
    return out_all


@torch.inference_mode()
def full_passes(model, tokenizer, examples, batch_size=8):
    """compare's teacher-forced scoring before: prompt + answer in one pass per example."""
    from banklora.data.batching import collate
    from banklora.data.format import encode_conversation
    from banklora.loss import answer_loss

    device = next(model.parameters()).device
    with_reference = [e for e in examples if e.output]
    values = []
    for i in range(0, len(with_reference), batch_size):
        encoded = [encode_conversation(tokenizer, e.question() + [{"role": "assistant", "content": e.output}], last_answer_only=True)
                   for e in with_reference[i : i + batch_size]]
        means = answer_loss(model, {k: v.to(device) for k, v in collate(encoded, 0).items()}, per_example=True).tolist()
        tokens = [sum(label != -100 for label in enc.labels) for enc in encoded]
        values += [(mean * n, n) for mean, n in zip(means, tokens)]  # reference_scores' (total NLL, tokens)
    it = iter(values)
    return [next(it) if e.output else None for e in examples]


def nll_values(report):
    """Every reference and option NLL of a report, in order."""
    values = [q["answers"][m]["ref_nll"] for q in report["questions"] for m in report["models"]]
    return values + [x for q in report["knowledge"]["questions"] for m in report["models"]
                     for x in q["models"][m]["option_nll"] + q["models"][m]["option_nll_neutral"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-sizes", default="128", help="the engine's batch sizes to time, comma-separated")
    parser.add_argument("--report", type=Path, help="write the first engine run's compare report here (JSON, with .md and .html beside)")
    args = parser.parse_args()

    from banklora.config import GenerationSettings
    from banklora.evaluation import compare
    from banklora.modeling import load

    loaded = load(args.adapter)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    kwargs = dict(questions=["banking"], split="test", settings=settings, batch_size=8, limit=args.limit, loaded=loaded, knowledge_tests=["banking-mcq"])
    compare.run_compare(args.adapter, questions=["banking-eval"], settings=GenerationSettings(max_new_tokens=4), limit=1, loaded=loaded)  # warm-up

    start = time.perf_counter()
    with mock.patch.object(compare, "generate_batch", fixed_batches), mock.patch.object(compare, "reference_scores", full_passes):
        before = compare.run_compare(args.adapter, **kwargs)
    before_s = time.perf_counter() - start
    runs = {}
    for size in [int(x) for x in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        runs[size] = (compare.run_compare(args.adapter, **(kwargs | {"batch_size": size})), time.perf_counter() - start)

    if args.report:
        from banklora.evaluation.report import write_reports

        print("report:", write_reports(next(iter(runs.values()))[0], args.report)["markdown"])
    models = before["models"]
    answers = [q["answers"][m] for q in before["questions"] for m in models]
    print(f"{len(before['questions'])} questions x {len(models)} models, greedy, {args.max_new_tokens} new tokens, knowledge test included; "
          f"{os.cpu_count()} cores; {sum(a['tokens'] for a in answers)} answer tokens, {sum(a['finished'] for a in answers)} answers ended before the budget")
    print(f"{'':44}{'wall s':>9}{'x before':>10}{'answers equal':>15}{'max NLL diff':>14}")
    print(f"{'before: batches of 8 through generate':44}{before_s:>9.1f}{1.0:>10.2f}{'-':>15}{'-':>14}")
    for size, (report, seconds) in runs.items():
        same = sum(q0["answers"][m]["answer"] == q1["answers"][m]["answer"] for q0, q1 in zip(before["questions"], report["questions"]) for m in models)
        diff = max(abs(a - b) for a, b in zip(nll_values(before), nll_values(report)) if a is not None)
        print(f"{f'now: continuous batching, batch {size}':44}{seconds:>9.1f}{before_s / seconds:>10.2f}{f'{same}/{len(answers)}':>15}{diff:>14.2e}")


if __name__ == "__main__":
    main()
