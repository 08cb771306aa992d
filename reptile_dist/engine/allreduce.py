"""Synchronous Reptile without a parameter server, on Ray Train (`--mode allreduce`).

    every worker:  theta (the same on all)
                   -> adapt tasks i = rank (mod W) of meta-step t        (training.meta_train,
                   -> the shares' DeltaSums in their wire form            reptile.meta_step)
                      --all_reduce(sum)-->                               (engine/wire.py)
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
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from reptile_dist.config import Config, ConfigError
from reptile_dist.engine.adapt_worker import worker_share
from reptile_dist.engine.cluster import run_on_cluster, worker_resources
from reptile_dist.engine.wire import DeltaCodec
from reptile_dist.evaluation import TaskScores, combine_scores, headline, score_tasks, summarize
from reptile_dist.reptile import DeltaSum, InnerMoment, OuterOptimizer
from reptile_dist.rundir import RunDir, load_torch_bytes
from reptile_dist.plugins import Plugins, build_family
from reptile_dist.errors import RunFailed
from reptile_dist.training import (LoopHooks, RunSetup, Throughput, checkpoint_state, finish_run, make_learner,
                                   meta_train, periodic_split, set_torch_threads)

STATE_FILE = "state.pt"
TRAIN_STORAGE = "ray-train"  # Ray Train's own checkpoints; inside the run directory while it runs, removed after


def train_allreduce(cfg: Config, out: str, address: str | None = None, resume: bool = False, progress: bool = True,
                    say: Callable[[str], None] = print, on_log: Callable[[dict[str, Any]], None] | None = None,
                    plugins: Plugins | None = None) -> dict[str, Any]:
    """Meta-train in a Ray Train worker group; the run directory ends up with the same files as a local run
    but test-scores.jsonl (the ranks score the final evaluation among themselves, whole)."""
    if on_log is not None:
        raise ConfigError("mode allreduce logs from its rank-0 worker and cannot call on_log; use mode sync or async")
    started = time.perf_counter()
    return run_on_cluster(cfg, out, address, resume, say, plugins, lambda s: _fit(cfg, s, started, progress, say))


def _fit(cfg: Config, s: RunSetup, started: float, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
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
    if "failed" in done:
        raise RunFailed(done["failed"])
    s.run = s.run.hand_over(_reopened(s.run))  # rank 0 wrote the metric rows; finish_run's flush must keep them
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


def make_trainer(cfg: Config, s: RunSetup, storage: str, progress: bool, hooks: LoopHooks | None = None) -> TorchTrainer:
    """W workers of one GPU (or cpus_per_worker CPUs) each, nccl on GPUs, gloo on CPUs; Ray Train keeps its
    checkpoints in `storage` and restarts the group from the newest one up to cfg.max_failures times.
    `hooks` (benchmarks): every rank's training loop calls them; rank 0 returns `hooks.result()`."""
    resources = worker_resources(cfg)
    use_gpu = resources.get("GPU", 0) > 0
    worker_cfg = cfg  # Ray Train workers run in a folder of their own: resolve a relative data path here
    if "://" not in cfg.data and not os.path.isabs(cfg.data):
        worker_cfg = cfg.replace(data=os.path.abspath(cfg.data))
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": worker_cfg.to_dict(), "out": s.run.uri if "://" in s.run.uri else s.run.root,
                           "outer": s.outer.state_dict(), "start_step": s.start_step, "progress": progress,
                           "hooks": hooks, "plugins": s.plugins},
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
    """One Ray Train worker: the local trainer's loop (training.meta_train) with an all-reduce
    between the deltas and the update."""
    cfg = Config(**config["cfg"])
    hooks: LoopHooks = config.get("hooks") or LoopHooks()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(cfg, cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    plugins: Plugins = config["plugins"]
    family = build_family(cfg, plugins)
    learner = make_learner(cfg, family, device, plugins)
    outer = OuterOptimizer.for_config(cfg, learner.initial_theta().cpu())
    codec = DeltaCodec(outer.theta.numel(), cfg.carries_inner_moment, cfg.wire_dtype)

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
        return summarize(combine_scores(parts))

    before = state.get("before")
    if start == 0 and before is None:
        before = evaluate_sharded(periodic_split(family), cfg.eval_tasks_periodic)

    allreduce_s = 0.0

    def combine(part: DeltaSum, stop: bool) -> tuple[DeltaSum, bool]:
        nonlocal allreduce_s
        t0 = time.perf_counter()
        total, stop = all_reduce_sum(part, codec, comm_device, stop)
        allreduce_s += time.perf_counter() - t0
        return total, stop

    def record(step: int, row: dict[str, Any] | None, checkpoint: bool) -> None:
        if run is not None and row is not None:
            run.log(row)
            if config["progress"]:  # sys.stdout: Ray Train's patched print would show the line twice
                sys.stdout.write(f"meta-step {step}/{cfg.meta_iters} " + " ".join(
                    f"{k}={v:.3g}" for k, v in row.items() if k != "step" and not math.isnan(v)) + "\n")
                sys.stdout.flush()
        report(run, row or {"step": step},
               checkpoint_state(cfg, step, outer.state_dict(), before=before,
                                                family_info=learner.family_info) if checkpoint else None,
               cfg.keep_checkpoints)

    share = worker_share(cfg, rank)  # as the PS sync mode shares a meta-step
    try:
        throughput = meta_train(cfg, learner, family, outer, start, share, evaluate_sharded, record, combine=combine,
                                hooks=hooks, worker=rank)
    except RunFailed as exc:
        # Every rank sees the same summed update, so all stop at the same meta-step; a restart of the
        # group from its checkpoint would only meet the same update again.
        if run is not None:
            run.flush_metrics()
        return {"failed": str(exc)} if rank == 0 else None
    finally:
        if run is not None:
            run.release()  # the loggers end their run; the driver's handle holds the folder's lock
    test = evaluate_sharded("test", cfg.eval_tasks)
    if rank != 0:
        return None
    moment = None if outer.inner_moment is None else outer.inner_moment.as_numpy()  # Ray Train refuses tensors
    return {"theta": outer.theta.clone().numpy(), "moment": moment, "test": test, "before": before, "tasks": throughput.tasks,
            "train_s": throughput.seconds, "allreduce_s": allreduce_s, "restored_from_step": restored_from,
            "placements": placements, "hooks": hooks.result()}


def all_reduce_sum(part: DeltaSum, codec: DeltaCodec, device: torch.device, stop: bool = False) -> tuple[DeltaSum, bool]:
    """Sum the ranks' partial DeltaSums in their wire form (engine/wire.py): in float64 (what
    delta_dtype auto means here) one all_reduce of [vector, counts], so the sum is the local trainer's; in a lower
    precision the vector is summed in it and the counts in a second, float64 all_reduce.

    `stop` rides along as a vote: true on any rank comes back true on every rank, so a group that
    stops on a clock leaves the loop at the same meta-step everywhere (else the next all_reduce hangs).
    Every rank's estimates have taken the same inner steps, so `moment_steps` is the rank's own, not a sum."""
    vector = codec.vector(part)
    counts = torch.cat([codec.counts(part), torch.tensor([float(stop)], dtype=torch.float64)])
    if vector.dtype == torch.float64:
        buffer = torch.cat([vector, counts]).to(device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        buffer = buffer.cpu()
        vector, counts = buffer[:vector.numel()], buffer[vector.numel():]
    else:
        vector, counts = vector.to(device), counts.to(device)
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        vector, counts = vector.cpu(), counts.cpu()
    total = codec.from_tensors(vector, counts[:-1])
    total.moment_steps = part.moment_steps
    return total, counts[-1].item() > 0


def report(run: RunDir | None, metrics: dict[str, Any], state: dict[str, Any] | None, keep: int) -> None:
    """ray.train.report on every rank (it is a barrier); rank 0 (holding `run`) saves the checkpoint
    in the run directory and attaches it to the report, from which a restarted group resumes.

    Metric rows are flushed with every checkpoint, so a restarted group finds the rows up to it."""
    if run is None or state is None:
        ray.train.report(metrics)
        return
    run.save_checkpoint(state["step"], state, keep)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _reopened(run: RunDir) -> RunDir:
    """A fresh handle on a claimed run directory, holding the metric rows written so far."""
    fresh = RunDir(run.uri)
    fresh.load_metrics()
    return fresh


def _remove_dir(run: RunDir, path: str) -> None:
    try:
        run.fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
