"""Export sizes and speeds: llama.cpp on the exported GGUF files against `banklora chat`.

    .venv/bin/python bench/export_speed.py --adapter outputs/lora_banking
    .venv/bin/python bench/export_speed.py --adapter outputs/lora_banking --max-new-tokens 64 --variants chat,q8_0

Needs llama.cpp's Python binding (`pip install 'banklora[llamacpp]'`). One run:
1) exports the adapter with `banklora export` as hf, gguf f32 / f16 / q8_0 and gguf-lora f32,
   timing each and printing its size;
2) runs each variant in its own process on the same 8 banking-eval questions (banklora's
   formatter), greedy, one question at a time, up to --max-new-tokens each:
     chat            banklora chat's path: the adapter merged, `--dtype auto` (bf16 weights on CPUs
                     with AVX512-BF16 or AMX, read through their lossless fp16 copies for one row)
     chat+fp32       banklora chat --dtype fp32
     chat+int8+fp16  banklora chat --int8 --fp16 (fp32 weights)
     chat+quantize   banklora chat --quantize int8 (int8 weights for decoding; bf16 CPUs only)
     f32 / q8_0      llama.cpp (llama-cpp-python) on the merged GGUF of that type
     q4_k_m+lora     llama.cpp on the embedded Q4_K_M base GGUF with the LoRA GGUF applied
   and prints decode tokens/s single stream (tokens after the first over the time after the
   first), time to first token (mean over the questions, prompt processing included), the ratio
   to `chat`, and on how many questions the answer equals chat's.
All on the same machine in the same run, with as many threads as it has cores; llama.cpp runs
with its weight repacking off (llama-server's --no-repack), which CPUs with AMX need for these files.
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
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
EXPORTS = (("hf", None), ("gguf", "f32"), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf-lora", "f32"))


def _questions(tokenizer) -> list[list[int]]:
    from banklora.data.dataset import load_examples
    from banklora.data.format import encode_prompt

    return [encode_prompt(tokenizer, e.instruction, e.input) for e in load_examples(["banking-eval"], questions=True)]


def _chat(variant: str, adapter: str, max_new_tokens: int) -> list[dict]:
    from banklora.config import GenerationSettings
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load
    from banklora.inference.fast_paths import ServingSettings

    fast = variant == "chat+int8+fp16"
    loaded = load(adapter, dtype="fp32" if variant == "chat+fp32" else "auto",
                  serve=ServingSettings(merge=True, int8_head=fast, fp16_weights=fast, int8_weights=variant == "chat+quantize"))
    prompts = _questions(loaded.tokenizer)
    generate_batch(loaded.model, loaded.tokenizer, prompts[:1], GenerationSettings(max_new_tokens=4))  # warm-up
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for ids in prompts:
        start = time.perf_counter()
        (g,) = generate_batch(loaded.model, loaded.tokenizer, [ids], settings, batch_size=1)
        out.append({"ttft": g.first_token_seconds, "wall": time.perf_counter() - start, "tokens": g.new_tokens, "text": g.text})
    return out


def _llama(variant: str, files: dict, max_new_tokens: int) -> list[dict]:
    import llama_cpp
    from transformers import AutoTokenizer

    from banklora.basemodel import embedded_gguf

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():  # llama-server's --no-repack: the repacked (AMX) kernels crash on Gemma 3 270M (docs/export.md)
        params = defaults()
        params.use_extra_bufts = False
        return params

    paths = (str(embedded_gguf()), files["gguf-lora-f32"]) if variant == "q4_k_m+lora" else (files[f"gguf-{variant}"], None)
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", no_repack):
        llm = llama_cpp.Llama(model_path=paths[0], lora_path=paths[1], n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokenizer = AutoTokenizer.from_pretrained(files["hf"])
    prompts = _questions(tokenizer)
    for _ in zip(range(4), llm.generate(prompts[0], temp=0.0, top_k=1, reset=True)):  # warm-up
        pass
    out = []
    for ids in prompts:
        tokens, first = [], 0.0
        start = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter() - start
            if len(tokens) >= max_new_tokens:
                break
        out.append({"ttft": first, "wall": time.perf_counter() - start, "tokens": len(tokens), "text": tokenizer.decode(tokens, skip_special_tokens=True).strip()})
    return out


def _export(adapter: str, root: Path, lora: bool) -> tuple[dict, list[tuple[str, float, float]]]:
    """Each export format; the LoRA GGUF only when a variant runs it (it refuses an adapter that
    trains Gemma's turn tokens, as the quickstart's does)."""
    files, rows = {}, []
    for fmt, kind in EXPORTS if lora else [e for e in EXPORTS if e[0] != "gguf-lora"]:
        name = f"{fmt}-{kind}" if kind else fmt
        cmd = [sys.executable, "-m", "banklora", "export", "--model-path", adapter, "--format", fmt, "--output", str(root / name)]
        cmd += ["--type", kind] if kind else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"export {name} failed:\n{done.stderr[-4000:]}")
        weights = sorted((root / name).glob("*.gguf" if kind else "*.safetensors"))
        files[name] = str(weights[0]) if kind else str(root / name)
        rows.append((name, sum(p.stat().st_size for p in weights) / 1e6, seconds))
    return files, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    from banklora.modeling import cpu_bf16

    quantize = ",chat+quantize" if cpu_bf16() else ""  # --quantize int8 needs a CPU with native bf16
    parser.add_argument("--variants", default=f"chat{quantize},chat+int8+fp16,f32,q8_0,q4_k_m+lora")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, one after another (a noisy machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("chat"):
            result = _chat(args.worker, args.adapter, args.max_new_tokens)
        else:
            result = _llama(args.worker, json.loads(args.files), args.max_new_tokens)
        print("RESULT " + json.dumps(result, ensure_ascii=False))
        return

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        files, sizes = _export(args.adapter, Path(tmp), lora="q4_k_m+lora" in args.variants.split(","))
        print(f"adapter {args.adapter}, {os.cpu_count()} cores")
        print(f"{'export':16}{'size MB':>10}{'export s':>10}")
        for name, mb, seconds in sizes:
            print(f"{name:16}{mb:>10.1f}{seconds:>10.1f}")
        rounds = [{} for _ in range(args.rounds)]
        for results, variant in ((r, v) for r in rounds for v in args.variants.split(",")):
            cmd = [sys.executable, __file__, "--worker", variant, "--adapter", args.adapter, "--files", json.dumps(files), "--max-new-tokens", str(args.max_new_tokens)]
            env = dict(os.environ, BANKLORA_LOG_LEVEL="WARNING", TRANSFORMERS_VERBOSITY="error")
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
            results[variant] = json.loads(line[len("RESULT "):])

    for n, results in enumerate(rounds, 1):
        _table(results, args.max_new_tokens, f" (round {n} of {args.rounds})" if args.rounds > 1 else "")


def _table(results: dict, max_new_tokens: int, which: str) -> None:
    def decode_tps(rows: list[dict]) -> float:
        return sum(max(0, r["tokens"] - 1) for r in rows) / max(1e-9, sum(r["wall"] - r["ttft"] for r in rows))

    chat = results.get("chat")
    print(f"\ngreedy, up to {max_new_tokens} new tokens, 8 banking-eval questions one at a time{which}")
    print(f"{'':16}{'decode tok/s':>13}{'x chat':>8}{'TTFT s':>8}{'x chat':>8}{'tokens':>8}{'same answer as chat':>21}")
    for name, rows in results.items():
        tps, ttft = decode_tps(rows), sum(r["ttft"] for r in rows) / len(rows)
        same = f"{sum(a['text'] == b['text'] for a, b in zip(rows, chat))}/{len(rows)}" if chat else "-"
        ratio = f"{tps / decode_tps(chat):.2f}" if chat else "-"
        ttft_ratio = f"{ttft / (sum(r['ttft'] for r in chat) / len(chat)):.2f}" if chat else "-"
        print(f"{name:16}{tps:>13.1f}{ratio:>8}{ttft:>8.3f}{ttft_ratio:>8}{sum(r['tokens'] for r in rows):>8}{same:>21}")


if __name__ == "__main__":
    main()
