"""Every GPU path of reptile-dist, run once, with figures: `benchmarks/gpu_check.sh` runs it.

    local trainer on CUDA (device: cuda) against the CPU, side by side
    batched adaptation (torch.func.vmap over a push's tasks) against the per-task loop, on CUDA
    the carried inner estimate on CUDA: theta after the same meta-steps on CPU and on CUDA
    the engine with gpus_per_worker (sync W=1 with one GPU, async W=2 sharing it)
    the all-reduce on NCCL (W=1: one GPU; NCCL refuses two ranks on one device)
    eval and adapt on CUDA

Uses the omniglot-5w1s recipe on the in-memory `synthetic` family (28x28 classes, the same
network and task shapes as Omniglot), so it needs no data table. Prints one line per check and a
JSON summary at the end; a check that fails prints its error and the others still run.
`--only WORD[,WORD]` runs the checks whose names hold one of the words (e.g. `--only eval,adapt`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

import reptile_dist as rd
from reptile_dist.config import load_config
from reptile_dist.plugins import build_family
from reptile_dist.reptile import OuterOptimizer, meta_step
from reptile_dist.training import make_learner, set_torch_threads

RESULTS: dict[str, object] = {}
WORK = tempfile.mkdtemp(prefix="gpu-check-")
BASE = load_config("omniglot-5w1s", dict(family="synthetic", eval_every=0, eval_tasks=100, eval_tasks_periodic=50,
                                         log_every=50, checkpoint_every=0, loggers=[]))
ONLY = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None


def check(name):
    def wrap(fn):
        if ONLY is not None and not any(word in name for word in ONLY):
            return fn
        started = time.perf_counter()
        try:
            RESULTS[name] = fn()
            print(f"[ok]     {name}: {RESULTS[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
        except Exception as exc:  # every check runs, whatever the one before did
            RESULTS[name] = f"FAILED: {type(exc).__name__}: {exc}"
            print(f"[FAILED] {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=4)
        return fn
    return wrap


def trained_model() -> str:
    """final.pt of the local CUDA run, or of a short one made now (when that check did not run)."""
    path = f"{WORK}/local-cuda/final.pt"
    if not os.path.exists(path):
        rd.train(BASE.replace(meta_iters=50, device="cuda", eval_tasks=10), f"{WORK}/local-cuda", say=lambda _: None)
    return path


def steps_per_s(cfg, device: str, seconds: float = 8.0, warmup: int = 3) -> float:
    """Tasks/s of the local trainer's meta-step on `device`."""
    family = build_family(cfg)
    learner = make_learner(cfg, family, device)
    outer = OuterOptimizer.for_config(cfg, learner.initial_theta().cpu())
    tasks = range(cfg.meta_batch_size)
    for step in range(warmup):
        meta_step(learner, family, outer, cfg, step, tasks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started, step, adapted = time.perf_counter(), warmup, 0
    while time.perf_counter() - started < seconds:
        adapted += meta_step(learner, family, outer, cfg, step, tasks).tasks
        step += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return round(adapted / (time.perf_counter() - started), 1)


print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, {os.cpu_count()} CPUs", flush=True)


@check("local trainer, 300 meta-steps, device=cuda (tasks/s, test accuracy)")
def _():
    s = rd.train(BASE.replace(meta_iters=300, device="cuda"), f"{WORK}/local-cuda")
    return {"tasks_per_s": round(s["tasks_per_s"], 1), "test_accuracy": round(s["test_accuracy"], 4)}


@check("meta-step tasks/s: CPU 1 thread | CPU all threads | CUDA loop | CUDA batched (vmap), meta-batch 5")
def _():
    set_torch_threads(BASE.replace(torch_threads=1))
    one = steps_per_s(BASE, "cpu")
    torch.set_num_threads(os.cpu_count())
    every = steps_per_s(BASE, "cpu")
    return {"cpu_1_thread": one, "cpu_all_threads": every, "cuda_loop": steps_per_s(BASE, "cuda"),
            "cuda_batched": steps_per_s(BASE.replace(batched_adaptation=True), "cuda")}


@check("meta-step tasks/s on CUDA with meta-batch 25: loop | batched (vmap)")
def _():
    cfg = BASE.replace(meta_batch_size=25)
    return {"cuda_loop": steps_per_s(cfg, "cuda"), "cuda_batched": steps_per_s(cfg.replace(batched_adaptation=True), "cuda")}


@check("carried inner estimate: theta after 20 meta-steps, CPU vs CUDA (max |diff| / max |theta|)")
def _():
    cpu = rd.train(BASE.replace(meta_iters=20, device="cpu", eval_tasks=5), f"{WORK}/carried-cpu", say=lambda _: None)
    gpu = rd.train(BASE.replace(meta_iters=20, device="cuda", eval_tasks=5), f"{WORK}/carried-cuda", say=lambda _: None)
    a = torch.load(f"{WORK}/carried-cpu/final.pt", weights_only=True)
    b = torch.load(f"{WORK}/carried-cuda/final.pt", weights_only=True)
    ta = torch.cat([v.flatten() for v in a["model_state"].values()])
    tb = torch.cat([v.flatten() for v in b["model_state"].values()])
    ma, mb = a["inner_moment"]["sq"], b["inner_moment"]["sq"]
    return {"theta_rel_diff": float((ta - tb).abs().max() / ta.abs().max()),
            "moment_rel_diff": float((ma - mb).abs().max() / ma.abs().max()),
            "cpu_loss": round(cpu["test_loss"], 4), "cuda_loss": round(gpu["test_loss"], 4)}


@check("engine sync, W=1, gpus_per_worker=1, 300 meta-steps (tasks/s, worker devices)")
def _():
    s = rd.train(BASE.replace(backend="ray", mode="sync", workers=1, gpus_per_worker=1.0, meta_iters=300),
                 f"{WORK}/sync-gpu")
    return {"tasks_per_s": round(s["tasks_per_s"], 1), "worker_devices": s["worker_devices"],
            "test_accuracy": round(s["test_accuracy"], 4)}


@check("engine async, W=2 sharing the GPU (gpus_per_worker=0.5), 300 meta-steps")
def _():
    s = rd.train(BASE.replace(backend="ray", mode="async", workers=2, gpus_per_worker=0.5, meta_iters=300),
                 f"{WORK}/async-gpu")
    return {"tasks_per_s": round(s["tasks_per_s"], 1), "worker_devices": s["worker_devices"],
            "test_accuracy": round(s["test_accuracy"], 4)}


@check("all-reduce on NCCL, W=1, gpus_per_worker=1, 200 meta-steps")
def _():
    s = rd.train(BASE.replace(backend="ray", mode="allreduce", workers=1, gpus_per_worker=1.0, meta_iters=200),
                 f"{WORK}/allreduce-gpu")
    return {"tasks_per_s": round(s["tasks_per_s"], 1), "worker_devices": s["worker_devices"],
            "test_accuracy": round(s["test_accuracy"], 4)}


@check("eval of final.pt on 200 tasks: seconds on CPU | on CUDA (accuracy equal?)")
def _():
    path = trained_model()
    t0 = time.perf_counter()
    cpu = rd.evaluate(path, 200, device="cpu")
    t1 = time.perf_counter()
    gpu = rd.evaluate(path, 200, device="cuda")
    t2 = time.perf_counter()
    return {"cpu_s": round(t1 - t0, 1), "cuda_s": round(t2 - t1, 1), "cpu_accuracy": round(cpu["accuracy"], 4),
            "cuda_accuracy": round(gpu["accuracy"], 4)}


@check("adapt on CUDA: a loaded model adapted to one task, its device")
def _():
    net = rd.load_model(trained_model(), device="cuda")
    family = build_family(BASE)
    task = family.eval_task(np.random.default_rng(0), "test")
    adapted = rd.adapt(net, task.support_x, task.support_y)
    out = rd.predict(adapted, task.support_x, task.query_x)
    return {"device": str(next(adapted.parameters()).device),
            "accuracy": float((out.argmax(1).cpu() == task.query_y).float().mean())}


print("SUMMARY " + json.dumps(RESULTS, default=str))
sys.exit(1 if any(isinstance(v, str) and v.startswith("FAILED") for v in RESULTS.values()) else 0)
