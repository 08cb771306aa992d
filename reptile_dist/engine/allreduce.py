"""Synchronous Reptile without a parameter server, on Ray Train (`--mode allreduce`).

    every worker:  theta (the same on all)
                   -> adapt tasks i = rank (mod W) of meta-step t        (reptile.adapt_tasks)
                   -> [sum of deltas (float64), (sum of carried inner estimates), tasks, loss,
                       accuracy] --all_reduce(sum)-->
                   -> theta <- outer update with eps(t)                  (reptile.OuterOptimizer)
    rank 0:        metric rows and checkpoints in the run directory, and a Ray Train checkpoint
                   that a restarted worker group resumes from (FailureConfig)
    driver:        claim the run directory -> TorchTrainer.fit -> final.pt, summary.json

The float64 sum of a meta-batch's float32 deltas is exact whichever worker adds which part, so
theta equals the local trainer's and the parameter server's sync mode's; every worker applies the
same update to the same theta, so the replicas stay identical without theta ever being sent.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from reptile_dist.config import Config, ConfigError
from reptile_dist.engine.cluster import ray_cluster, worker_resources
from reptile_dist.evaluation import TaskScores, headline, score_tasks, summarize
from reptile_dist.reptile import DeltaSum, InnerMoment, OuterOptimizer, adapt_tasks
from reptile_dist.rundir import RunDir, load_torch_bytes
from reptile_dist.tasks import build_family
from reptile_dist.training import RunSetup, Throughput, checkpoint_state, finish_run, make_learner, periodic_split, setup_run

STATE_FILE = "state.pt"
TRAIN_STORAGE = "ray-train"  # Ray Train's own checkpoints; inside the run directory while it runs, removed after


def train_allreduce(cfg: Config, out: str, address: str | None = None, resume: bool = False, progress: bool = True,
                    say: Callable[[str], None] = print,
                    on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Meta-train in a Ray Train worker group; the run directory ends up with the same files as a local run."""
    if on_log is not None:
        raise ConfigError("mode allreduce logs from its rank-0 worker and cannot call on_log; use mode sync or async")
    started = time.perf_counter()
    with ray_cluster(cfg, address):
        s = setup_run(cfg, out, resume, say)
        storage = s.run.path(TRAIN_STORAGE)
        trainer = make_trainer(cfg, s, storage, progress)
        try:
            result = trainer.fit()
        except SystemExit as exc:  # how fit() ends after Ray Train's Ctrl-C handler aborted the run
            raise KeyboardInterrupt from exc
        finally:
            _remove_dir(s.run, storage)
        done = result.return_value
        if done is None:  # aborted without an error
            raise KeyboardInterrupt
        s.run = _reopened(s.run)  # rank 0 wrote the metric rows; finish_run's flush must keep them
        before = done["before"] if s.start_step == 0 else None
        if before is not None:
            say(f"before meta-training ({periodic_split(s.family)}): {headline(before, s.family.kind)}")
        extra = {"allreduce_fraction": done["allreduce_s"] / done["train_s"] if done["train_s"] > 0 else math.nan,
                 "restored_from_step": done["restored_from_step"],
                 "worker_nodes": sorted({p["node_id"] for p in done["placements"]}),
                 "worker_devices": sorted({p["device"] for p in done["placements"]})}
        throughput = Throughput(tasks=done["tasks"], seconds=done["train_s"])
        theta = torch.tensor(done["theta"])  # return values are read-only arrays
        return finish_run(s, theta, cfg.meta_iters, throughput, time.perf_counter() - started, before, extra, say,
                          done["test"], InnerMoment.from_state(done["moment"]))


def make_trainer(cfg: Config, s: RunSetup, storage: str, progress: bool,
                 stop_after_s: float | None = None) -> TorchTrainer:
    """W workers of one GPU (or cpus_per_worker CPUs) each, nccl on GPUs, gloo on CPUs; Ray Train keeps its
    checkpoints in `storage` and restarts the group from the newest one up to cfg.max_failures times.
    `stop_after_s` (benchmarks): see worker_loop."""
    resources = worker_resources(cfg)
    use_gpu = resources.get("GPU", 0) > 0
    worker_cfg = cfg  # Ray Train workers run in a folder of their own: resolve a relative data path here
    if "://" not in cfg.data and not os.path.isabs(cfg.data):
        worker_cfg = cfg.replace(data=os.path.abspath(cfg.data))
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": worker_cfg.to_dict(), "out": s.run.uri if "://" in s.run.uri else s.run.root,
                           "outer": s.outer.state_dict(), "start_step": s.start_step, "progress": progress,
                           "stop_after_s": stop_after_s},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement),
        run_config=RunConfig(name=f"allreduce-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             storage_filesystem=s.run.fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: the local trainer's loop with an all-reduce between the deltas and the update.

    With config["stop_after_s"] set (reptile-dist bench), training ends that many seconds (on rank 0's clock)
    after the first meta-step (which pays torch's lazy initialisation) instead of at meta_iters, and rank 0 returns
    `timeline`: (end, all-reduce seconds) of every meta-step, perf_counter seconds from the loop's start."""
    cfg = Config(**config["cfg"])
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, math.ceil(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    family = build_family(cfg)
    learner = make_learner(cfg, family, device)
    outer = OuterOptimizer(learner.initial_theta().cpu(), cfg.outer_optimizer, cfg.carries_inner_moment)

    state: dict[str, Any] = {"outer": config["outer"], "step": config["start_step"]}
    restored_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # the worker group was restarted after a failure
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE), "rb") as f:
                state = load_torch_bytes(f.read(), STATE_FILE)
        restored_from = int(state["step"])
        if rank == 0:
            sys.stdout.write(f"worker group restarted: resuming from its checkpoint at meta-step {restored_from}\n")
    outer.load_state_dict(state["outer"])
    start = int(state["step"])
    run = None
    if rank == 0:
        run = _reopened(RunDir(config["out"]))  # the driver claimed it and wrote config.yaml
        run.truncate_metrics(start)
    placements = [None] * world
    dist.all_gather_object(placements, {"node_id": ray.get_runtime_context().get_node_id(), "device": str(device)})

    def evaluate_sharded(split: str, tasks: int) -> dict[str, float]:
        bounds = np.linspace(0, tasks, world + 1).astype(int)
        part = score_tasks(learner, family, outer.theta, cfg, split, range(bounds[rank], bounds[rank + 1]),
                           outer.inner_moment)
        parts: list[TaskScores | None] = [None] * world
        dist.all_gather_object(parts, part)
        total = TaskScores([], [], [])
        for p in parts:
            total = total + p
        return summarize(total)

    before = state.get("before")
    if start == 0 and before is None:
        before = evaluate_sharded(periodic_split(family), cfg.eval_tasks_periodic)

    throughput = Throughput()
    allreduce_s = 0.0
    stop_after_s = config.get("stop_after_s")
    timeline: list[tuple[float, float]] = []  # only with stop_after_s: (end, all-reduce seconds) per meta-step
    started = time.perf_counter()
    share = range(rank, cfg.meta_batch_size, world)  # as the PS sync mode shares a meta-step
    for step in range(start, cfg.meta_iters):
        throughput.resume()
        adapt_started = time.perf_counter()
        moment = outer.inner_moment
        part = adapt_tasks(learner, family, outer.theta, cfg, step, share, moment)
        time.sleep(cfg.straggler_delay(rank, time.perf_counter() - adapt_started))
        t0 = time.perf_counter()
        # Rank 0 keeps the clock (the bench measures from its timeline); every rank takes part in the vote.
        out_of_time = (rank == 0 and stop_after_s is not None and bool(timeline)
                       and t0 - started >= timeline[0][0] + stop_after_s)
        total, stop = all_reduce_sum(part, comm_device, out_of_time,
                                     None if moment is None else moment.steps + cfg.inner_steps)
        t1 = time.perf_counter()
        allreduce_s += t1 - t0
        step_size = cfg.meta_step_size_at(step)
        outer.apply((total.delta / total.tasks).float(), step_size, total.mean_moment())
        throughput.pause(total.tasks)
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == cfg.meta_iters:
            row = {"step": done, "meta_step_size": step_size, "train_loss": total.loss_sum / total.tasks,
                   "train_accuracy": total.accuracy_sum / total.tasks, "tasks_per_s": throughput.tasks_per_s,
                   "wall_s": time.perf_counter() - started}
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.meta_iters):
                ev = evaluate_sharded(periodic_split(family), cfg.eval_tasks_periodic)
                row.update({f"eval_{k}": v for k, v in ev.items() if k != "tasks"})
            if run is not None:
                run.log(row)
                if config["progress"]:  # sys.stdout: Ray Train's patched print would show the line twice
                    sys.stdout.write(f"meta-step {done}/{cfg.meta_iters} " + " ".join(
                        f"{k}={v:.3g}" for k, v in row.items() if k != "step" and not math.isnan(v)) + "\n")
                    sys.stdout.flush()
        save_run_checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
        # The last step is always checkpointed, so a failure in the final evaluation does not redo training.
        if row is not None or save_run_checkpoint or done == cfg.meta_iters:
            save = save_run_checkpoint or done == cfg.meta_iters
            report(run, row or {"step": done},
                   checkpoint_state(cfg, done, outer.state_dict(), before=before) if save else None,
                   save_run_checkpoint, cfg.keep_checkpoints)
        if stop_after_s is not None:
            timeline.append((time.perf_counter() - started, t1 - t0))
        if stop:  # rank 0's clock ran out (stop_after_s): every rank leaves after this same meta-step
            break

    test = evaluate_sharded("test", cfg.eval_tasks)
    if rank != 0:
        return None
    moment = None if outer.inner_moment is None else outer.inner_moment.as_numpy()  # Ray Train refuses tensors
    return {"theta": outer.theta.clone().numpy(), "moment": moment, "test": test, "before": before, "tasks": throughput.tasks,
            "train_s": throughput.seconds, "allreduce_s": allreduce_s, "restored_from_step": restored_from,
            "placements": placements, "timeline": timeline}


def all_reduce_sum(part: DeltaSum, device: torch.device, stop: bool = False,
                   moment_steps: float | None = None) -> tuple[DeltaSum, bool]:
    """Sum the workers' partial DeltaSums in one all_reduce (float64, so the sum is the local trainer's).

    `stop` rides along as a vote: true on any rank comes back true on every rank, so a group that
    stops on a clock leaves the loop at the same meta-step everywhere (else the next all_reduce hangs).
    `moment_steps` (carried inner state): the sums of the tasks' second-moment estimates ride along
    too (zeros from a rank without tasks, so every rank's buffer has the same length)."""
    n = part.delta.numel()
    pieces = [part.delta.to(torch.float64)]
    if moment_steps is not None:
        pieces.append(part.moment_sum.to(torch.float64) if part.moment_sum is not None
                      else torch.zeros(n, dtype=torch.float64))
    counts = torch.tensor([part.tasks, part.loss_sum, part.accuracy_sum, float(stop)], dtype=torch.float64)
    buffer = torch.cat(pieces + [counts]).to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer = buffer.cpu()
    moment_sum = buffer[n : 2 * n] if moment_steps is not None else None
    total = DeltaSum(buffer[:n], int(buffer[-4].item()), float(buffer[-3].item()), float(buffer[-2].item()),
                     moment_sum, moment_steps or 0.0)
    return total, buffer[-1].item() > 0


def report(run: RunDir | None, metrics: dict[str, Any], state: dict[str, Any] | None, to_run_dir: bool,
           keep: int) -> None:
    """ray.train.report on every rank (it is a barrier); rank 0 (holding `run`) attaches the checkpoint.

    Metric rows are flushed with every Ray Train checkpoint, so a restarted group finds the rows up to it."""
    if run is None or state is None:
        ray.train.report(metrics)
        return
    if to_run_dir:
        run.save_checkpoint(state["step"], state, keep)
    else:
        run.flush_metrics()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _reopened(run: RunDir) -> RunDir:
    """A fresh handle on a claimed run directory, holding the metric rows written so far."""
    fresh = RunDir(run.uri)
    if fresh.exists("metrics.parquet"):
        for row in pq.read_table(fresh.path("metrics.parquet"), filesystem=fresh.fs).to_pylist():
            fresh.log(row)
    return fresh


def _remove_dir(run: RunDir, path: str) -> None:
    try:
        run.fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
