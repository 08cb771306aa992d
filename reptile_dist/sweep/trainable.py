"""One Tune trial: the distributed engine (`train_ray`) inside the trial's placement group
(placement.py).

Every `report_every` meta-steps the engine writes a checkpoint and evaluates on validation
tasks; when that evaluation arrives, the trial reports it to Tune together with the checkpoint
of the same meta-step. The Tune checkpoint is the trial's state; the engine's run directory (in
the trial's working directory) is scratch: a (re)started trial clears it and, when Tune hands back
a checkpoint (resume, PBT exploit), seeds it with that checkpoint and resumes the engine from it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from reptile_dist.engine.cluster import cluster_gpus, cluster_has_head_node
from reptile_dist.rundir import RunDir, config_identity, load_checkpoint, save_torch
from reptile_dist.runview import finite_number
from reptile_dist.sweep.placement import trial_bundles
from reptile_dist.sweep.spec import SweepSpec

CHECKPOINT_FILE = "engine.pt"


def trainable(spec: SweepSpec):
    """The function trainable with its placement group on the running cluster, ready for `tune.Tuner`."""
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                               lambda params: trial_resources(spec, params, cluster_gpus() > 0, cluster_has_head_node()))


def trial_resources(spec: SweepSpec, params: dict[str, Any], cluster_has_gpus: bool,
                    head_node: bool) -> tune.PlacementGroupFactory:
    """Bundle 0: this function (the engine's driver); then the engine's own bundles."""
    cfg = spec.trial_config(params)
    return tune.PlacementGroupFactory(trial_bundles(cfg, cluster_has_gpus, head_node), strategy=cfg.placement)


def run_trial(params: dict[str, Any], spec: SweepSpec) -> None:
    from reptile_dist.engine.driver import train_ray

    # A trial the scheduler stops ends its engine actors mid-task; their lost results are expected.
    os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
    cfg = spec.trial_config(params)
    # The trial's working directory (Tune's per-trial scratch space on the node running it, not
    # synced to storage); named by trial so it stays apart even without Tune's chdir.
    run_dir = Path.cwd() / f"engine-{tune.get_context().get_trial_id()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        RunDir(str(run_dir)).start(cfg)
        with checkpoint.as_directory() as d:
            state = Path(d) / CHECKPOINT_FILE
            step = int(Path(d, "step").read_text())
            # PBT hands a trial another trial's weights under this trial's hyperparameters: the
            # checkpoint is recorded as this configuration's, which resume checks.
            restored = load_checkpoint(str(state))
            restored.update(config=cfg.to_dict(), config_identity=config_identity(cfg))
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints" / f"ckpt-{step:08d}.pt").write_bytes(save_torch(restored))
    reporter = Reporter(run_dir, spec.metric, cfg.meta_batch_size)
    train_ray(cfg, str(run_dir), resume=checkpoint is not None, progress=False, say=_quiet, on_log=reporter.on_log)


class Reporter:
    """Turns the engine's log rows into Tune reports: one per periodic evaluation, with the
    checkpoint of the evaluated meta-step."""

    def __init__(self, run_dir: Path, metric: str, meta_batch_size: int):
        self.run = RunDir(str(run_dir))
        self.metric = metric
        self.meta_batch_size = meta_batch_size
        self.reported_step = -1
        self.train: dict[str, float] = {}

    def on_log(self, row: dict[str, Any]) -> None:
        if "train_loss" in row:
            self.train = {k: row[k] for k in ("train_loss", "train_accuracy", "tasks_per_s") if finite_number(row.get(k)) is not None}
        if self.metric in row and row["step"] > self.reported_step:
            self.report(int(row["step"]), {k: v for k, v in row.items() if k.startswith("eval_")})

    def report(self, step: int, evals: dict[str, float]) -> None:
        saved = dict(self.run.checkpoints())
        if step not in saved:  # not written (redone after a parameter-server restore); the next one reports
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copyfile(self.run.path(saved[step]), Path(d) / CHECKPOINT_FILE)
            Path(d, "step").write_text(str(step))
            tune.report({"meta_step": step, "tasks": step * self.meta_batch_size, **evals, **self.train},
                        checkpoint=tune.Checkpoint.from_directory(d))
        self.reported_step = step


def _quiet(message: str) -> None:
    """The engine's messages, less its per-run headlines: a trial is judged on validation tasks,
    and its closing test-split evaluation is not for choosing between trials."""
    if not message.startswith(("before meta-training", "after meta-training", "resuming")):
        print(message)
