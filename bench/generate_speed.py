"""Generation speed: plain `generate` on a PeftModel against banklora's generation path.

    .venv/bin/python bench/generate_speed.py --adapter outputs/lora_banking
    .venv/bin/python bench/generate_speed.py --adapter outputs/lora_banking --max-new-tokens 64

Same adapter, same prompts (the first 8 questions of banking-eval, formatted by banklora's
formatter), greedy, the same token budget. Each variant runs in its own process:
  plain        AutoModelForCausalLM + PeftModel.from_pretrained, model.generate (the usual recipe)
  merged       banklora: the adapter merged into the base weights (load(..., serve=ServingSettings(merge=True)))
  merged+int8  banklora: merged, then the LM head's weights in int8 (chat --int8)
  merged+int8+fp16  banklora: as merged+int8, and the decoder's linear weights in fp16 for
               decoding (chat --int8 --fp16)
  A variant naming fp32 or bf16 loads its weights in that dtype (--dtype); the others take
  `--dtype auto`'s (bf16 on CPUs with AVX512-BF16 or AMX; fp32 under --int8 and --fp16).
Printed per variant: decode tokens/s single stream (prompt 1) and summed over a batch of 8,
time to first token (single stream), and the ratio to plain. A tiny first call warms each up.
With no --adapter, one is trained for 2 steps on banking-seed (its B matrices are non-zero).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prompts(tokenizer) -> list[list[int]]:
    from banklora.data.dataset import load_examples
    from banklora.data.format import encode_prompt

    return [encode_prompt(tokenizer, e.instruction, e.input) for e in load_examples(["banking-eval"])[:8]]


def _model(variant: str, adapter: str):
    import torch

    if variant == "plain":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from banklora.basemodel import embedded_checkpoint

        base = AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(adapter)
    from banklora.modeling import load
    from banklora.inference.fast_paths import ServingSettings

    dtype = next((d for d in ("fp32", "bf16") if d in variant), "auto")
    loaded = load(adapter, dtype=dtype, serve=ServingSettings(merge=True, int8_head="int8" in variant, fp16_weights="fp16" in variant))
    return loaded.model, loaded.tokenizer


def worker(variant: str, adapter: str, max_new_tokens: int) -> dict:
    import torch

    from banklora.config import GenerationSettings
    from banklora.inference.generate import generate_batch

    model, tokenizer = _model(variant, adapter)
    prompts = _prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    generate_batch(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=4))  # warm-up
    torch.manual_seed(0)

    def run(batch: list[list[int]]) -> tuple[float, float, list[str]]:
        start = time.perf_counter()
        out = generate_batch(model, tokenizer, batch, settings, batch_size=len(batch))
        wall = time.perf_counter() - start
        first = out[0].first_token_seconds
        tokens = sum(g.new_tokens for g in out)
        return tokens / max(1e-9, wall - first), first, [g.text for g in out]

    single, ttft, single_text = run(prompts[:1])
    batched, _, batch_text = run(prompts)
    return {"single_tps": single, "ttft": ttft, "batch_tps": batched, "texts": batch_text, "single_text": single_text[0]}


def _adapter(path: str | None) -> str:
    if path:
        return path
    from banklora.config import TrainSettings
    from banklora.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-gen-")) / "adapter"
    train(TrainSettings(data=("banking-seed",), output_dir=str(out), max_steps=2, lr=1e-3, save_every=0), show_progress=False)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="plain,merged,merged+int8,merged+int8+fp16")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.adapter, args.max_new_tokens), ensure_ascii=False))
        return
    adapter = _adapter(args.adapter)
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", variant, "--adapter", adapter, "--max-new-tokens", str(args.max_new_tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, BANKLORA_LOG_LEVEL="WARNING", TRANSFORMERS_VERBOSITY="error"))
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
    plain = results.get("plain")
    print(f"greedy, {args.max_new_tokens} new tokens, 8 banking-eval prompts, adapter {adapter}, {os.cpu_count()} cores")
    print(f"{'':18}{'single tok/s':>13}{'x plain':>9}{'batch-8 tok/s':>15}{'x plain':>9}{'TTFT s':>8}{'same text as plain':>20}")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["texts"], plain["texts"])) if plain else 0
        print(f"{name:18}{r['single_tps']:>13.1f}{r['single_tps'] / plain['single_tps'] if plain else 0:>9.2f}"
              f"{r['batch_tps']:>15.1f}{r['batch_tps'] / plain['batch_tps'] if plain else 0:>9.2f}{r['ttft']:>8.2f}{f'{same}/8':>20}")


if __name__ == "__main__":
    main()
