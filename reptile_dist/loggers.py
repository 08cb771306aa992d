"""Where a run's rows go besides its run directory's own files: TensorBoard, MLflow, Weights & Biases.

A logger takes each row the run directory logs (`log(row, step)`), hears that the rows after a
meta-step will come again after a restore (`rewind(step)`), and ends (`close()`). The config key
`loggers` chooses them; TensorBoard is a dependency, MLflow and W&B are extras, checked before
training starts (`check_loggers`).

Scalars are named `train/loss`, `eval/accuracy`, `progress/tasks_per_s`, `ray/staleness_mean`, ...
(`scalar_name`), the same in all three, so TensorBoard groups them and runs compare side by side.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Any, Protocol

from reptile_dist.errors import UserError

# What to install when a logger's package is missing (mlflow and wandb are extras of the package).
INSTALL = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'reptile-dist[mlflow]'",
           "wandb": "pip install 'reptile-dist[wandb]'"}
# What to try when a logger cannot start or stops during a run.
HINTS = {"wandb": "WANDB_MODE=offline logs without an account or a network"}
MLFLOW_EXPERIMENT = "reptile-dist"  # MLFLOW_EXPERIMENT_NAME overrides
WANDB_PROJECT = "reptile-dist"  # WANDB_PROJECT overrides
PROGRESS_KEYS = ("meta_step_size", "tasks_per_s", "wall_s")
RAY_KEYS = ("staleness_mean", "staleness_max", "dropped_stale", "rejected_nonfinite", "ps_busy_fraction",
            "workers_replaced", "ps_restarts")


class LoggerUnavailable(UserError):
    """A logger the configuration asks for cannot be used here (its package is missing)."""


class Logger(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None:
        """Record one row of the run (its scalars, and an `event` as text where the logger has text)."""

    def rewind(self, step: int) -> None:
        """The rows after `step` are redone (a restore from its checkpoint) and will be logged again."""

    def close(self) -> None:
        """Write what is buffered and end."""


def check_loggers(names: list[str]) -> None:
    """Raise LoggerUnavailable, one line saying what to install, when a logger's package cannot be imported."""
    for name in names:
        module = "torch.utils.tensorboard" if name == "tensorboard" else name
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or name
            raise LoggerUnavailable(f"loggers: {name} needs the {missing} package, which cannot be imported "
                                    f"({' '.join(str(exc).split())}); {INSTALL[name]}") from None


def open_logger(name: str, folder: str, run_name: str, run_id: str, config: dict[str, Any],
                purge_step: int | None = None) -> Logger:
    """The logger `name`, writing under the local `folder` (the run directory, or its local staging
    folder for a remote one): tensorboard/, mlflow.db, wandb/. `run_id` names the run across resumes
    (run.json's `run_id`); `purge_step`: the first meta-step this session logs when it resumes an
    earlier one."""
    if name == "tensorboard":
        return TensorBoardLogger(os.path.join(folder, "tensorboard"), purge_step)
    if name == "mlflow":
        return MlflowLogger(folder, run_name, run_id, config)
    if name == "wandb":
        return WandbLogger(folder, run_name, run_id, config)
    raise LoggerUnavailable(f"loggers: {name!r} is not one of {', '.join(INSTALL)}")


def scalar_name(key: str) -> str:
    """A row key as the loggers name it: train_loss -> train/loss, eval_accuracy_ci95 ->
    eval/accuracy_ci95, tasks_per_s -> progress/tasks_per_s, staleness_mean -> ray/staleness_mean."""
    for prefix in ("train", "eval"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    if key in PROGRESS_KEYS:
        return f"progress/{key}"
    if key in RAY_KEYS:
        return f"ray/{key}"
    return key


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers, named by `scalar_name` (a NaN, such as the accuracy of a
    regression, is left out: it draws nothing)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[scalar_name(key)] = float(value)
    return out


class TensorBoardLogger:
    """Event files in `folder`; flushed with every row, so `tensorboard --logdir` shows a live run."""

    def __init__(self, folder: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(folder, purge_step=purge_step)

    def log(self, row: dict[str, Any], step: int) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        if row.get("event"):
            self.writer.add_text("events", str(row["event"]), step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        # A new event file whose purge marker hides the old events after `step` (TensorBoard's own
        # way of showing a restarted run once).
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(self.folder, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """An MLflow run in experiment `reptile-dist` (or $MLFLOW_EXPERIMENT_NAME), in a store of its
    own in the run directory (`mlflow.db`, SQLite: MLflow 3 refuses its older file store) unless
    $MLFLOW_TRACKING_URI names another store or a server. A resumed run continues the MLflow run
    that has its run id as tag `reptile_dist.run_id`."""

    def __init__(self, folder: str, run_name: str, run_id: str, config: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        folder = os.path.abspath(folder)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{folder}/mlflow.db")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        artifacts = None if uri else f"file://{folder}/mlflow-artifacts"  # not a folder in the working directory
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=artifacts))
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`reptile_dist.run_id` = '{run_id}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags={"reptile_dist.run_id": run_id}).info.run_id
            self.client.log_batch(self.run_id, params=_params(config))

    def log(self, row: dict[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def rewind(self, step: int) -> None:
        pass  # a metric's history keeps both values of a redone step; the later one is the run's

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbLogger:
    """A W&B run in project `reptile-dist` (or $WANDB_PROJECT), its files under the run directory;
    WANDB_MODE=offline logs without a network (`wandb sync` uploads later). A resumed run continues
    the W&B run of the same run id."""

    def __init__(self, folder: str, run_name: str, run_id: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, name=run_name, id=run_id,
                              resume="allow", dir=folder, config=config, reinit="create_new")

    def log(self, row: dict[str, Any], step: int) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=step)

    def rewind(self, step: int) -> None:
        pass  # W&B keeps a step once; the redone steps it already holds are ignored by it

    def close(self) -> None:
        self.run.finish()


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:500]) for key, value in config.items()]
