"""The bench's single-process baselines: the local trainer against a plain Reptile loop written as
the reference code and learn2learn's example write it, and the local trainer's threads with and
without a busy process beside it.

    plain loop:  for each task: a deepcopy of the model, a fresh Adam (beta1 = 0), k inner steps;
                 theta += eps * (mean of the adapted weights - theta)

Both draw the same tasks (task_rng) and mini-batches (reptile.mini_batches), so the difference is
the trainer's own overhead: the flat theta, the float64 sums, the carried estimate's copies.
"""
from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from reptile_dist.bench.runner import measure_local
from reptile_dist.config import Config
from reptile_dist.reptile import inner_optimizer, mini_batches
from reptile_dist.tasks import TaskFamily
from reptile_dist.tasks.base import TRAIN_STREAM, task_rng
from reptile_dist.training import make_learner

BUSY_LOOP = "while True: pass"


@contextmanager
def busy_process() -> Iterator[None]:
    """One process spinning on a core for as long as the block runs (a second training beside this one)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_plain_loop(cfg: Config, family: TaskFamily, seconds: float, warmup: float) -> float:
    """Tasks/s of the plain loop (in this process, at its current torch threads)."""
    model = make_learner(cfg, family).model
    loss_of = (torch.nn.functional.cross_entropy if family.kind == "classification"
               else torch.nn.functional.mse_loss)

    def meta_step(step: int) -> int:
        sums = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(cfg.meta_batch_size):
            rng = task_rng(cfg.seed, TRAIN_STREAM, step, i)
            task = family.train_task(rng)
            clone = copy.deepcopy(model)
            opt = inner_optimizer(cfg.inner_optimizer, clone.parameters(), cfg.inner_lr)
            for batch in mini_batches(len(task.support_x), cfg.inner_batch_size, cfg.inner_steps,
                                      cfg.inner_replacement, rng):
                index = torch.from_numpy(batch)
                loss = loss_of(clone(task.support_x[index]), task.support_y[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for total, p in zip(sums, clone.parameters()):
                    total += p
        eps = cfg.meta_step_size_at(step)
        with torch.no_grad():
            for total, p in zip(sums, model.parameters()):
                p += eps * (total / cfg.meta_batch_size - p)
        return cfg.meta_batch_size

    step, warm_until = 0, time.perf_counter() + warmup
    while step == 0 or time.perf_counter() < warm_until:
        meta_step(step)
        step += 1
    started, adapted = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        adapted += meta_step(step)
        step += 1
    return adapted / (time.perf_counter() - started)


LOCAL_ROUNDS = 3  # rounds of the trainer-against-plain-loop rows, each variant once per round


def local_baselines(cfg: Config, family: TaskFamily, seconds: float, warmup: float,
                    rounds: int = LOCAL_ROUNDS) -> list[dict[str, Any]]:
    """Side by side in one run: the local trainer (fresh and as configured) and the plain loop at
    one thread and at every core; then the local trainer at its default threads and at torch's
    own default with a busy process beside it.

    The variants at one thread count take turns: `rounds` rounds of `seconds / rounds` each,
    the order rotated every round, so a drift of the machine's speed (this VM's moves by more than
    the differences measured) falls on every variant alike. A row's tasks/s is the mean of its
    rounds, its "vs plain loop" the median of the ratios to the plain loop's window in the same round,
    with their least and greatest beside it."""
    cores = os.cpu_count() or 1
    fresh = cfg.replace(inner_state="fresh")  # the plain loop has no carried estimate
    rows = []

    def row(what: str, threads: int, busy: bool, tasks_per_s: float, **extra: Any) -> None:
        rows.append({"what": what, "threads": threads, "busy_process_beside": busy, "tasks_per_s": tasks_per_s,
                     "load_1m": os.getloadavg()[0], **extra})

    plain_loop = "plain loop (deepcopy per task, fresh Adam)"
    for threads in sorted({1, cores}):
        with torch_threads(threads):
            one = cfg.replace(torch_threads=threads, cpus_per_worker=threads)
            one_fresh = fresh.replace(torch_threads=threads, cpus_per_worker=threads)
            variants = [
                (f"local trainer ({cfg.inner_state} inner state)", lambda s, w: measure_local(one, family, s, w)),
                ("local trainer (fresh inner state)", lambda s, w: measure_local(one_fresh, family, s, w)),
                (plain_loop, lambda s, w: measure_plain_loop(fresh, family, s, w)),
            ]
            if cfg.inner_state == "fresh":  # the configured trainer is the fresh one already
                del variants[1]
            rates: dict[str, list[float]] = {name: [] for name, _ in variants}
            for k in range(rounds):
                for name, measure in variants[k % len(variants):] + variants[:k % len(variants)]:
                    rates[name].append(measure(seconds / rounds, warmup if k == 0 else min(warmup, 1.0)))
            for name, _ in variants:
                ratios = sorted(a / b for a, b in zip(rates[name], rates[plain_loop]))
                row(name, threads, False, sum(rates[name]) / rounds, round_tasks_per_s=rates[name],
                    vs_plain_loop=statistics.median(ratios), vs_plain_loop_min=ratios[0], vs_plain_loop_max=ratios[-1])
    with busy_process():
        for what, threads in (("local trainer, default threads (torch_threads: 0)", 0),
                              ("local trainer, torch's own default (every core)", cores)):
            c = cfg.replace(torch_threads=threads, cpus_per_worker=1)
            row(what, threads or 1, True, measure_local(c, family, seconds, warmup),
                round_tasks_per_s=None, vs_plain_loop=None, vs_plain_loop_min=None, vs_plain_loop_max=None)
    return rows
