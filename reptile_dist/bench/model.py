"""The scaling model: how many adapt workers one parameter server can feed.

Every push costs the PS a fixed amount of work (decode, float64 sum, apply, one object-store
copy of theta for the next pull), so a PS absorbs at most C pushes/s, C measured against model
size and wire precision (ps_capacity.py). W workers, each adapting r tasks/s, ask for

    async:  W * r / k  pushes/s,  k = tasks per push (tasks_per_push, default B)
    sync:   min(W, B) pushes per meta-step, at r / ceil(B / W) meta-steps/s (the busiest worker)

with B = meta_batch_size. The largest W whose demand stays within C is the limit; beyond it,
tasks/s stay at C * k (async) and extra workers only add staleness. Sync has a second limit of
its own: a meta-step has B tasks, so workers past B sit idle.
"""
from __future__ import annotations

import math

import numpy as np

def tasks_per_push(mode: str, workers: int, meta_batch_size: int, configured: int = 0) -> int:
    """Tasks the busiest worker sums into one push (adapt_worker.worker_share): async, `configured`
    or else the meta-batch (Config.async_tasks_per_push); sync, its share of the meta-step."""
    if mode == "async":
        return configured or meta_batch_size
    return math.ceil(meta_batch_size / workers)


def push_demand(worker_tasks_per_s: float, workers: int, mode: str, meta_batch_size: int, configured: int = 0) -> float:
    """Pushes/s that `workers` workers send when the PS keeps up."""
    k = tasks_per_push(mode, workers, meta_batch_size, configured)
    if mode == "sync":
        return min(workers, meta_batch_size) * worker_tasks_per_s / k
    return workers * worker_tasks_per_s / k


def max_workers(capacity: float, worker_tasks_per_s: float, mode: str, meta_batch_size: int, configured: int = 0) -> int:
    """The largest worker count whose push demand one PS absorbs (sync: at most meta_batch_size).
    Demand grows with the worker count in both modes."""
    if mode == "async":  # k does not depend on W: W * r / k <= C
        return math.floor(capacity * tasks_per_push(mode, 1, meta_batch_size, configured) / worker_tasks_per_s)
    best = 0
    for w in range(1, meta_batch_size + 1):
        if push_demand(worker_tasks_per_s, w, mode, meta_batch_size, configured) > capacity:
            break
        best = w
    return best


def capacity_at(params: int, sizes: list[int], pushes_per_s: list[float]) -> float:
    """C at `params`, interpolated log-log between measured model sizes (held flat outside them)."""
    order = np.argsort(sizes)
    x = np.log(np.asarray(sizes, dtype=float)[order])
    y = np.log(np.asarray(pushes_per_s, dtype=float)[order])
    return float(np.exp(np.interp(math.log(params), x, y)))
