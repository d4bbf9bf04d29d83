"""Load on `banklora serve`: concurrent clients against the same requests one after another.

    .venv/bin/python bench/serve_load.py --adapter outputs/lora_banking
    .venv/bin/python bench/serve_load.py --adapter outputs/lora_banking --clients 1,4,8,16 --max-tokens 64

Starts a real `banklora serve` (uvicorn, 127.0.0.1) on the base (default: the embedded Gemma 3
270M) with the adapter served as "banking", and sends the same requests at every level: the
first 16 questions of the built-in test split (or as many as the most clients, up to its 72), greedy,
the same token budget, alternating base and adapter (half each). The reference is these requests one after another through the same server in the
same run (1 client). Each level runs them with N clients in a closed loop: a client sends its
next request when its answer has ended. Every request streams (stream_options.include_usage), so
the time to first token is the first content chunk's arrival.

Printed per level: summed completion tokens/s (all completion tokens / wall time of the level),
its ratio to the reference, time to first token p50/p95, latency p50/p95, errors; and
the server's mean rows per decode step and mean decode step time from /metrics. --json writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: str | None, adapter: str, max_batch_size: int, flags: list[str], port: int, log) -> subprocess.Popen:
    args = [sys.executable, "-m", "banklora", "serve", "--port", str(port), "--model-path", f"banking={adapter}",
            "--max-batch-size", str(max_batch_size), *flags]
    if base:
        args += ["--base-model", base]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, BANKLORA_API_KEY=KEY))
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"banklora serve exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("banklora serve did not answer /health in 600 s")


def _requests(base_name: str, count: int) -> list[dict]:
    from banklora.data.dataset import load_examples

    out = []
    for i, e in enumerate(load_examples(["banking"], split="test")[:count]):
        content = e.instruction + (f"\n{e.input}" if e.input else "")
        out.append({"model": base_name if i % 2 == 0 else "banking", "messages": [{"role": "user", "content": content}]})
    return out


def _one(client, request: dict, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.chat.completions.create(**request, temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # counted and shown, never hidden
        return {"error": f"{type(exc).__name__}: {exc}"}
    latency = time.perf_counter() - start
    return {"ttft": first if first is not None else latency, "latency": latency, "tokens": tokens}


def _level(client, requests: list[dict], clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: _one(client, r, max_tokens), requests))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0.0])[0]

    ttft, latency = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    return {"clients": clients, "requests": len(requests), "errors": len(errors), "error_messages": errors[:3],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "latency_p50_s": pct(latency, 50), "latency_p95_s": pct(latency, 95)}


def _occupancy(port: int) -> dict[str, float]:
    """Decode steps so far, the rows they decoded and the seconds they took, from the server's /metrics."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    def get(name: str) -> float:
        return float(values.get(f'{name}{{kind="decode"}}', 0))

    return {"steps": get("banklora_step_rows_count"), "rows": get("banklora_step_rows_sum"), "seconds": get("banklora_step_seconds_sum")}


def main() -> None:
    from banklora.config import SERVE_MAX_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter directory, served as 'banking'")
    parser.add_argument("--base-model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels; 1 is the reference (one after another)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=SERVE_MAX_BATCH_SIZE, help=f"the server's --max-batch-size (its default: {SERVE_MAX_BATCH_SIZE})")
    parser.add_argument("--int8", action="store_true", help="serve with --int8 (the LM head in int8)")
    parser.add_argument("--quantize", choices=["int8"], help="serve with --quantize int8 (int8 weights for decoding)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from openai import OpenAI

    levels = [int(c) for c in args.clients.split(",")]
    if 1 not in levels:
        levels = [1, *levels]
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="banklora-serve-load-", suffix=".log", delete=False)
    flags = [*(["--int8"] if args.int8 else []), *(["--quantize", args.quantize] if args.quantize else [])]
    process = _start(args.base_model, args.adapter, args.max_batch_size, flags, port, log)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
        base_name = next(m.id for m in client.models.list().data if m.id != "banking")
        requests = _requests(base_name, max(16, *levels))
        for request in requests[:2]:  # warm-up, base and adapter: the first forward passes allocate
            _one(client, request, 4)
        results = []
        for clients in levels:
            before = _occupancy(port)
            result = _level(client, requests, clients, args.max_tokens)
            after = _occupancy(port)
            steps = after["steps"] - before["steps"]
            result["mean_batch_rows"] = (after["rows"] - before["rows"]) / steps if steps else None
            result["mean_decode_step_s"] = (after["seconds"] - before["seconds"]) / steps if steps else None
            results.append(result)
        reference = next(r for r in results if r["clients"] == 1)["tokens_per_s"]
        print(f"banklora serve, base {base_name}, adapter {args.adapter} as 'banking'; {len(requests)} requests (half each), "
              f"greedy, max_tokens {args.max_tokens}, --max-batch-size {args.max_batch_size} {' '.join(flags)}; "
              f"{os.cpu_count()} CPUs")
        print(f"{'clients':>7} {'tok/s':>7} {'x ref':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8} "
              f"{'rows/step':>9} {'step ms':>7} {'tokens':>6} {'errors':>6}")
        for r in results:
            r["ratio_to_one_after_another"] = r["tokens_per_s"] / reference
            rows = f"{r['mean_batch_rows']:.1f}" if r["mean_batch_rows"] is not None else "-"
            step = f"{1000 * r['mean_decode_step_s']:.0f}" if r["mean_decode_step_s"] is not None else "-"
            print(f"{r['clients']:>7} {r['tokens_per_s']:>7.1f} {r['ratio_to_one_after_another']:>5.2f}x {r['ttft_p50_s']:>8.2f}s "
                  f"{r['ttft_p95_s']:>8.2f}s {r['latency_p50_s']:>7.2f}s {r['latency_p95_s']:>7.2f}s {rows:>9} {step:>7} "
                  f"{r['completion_tokens']:>6} {r['errors']:>6}")
            for message in r["error_messages"]:
                print(f"        error: {message}")
        if args.json:
            args.json.write_text(json.dumps({"max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "levels": results},
                                            indent=2))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


if __name__ == "__main__":
    main()
