"""Experiment tracking (--report-to): what a run sends to TensorBoard and MLflow, read back by
their own readers (TensorBoard's EventAccumulator, MLflow's client)."""

import json

import pytest
from test_resilience import _settings

from banklora.errors import UsageError
from banklora.train import train


def _same(got, expected):
    """(step, value) pairs equal, values to float32 (TensorBoard's)."""
    return [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _mlflow_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("banklora")
    return client, client.search_runs([experiment.experiment_id])


def test_a_run_reports_its_scalars_to_tensorboard_and_mlflow(tiny_base, small_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "adapter"
    result = train(_settings(tiny_base, small_data, out, max_steps=3, eval_every=1, report_to=("tensorboard", "mlflow")), show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    validations = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]

    logdir = out / "tensorboard"  # moved into the adapter with metrics.jsonl; nothing left in the checkpoints folder
    assert logdir.is_dir() and not (tmp_path / "adapter-checkpoints").exists()
    assert _same(_scalars(logdir, "train/loss"), [(r["step"], r["loss"]) for r in steps])
    assert [s for s, _ in _scalars(logdir, "train/lr")] == [1, 2, 3]
    assert _same(_scalars(logdir, "validation/loss"), validations)
    assert len(validations) == 3 and len(result.losses) == 3

    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "adapter"
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert _same([(m.step, m.value) for m in history], [(r["step"], r["loss"]) for r in steps])
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_tokens_per_second")] == [1, 2, 3]
    assert _same([(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "validation_loss")], validations)
    params = runs[0].data.params
    assert params["lr"] == "0.01" and params["lora.r"] == "8" and params["max_steps"] == "3" and params["report_to"] == "tensorboard,mlflow"


def test_a_resumed_run_continues_its_mlflow_run_and_its_tensorboard_curve(tiny_base, small_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = _settings(tiny_base, small_data, tmp_path / "adapter", max_steps=4, save_every=2, report_to=("tensorboard", "mlflow"))

    def crash_after_3(state):
        if state.step == 3:
            raise RuntimeError("the machine went down")

    with pytest.raises(RuntimeError):
        train(settings, show_progress=False, on_step=crash_after_3)  # the checkpoint is step 2: step 3 is trained again
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert [s for s, _ in _scalars(settings.checkpoints / "tensorboard", "train/loss")] == [1, 2, 3]
    result = train(settings, show_progress=False, resume=True)
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, finished
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 3, 4]  # MLflow keeps both points of step 3 (it cannot delete one)
    assert [m.value for m in history][-2:] == pytest.approx(result.losses[-2:], rel=1e-6)  # the later one is the resumed run's
    curve = _scalars(tmp_path / "adapter" / "tensorboard", "train/loss")
    assert [s for s, _ in curve] == [1, 2, 3, 4]  # TensorBoard purged the interrupted step 3: each step once
    assert [v for _, v in curve] == pytest.approx(result.losses, rel=1e-6)


def test_report_to_none_writes_no_tracking_and_a_wrong_name_is_refused(tiny_base, small_data, tmp_path):
    result = train(_settings(tiny_base, small_data, tmp_path / "plain", max_steps=1, report_to="none"), show_progress=False)
    assert not (result.output_dir / "tensorboard").exists()
    with pytest.raises(UsageError, match="--report-to takes tensorboard, mlflow"):
        _settings(tiny_base, small_data, tmp_path / "x", report_to="wandb")
