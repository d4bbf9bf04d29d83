"""`banklora doctor`: is this machine ready? Versions, device, threads, the model, a generation;
with --model-path, does that model end its answers (the turn-end check, evaluation/turn_end.py)?"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(base_model: str | None, model_path: str | None = None, data: tuple[str, ...] = ("banking",)) -> list[Check]:
    checks: list[Check] = []
    py_ok = sys.version_info >= (3, 10)
    checks.append(Check("python", py_ok, platform.python_version() + ("" if py_ok else ": banklora needs 3.10 or newer")))
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        checks.append(Check("libraries", False, f"{exc}; reinstall with `pip install -e .`"))
        return checks
    checks.append(Check("libraries", True, f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("device", True, f"CUDA: {name} ({'bf16' if bf16 else 'fp32, no bf16'})"))
    else:
        from banklora.modeling import cpu_bf16

        precision = ("bf16 native (AVX512-BF16 or AMX): training in bf16 mixed precision, answering with bf16 weights" if cpu_bf16()
                     else "no native bf16 (AVX512-BF16 or AMX): training and answering in float32")
        checks.append(Check("device", True, f"CPU ({platform.machine()}), {precision}; no CUDA GPU found"))
    checks.append(Check("threads", True, f"torch uses {torch.get_num_threads()} of {os.cpu_count()} cores"))

    from banklora.config import GenerationSettings
    from banklora.data.format import encode_prompt
    from banklora.errors import BankloraError
    from banklora.inference.generate import generate_batch
    from banklora.modeling import load

    try:
        start = time.perf_counter()
        loaded = load(base_model=base_model or "gemma-3-270m", verify=True)
        checks.append(Check("model", True, f"{loaded.base.name} at {loaded.base.path}, weights sha256 {loaded.base.sha256[:12]} verified "
                                           f"(loaded in {time.perf_counter() - start:.1f} s)"))
    except BankloraError as exc:
        checks.append(Check("model", False, str(exc)))
        return checks
    prompt = encode_prompt(loaded.tokenizer, "什么是活期存款？")
    gen = generate_batch(loaded.model, loaded.tokenizer, [prompt], GenerationSettings(max_new_tokens=16), batch_size=1)[0]
    ok = gen.new_tokens > 0
    checks.append(Check("generation", ok, f"{gen.new_tokens} tokens at {gen.tokens_per_second:.1f} tok/s: {gen.text[:40]!r}"))
    if model_path is not None:
        checks.append(turn_end_check(model_path, base_model, data))
    return checks


def turn_end_check(model_path: str, base_model: str | None, data: tuple[str, ...]) -> Check:
    """Does the model at model_path end its answers? The turn-end check on the validation split of `data`."""
    from banklora.data.dataset import load_examples
    from banklora.evaluation import turn_end
    from banklora.modeling import load

    examples = load_examples(list(data), split="validation")
    if not examples:
        return Check("turn end", False, f"no validation examples in {', '.join(data)} (split: validation); pass --data with some")
    loaded = load(model_path, base_model=base_model)
    start = time.perf_counter()
    result = turn_end.check(loaded.model, loaded.tokenizer, examples)
    detail = f"{result.summary()} ({time.perf_counter() - start:.0f} s)"
    return Check("turn end", result.warning() is None, detail + (f"; {result.warning()}" if result.warning() else ""))
