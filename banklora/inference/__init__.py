"""Answering with a loaded model: the one generation engine that chat, compare, doctor, the
turn-end check and the server share, and the CPU fast paths the loader applies.

- engine.py: continuous batching over a KV cache (prefill, decode, sampling, penalties, stops);
  the server runs it in a thread, generate.py in the caller's.
- generate.py: the API over it: generate_batch (compare, doctor, the turn-end check) and Stream (chat).
- fast_paths.py: ServingSettings and what they install on a loaded model (merge, int8 head,
  fp16 decoder weights, stacked adapters, a contiguous LM-head input); modeling.load applies them.
"""
