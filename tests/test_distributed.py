"""Multi-process training: torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from banklora.config import LoraSettings, TrainSettings
from banklora.modeling import META_FILE
from banklora.train import train

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def test_two_processes_match_one_with_the_same_global_batch(tiny_base, tmp_path):
    # 7 training examples: the second global batch of 4 has 3, split 2 + 1 across the processes
    records = [{"instruction": f"问题{i}：如何办理业务{i}？", "output": f"回答{i}：请携带身份证到网点办理。" + "谢谢" * i, "split": "train"} for i in range(7)]
    records += [{"instruction": f"验证问题{i}", "output": f"验证回答{i}", "split": "validation"} for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    # fp32: this test is about DDP's arithmetic (the same global batch, split), which bf16's rounding of other matmul shapes would blur
    # augment 0: the 7 pairs as written, so that the uneven batch comes within the 3 steps
    common = dict(base_model=str(tiny_base), data=(str(data),), max_steps=3, lr=1e-2, save_every=0, lora=LoraSettings(dropout=0.0), dtype="fp32",
                  augment=0)

    one = train(TrainSettings(output_dir=str(tmp_path / "one"), batch_size=4, **common), show_progress=False)

    two_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "banklora", "train",
           "--base-model", str(tiny_base), "--data", str(data), "--output-dir", str(two_dir), "--batch-size", "2",
           "--max-steps", "3", "--lr", "0.01", "--save-every", "0", "--lora-dropout", "0", "--dtype", "fp32", "--augment", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, BANKLORA_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((two_dir / META_FILE).read_text())
    assert meta["training"]["processes"] == 2 and meta["training"]["global_batch"] == 4

    # the same losses after K=3 steps, to float rounding (measured: 2e-6)
    assert meta["loss_per_step"] == pytest.approx(one.losses, abs=1e-4)
    assert [v["loss"] for v in meta["validation_loss"]] == pytest.approx([v["loss"] for v in one.meta["validation_loss"]], abs=1e-4)
    a, b = load_file(str(one.output_dir / "adapter_model.safetensors")), load_file(str(two_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # the weights did move


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "fsdp"])
def test_accelerate_configs_load_and_open_with_their_command(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# accelerate launch --config_file configs/accelerate/{name}.yaml -m banklora train --config configs/gpu.yaml"
    config = load_config_from_file(str(path))
    assert config.num_processes == 8 and not config.use_cpu
    assert config.mixed_precision != "fp16"  # Gemma overflows in fp16
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Gemma3DecoderLayer"
        from transformers.models.gemma3 import modeling_gemma3

        assert hasattr(modeling_gemma3, "Gemma3DecoderLayer")  # the class FSDP wraps exists under that name
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2

