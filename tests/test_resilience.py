"""Training as a dependable tool, on the tiny Gemma3: exact resume, Ctrl-C, guards, best adapter, LoRA options."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from banklora import checkpoint
from banklora.config import LoraSettings, TrainSettings
from banklora.errors import BankloraError, UsageError
from banklora.modeling import META_FILE, load
from banklora.train import TrainingInterrupted, resolve_settings, train
from conftest import cli, run_cli


def _settings(tiny_base, small_data, out, **kw):
    values = dict(base_model=str(tiny_base), data=(str(small_data),), output_dir=str(out), epochs=2, batch_size=2, lr=1e-2, save_every=2,
                  augment=0)  # the 6 pairs as written: 6 steps (the resume test below trains with the variants)
    return TrainSettings(**(values | kw))


def _weights(adapter):
    return load_file(str(adapter / "adapter_model.safetensors"))


def _interrupt_at(step):
    """An on_step hook that presses Ctrl-C (a real SIGINT to this process) after `step`."""
    def hook(state):
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_base, small_data, tmp_path):
    # dropout 0.1 is on: the resumed run must also restore the random state, not only weights and optimizer
    whole = train(_settings(tiny_base, small_data, tmp_path / "whole", augment=2), show_progress=False)

    settings = _settings(tiny_base, small_data, tmp_path / "parts", augment=2)  # train's default: the pairs and 2 variants of each
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 4 of 18.*--resume"):
        train(settings, show_progress=False, on_step=_interrupt_at(4))
    assert not (tmp_path / "parts").exists()  # no adapter before the run ends
    assert [p.name for p in checkpoint.complete_checkpoints(settings.checkpoints)] == ["step-000002", "step-000004"]
    # a crash's leftovers: a temporary directory and a step directory without its state file
    (settings.checkpoints / ".step-000005.tmp-99").mkdir()
    (settings.checkpoints / "step-000006").mkdir()
    assert checkpoint.latest(settings.checkpoints).name == "step-000004"
    with pytest.raises(UsageError, match="add --resume to continue it, or --no-resume"):
        train(settings, show_progress=False)

    resumed = train(settings, show_progress=False, resume=True)
    assert resumed.losses == whole.losses  # the whole trajectory, to the digit
    a, b = _weights(whole.output_dir), _weights(resumed.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert resumed.meta["validation_loss"] == whole.meta["validation_loss"]
    assert resumed.meta["training"]["resumed_at_step"] == 4
    assert not settings.checkpoints.exists()  # a finished run's checkpoints are cleaned up


def test_resume_refuses_changed_settings_and_no_resume_starts_afresh(tiny_base, small_data, tmp_path):
    settings = _settings(tiny_base, small_data, tmp_path / "run", max_steps=4)
    with pytest.raises(TrainingInterrupted):
        train(settings, show_progress=False, on_step=_interrupt_at(2))
    changed = _settings(tiny_base, small_data, tmp_path / "run", max_steps=4, lr=5e-3)
    with pytest.raises(UsageError, match=r"settings differ from the checkpoint's \(lr; e.g. lr was 0.01\)"):
        train(changed, show_progress=False, resume=True)
    fresh = train(changed, show_progress=False, resume=False)
    assert fresh.meta["training"]["resumed_at_step"] is None and len(fresh.losses) == 4


def test_a_checkpoint_from_before_a_new_setting_resumes_with_its_default(tiny_base, small_data, tmp_path):
    settings = _settings(tiny_base, small_data, tmp_path / "run", max_steps=3)
    with pytest.raises(TrainingInterrupted):
        train(settings, show_progress=False, on_step=_interrupt_at(2))
    state = checkpoint.latest(settings.checkpoints) / checkpoint.STATE_FILE
    raw = json.loads(state.read_text())
    del raw["settings"]["unlikelihood"], raw["settings"]["lora"]["use_dora"]  # written before these settings existed
    del raw["settings"]["augment"]  # a run then trained on the pairs as written, whatever today's default
    state.write_text(json.dumps(raw))
    assert resolve_settings(None, {"output_dir": str(tmp_path / "run")}, True).augment == 0  # a resume without the flag keeps it
    assert train(settings, show_progress=False, resume=True).meta["training"]["resumed_at_step"] == 2
    with pytest.raises(TrainingInterrupted):
        train(_settings(tiny_base, small_data, tmp_path / "other", max_steps=3), show_progress=False, on_step=_interrupt_at(2))
    changed = _settings(tiny_base, small_data, tmp_path / "other", max_steps=3, unlikelihood=0.5)
    with pytest.raises(UsageError, match=r"\(unlikelihood; e.g. unlikelihood was 2.0\)"):  # the default then
        train(changed, show_progress=False, resume=True)


def test_ctrl_c_in_the_cli_writes_a_checkpoint_and_resume_finishes(tiny_base, small_data, tmp_path):
    out = tmp_path / "adapter"
    args = ["train", "--base-model", str(tiny_base), "--data", str(small_data), "--output-dir", str(out),
            "--batch-size", "2", "--max-steps", "12", "--save-every", "0"]
    env = dict(os.environ, COLUMNS="200", BANKLORA_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "banklora", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "adapter-checkpoints" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "stopped at step" in stderr
    stopped = checkpoint.latest(tmp_path / "adapter-checkpoints")
    step = checkpoint.TrainerState.read(stopped).step
    assert 2 <= step < 12 and not out.exists()

    # resume needs only the output directory: the other settings come from the checkpoint
    changed = cli("train", "--output-dir", str(out), "--resume", "--lr", "0.5")
    assert changed.returncode == 2 and "settings differ" in changed.stderr
    done = cli("train", "--output-dir", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / META_FILE).read_text())
    assert meta["training"]["resumed_at_step"] == step and len(meta["loss_per_step"]) == 12


def test_non_finite_steps_are_skipped_then_abort_with_no_adapter(tiny_base, small_data, tmp_path, monkeypatch):
    import banklora.loss as loss_module

    # one poisoned step is skipped and the run goes on (the final hidden states, which every training objective reads)
    real, calls = loss_module._final_states, {"n": 0}

    def poisoned(model, batch):
        causal_lm, hidden = real(model, batch)
        calls["n"] += 1
        return causal_lm, (hidden * float("nan") if calls["n"] == 2 else hidden)

    monkeypatch.setattr(loss_module, "_final_states", poisoned)
    result = train(_settings(tiny_base, small_data, tmp_path / "skip", max_steps=3, save_every=0), show_progress=False)
    assert result.losses[1] is None and result.losses[0] is not None and result.losses[2] is not None
    assert result.meta["training"]["skipped_steps"] == [2]
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records if "loss" in r] == [None, "non-finite loss", None]
    monkeypatch.undo()

    # an absurd learning rate: every step after the first is non-finite; three in a row abort
    out = tmp_path / "diverged"
    with pytest.raises(BankloraError, match=r"diverged: 3 steps in a row.*lower --lr \(now 1e\+30\).*No adapter was written"):
        train(_settings(tiny_base, small_data, out, lr=1e30, max_steps=10, max_bad_steps=3, save_every=0), show_progress=False)
    assert not out.exists()


def test_early_stopping_keeps_the_best_adapter_beside_the_last(tiny_base, small_data, tmp_path):
    # min_delta 100: no validation after the first counts as better, so patience 2 stops at step 3
    settings = _settings(tiny_base, small_data, tmp_path / "run", epochs=5, eval_every=1,
                         early_stopping_patience=2, early_stopping_min_delta=100.0, save_every=0)
    result = train(settings, show_progress=False)
    meta = result.meta
    assert meta["stopped_early"] is True and meta["training"]["steps_done"] == 3 and len(result.losses) == 3
    assert [v["step"] for v in meta["validation_loss"]] == [1, 2, 3]
    assert meta["best_validation"]["step"] == 1
    best = result.output_dir / "best"
    assert json.loads((best / META_FILE).read_text())["best"]["step"] == 1
    last_w, best_w = _weights(result.output_dir), _weights(best)
    assert any(not torch.equal(last_w[k], best_w[k]) for k in last_w)  # two different adapters
    assert load(str(best)).adapter_path == best  # the best one loads like any adapter
    assert (result.output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["best"] for r in records if "validation_loss" in r] == [True, False, False]
    assert all({"loss", "lr", "grad_norm", "tokens_per_second"} <= set(r) for r in records if "loss" in r)


def test_rslora_and_dora_train_and_reload_with_plain_peft(tiny_base, small_data, tmp_path):
    from peft import PeftConfig

    for name, lora in (("rslora", LoraSettings(use_rslora=True)), ("dora", LoraSettings(use_dora=True, target_modules=("q_proj", "v_proj")))):
        result = train(_settings(tiny_base, small_data, tmp_path / name, max_steps=1, save_every=0, lora=lora), show_progress=False)
        config = PeftConfig.from_pretrained(str(result.output_dir))
        assert config.use_rslora == (name == "rslora") and config.use_dora == (name == "dora")
        keys = _weights(result.output_dir).keys()
        if name == "dora":
            assert any("lora_magnitude_vector" in k for k in keys)
            assert {k.split(".")[-3] for k in keys if "lora_A" in k} == {"q_proj", "v_proj"}
        load(str(result.output_dir))  # loads back through the one loader


def test_lora_and_qlora_mistakes_are_sentences(tiny_base, small_data, tmp_path):
    with pytest.raises(UsageError, match=r"--lora-targets: qkv_proj is not a linear layer of this model; choose from .*q_proj"):
        train(_settings(tiny_base, small_data, tmp_path / "x", lora=LoraSettings(target_modules=("qkv_proj",))), show_progress=False)
    result = cli("train", "--base-model", str(tiny_base), "--output-dir", str(tmp_path / "q"), "--quantize", "4bit")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    assert "--lora-alpha must be positive" in cli("train", "--lora-alpha", "0").stderr


def test_low_memory_trains_the_same_run(tiny_base, small_data, tmp_path):
    # in its own process: --low-memory tunes the allocator of the process it runs in
    default = train(_settings(tiny_base, small_data, tmp_path / "default", epochs=1), show_progress=False)
    done = run_cli("train", "--base-model", str(tiny_base), "--data", str(small_data), "--output-dir", str(tmp_path / "low"),
                   "--epochs", "1", "--batch-size", "2", "--lr", "1e-2", "--augment", "0", "--low-memory", timeout=600)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "low" / "banklora_meta.json").read_text())
    assert meta["training"]["low_memory"] is True
    assert meta["loss_per_step"] == pytest.approx(default.losses, abs=1e-6)
    weights, reference = _weights(tmp_path / "low"), _weights(tmp_path / "default")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)


def test_a_checkpoint_of_another_number_of_processes_is_refused(tiny_base, small_data, tmp_path):
    """A 2-process run resumed on 1 process would halve the global batch and jump the schedule."""
    settings = _settings(tiny_base, small_data, tmp_path / "run", max_steps=4)
    with pytest.raises(TrainingInterrupted):
        train(settings, show_progress=False, on_step=_interrupt_at(2))
    found = checkpoint.latest(settings.checkpoints)
    state = json.loads((found / checkpoint.STATE_FILE).read_text())
    assert state["processes"] == 1  # recorded
    state["processes"] = 2  # as a torchrun --nproc_per_node 2 run writes it
    (found / checkpoint.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UsageError, match=r"written by a run on 2 process\(es\) \(global batch 2 x 2\), and this run has 1.*torchrun --nproc_per_node 2"):
        train(settings, show_progress=False, resume=True)
    assert checkpoint.latest(settings.checkpoints) == found  # nothing was lost


def strict_json(text: str):
    """JSON as other parsers read it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_diverged_validation_loss_is_written_as_null_in_strict_json(tiny_base, small_data, tmp_path, monkeypatch):
    import banklora.loss as loss_module

    real = loss_module.token_losses

    def nan_when_validating(model, batch, head_chunk=None):
        losses, keep = real(model, batch, head_chunk)
        return (losses if torch.is_grad_enabled() else losses * float("nan")), keep

    monkeypatch.setattr(loss_module, "token_losses", nan_when_validating)
    result = train(_settings(tiny_base, small_data, tmp_path / "run", max_steps=3, save_every=0), show_progress=False)
    meta = strict_json((result.output_dir / META_FILE).read_text())
    assert [v["loss"] for v in meta["validation_loss"]] == [None] and meta["best_validation"] is None
    records = [strict_json(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["validation_loss"] for r in records if "validation_loss" in r] == [None]
    assert all(x is not None for x in meta["loss_per_step"])  # the training steps themselves were fine


def test_the_adapter_carries_a_model_card_and_a_portable_base_name(tiny_base, small_data, tmp_path):
    result = train(_settings(tiny_base, small_data, tmp_path / "bank-adapter", max_steps=3, save_every=0), show_progress=False)
    card = (result.output_dir / "README.md").read_text()
    meta = json.loads((result.output_dir / META_FILE).read_text())
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == meta["base_model"]["hub_id"]
    assert meta["base_model"]["path"] == str(tiny_base) and len(meta["base_model"]["sha256"]) == 64
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    for fact in (meta["base_model"]["sha256"], meta["dataset"]["sha256"], "r 8, alpha 32, dropout 0.1",
                 f"validation loss: {meta['validation_loss'][-1]['loss']:.4f}", "## Intended use", "## Limitations",
                 "https://ai.google.dev/gemma/terms", "not run yet"):
        assert fact in card, fact
    assert "[More Information Needed]" not in card  # PEFT's empty template is gone
