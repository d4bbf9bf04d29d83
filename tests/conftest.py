"""Fixtures: the real Gemma tokenizer (converted alone, without the weights), a tiny random Gemma3
built here (no download), and the command line in-process and as a program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from banklora import basemodel


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted embedded Gemma 3 270M (converted on first use, then cached)."""
    return basemodel.embedded_checkpoint()


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's Gemma tokenizer; only the end-to-end tests convert the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(basemodel.tokenizer_path(None))


def _tiny_gemma(directory: Path, tokenizer, seed: int) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),  # the real tokenizer's 262,144 ids
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        sliding_window=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        initializer_range=0.2,  # logits far from uniform, so a few LoRA steps visibly move the loss
    )
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 2-layer Gemma3 checkpoint directory (~17M parameters, mostly embeddings)."""
    return _tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def other_tiny_base(tmp_path_factory, tokenizer) -> Path:
    """Same architecture as tiny_base, different weights."""
    return _tiny_gemma(tmp_path_factory.mktemp("tiny-gemma-other"), tokenizer, seed=1)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """6 training and 2 validation pairs: 3 steps per epoch at batch 2."""
    records = [{"instruction": f"问题{i}：如何办理业务{i}？", "output": f"回答{i}：请携带身份证到网点办理，以银行最新公告为准。", "split": "train"} for i in range(6)]
    records += [{"instruction": f"验证问题{i}", "output": f"验证回答{i}，请咨询客服。", "split": "validation"} for i in range(2)]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    """A LoRA adapter trained for a few steps on tiny_base."""
    from banklora.config import TrainSettings
    from banklora.train import train

    out = tmp_path_factory.mktemp("adapters") / "tiny"
    # augment 0: the batches the fast-path tolerances (tests/test_fast_paths.py) were measured on; with the variants two of
    # them, argmax agreement of int8 / fp16 decoding on this random model, fall below their bounds (a fragility to fix there)
    train(TrainSettings(base_model=str(tiny_base), output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3, augment=0), show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_lora_only_adapter(tmp_path_factory, tiny_base) -> Path:
    """tiny_adapter's run with LoRA alone (--train-tokens none): what llama.cpp's LoRA GGUF can carry."""
    from banklora.config import TrainSettings
    from banklora.train import train

    out = tmp_path_factory.mktemp("adapters") / "tiny-lora-only"
    train(TrainSettings(base_model=str(tiny_base), output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3, lora={"train_tokens": ()},
                        turn_end_budget=0), show_progress=False)
    return out


def seed_batch(tokenizer, n: int = 4) -> dict:
    """The first n banking-seed pairs as one training batch (input_ids, attention_mask, labels)."""
    from banklora.data.dataset import load_examples
    from banklora.data.prepare import prepare
    from banklora.data.batching import collate

    return collate(prepare(load_examples(["banking-seed"])[:n], tokenizer, 512).encoded, pad_id=0)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, columns: int = 200) -> CliResult:
    """Run the `banklora` command line in this process (typer's runner): the same parsing, error
    sentences and exit codes as the program, without a new interpreter and imports per call."""
    from typer.testing import CliRunner

    from banklora.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `banklora` program in a subprocess (for what needs its own process: signals,
    torchrun, the allocator, and one smoke test of the installed entry point)."""
    env = dict(os.environ, COLUMNS="200", BANKLORA_LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "banklora", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
