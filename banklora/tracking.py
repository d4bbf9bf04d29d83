"""Experiment tracking: a run's step and validation records sent to TensorBoard and MLflow as
they are written to metrics.jsonl (`--report-to tensorboard,mlflow`; `none` = neither).

TensorBoard event files go beside metrics.jsonl while the run goes (`<checkpoints>/tensorboard`)
and into the adapter directory with it (`<output-dir>/tensorboard`): `tensorboard --logdir
outputs`. MLflow logs to MLFLOW_TRACKING_URI where it is set, else to a local SQLite store beside
the adapter (`sqlite:///<output-dir's folder>/mlflow.db`: `mlflow ui --backend-store-uri ...`).
Neither touches the network at import or start (MLflow's telemetry is switched off here).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from banklora.errors import UsageError

log = logging.getLogger(__name__)

REPORTERS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_RUN_FILE = "mlflow_run_id"  # in the checkpoints folder: a resumed run continues its MLflow run
# metrics.jsonl's fields -> the scalar names both trackers show
SCALARS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "tokens_per_second": "train/tokens_per_second",
           "validation_loss": "validation/loss"}


def check_reporters(names: tuple[str, ...]) -> tuple[str, ...]:
    """The reporters a --report-to value names, checked: tensorboard, mlflow, or none."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise UsageError(f"--report-to takes tensorboard, mlflow (comma-separated) or none (got {', '.join(unknown)})")
    if "mlflow" in names and importlib.util.find_spec("mlflow") is None:
        raise UsageError("--report-to mlflow needs MLflow: pip install 'banklora[mlflow]' (or drop mlflow from --report-to)")
    return names


def mlflow_uri(output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir).resolve().parent / MLFLOW_DB)}"


class Trackers:
    """The run's trackers (main process only). log(record) takes metrics.jsonl's records."""

    def __init__(self, reporters: tuple[str, ...], checkpoints: Path, output_dir: str, settings: dict, resumed_at: int | None):
        self.writer = self.mlflow = None
        try:
            if "tensorboard" in reporters:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run drops the events after its checkpoint's step: they are trained again
                self.writer = SummaryWriter(log_dir=str(checkpoints / TENSORBOARD_DIR), purge_step=resumed_at + 1 if resumed_at else None)
                self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in _flat(settings).items()), 0)
            if "mlflow" in reporters:
                self._start_mlflow(checkpoints, output_dir, settings)
        except BaseException:
            self.close(finished=False)
            raise

    def _start_mlflow(self, checkpoints: Path, output_dir: str, settings: dict) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(mlflow_uri(output_dir))
        mlflow.set_experiment("banklora")
        nested = mlflow.active_run() is not None  # inside a run of the caller's (a notebook, a sweep script)
        run_id, run = _mlflow_run_id(checkpoints), None
        if run_id:  # a resumed run continues its MLflow run, where that store still has it
            try:
                run = mlflow.start_run(run_id=run_id, nested=nested)
            except MlflowException:
                log.warning("MLflow run %s is not in %s: the resumed run starts a new one", run_id, mlflow.get_tracking_uri())
        if run is None:
            run = mlflow.start_run(run_name=Path(output_dir).name, nested=nested)
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(settings).items()})
        self.mlflow = mlflow
        (checkpoints / MLFLOW_RUN_FILE).write_text(run.info.run_id)
        log.info("MLflow: run %s in %s", run.info.run_id, mlflow.get_tracking_uri())

    def log(self, record: dict) -> None:
        step = record["step"]
        values = {name: float(record[key]) for key, name in SCALARS.items() if isinstance(record.get(key), (int, float))}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.mlflow is not None and values:
            self.mlflow.log_metrics({name.replace("/", "_"): v for name, v in values.items()}, step=step)

    def close(self, finished: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FINISHED" if finished else "KILLED")


def _mlflow_run_id(checkpoints: Path) -> str | None:
    path = checkpoints / MLFLOW_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out
