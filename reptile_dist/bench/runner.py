"""One benchmark combination, and the local baseline.

A combination runs the engine's own actors (one ParameterServer, W AdaptWorkers, started by the
driver's own code, engine/actors.py) for a warm-up, then for a measured window of fixed length, after which the
bench stops the PS: no meta_iters, no evaluation, no checkpoints. Every figure is a difference
between two PS drains (or the workers' push logs) taken at the window's ends.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import ray
import torch

from reptile_dist.config import Config
from reptile_dist.bench.hooks import Interleaved
from reptile_dist.engine.actors import EngineActors
from reptile_dist.reptile import OuterOptimizer, meta_step
from reptile_dist.tasks import TaskFamily
from reptile_dist.training import LoopHooks, make_learner, set_torch_threads

# The PS never finishes on its own (the bench stops it) and has nothing to snapshot.
FIXED_TIME = dict(backend="ray", meta_iters=10**12, eval_every=0, checkpoint_every=0)


def load_1m() -> float:
    return os.getloadavg()[0]


def measure_local(cfg: Config, family: TaskFamily, seconds: float, warmup: float) -> float:
    """Tasks/s of the local trainer's meta-step (reptile.meta_step) in this process, with the torch
    threads of one adapt worker."""
    threads = set_torch_threads(cfg, cfg.cpus_per_worker)
    try:
        learner = make_learner(cfg, family)
        outer = OuterOptimizer.for_config(cfg, learner.initial_theta())
        tasks = range(cfg.meta_batch_size)
        step, warm_until = 0, time.perf_counter() + warmup
        while step == 0 or time.perf_counter() < warm_until:  # the first step pays torch's lazy imports
            meta_step(learner, family, outer, cfg, step, tasks)
            step += 1
        start, adapted = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            adapted += meta_step(learner, family, outer, cfg, step, tasks).tasks
            step += 1
        return adapted / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def measure_engine(cfg: Config, theta: np.ndarray, seconds: float, warmup: float,
                   hooks: LoopHooks | None = None) -> dict[str, Any]:
    """Run the PS and cfg.workers adapt workers, started as a run's driver starts them, for
    `warmup` + `seconds`; figures of the window. `hooks`: the workers' (a straggler)."""
    cfg = cfg.replace(**FIXED_TIME)
    engine = EngineActors(cfg, hooks)
    try:
        ps = engine.parameter_server(theta)
        workers = [engine.worker(w) for w in range(cfg.workers)]
        ray.get([w.where.remote() for w in workers])  # actors up, data loaded
        load_before = load_1m()
        runs = [w.run.remote(ps) for w in workers]
        wait_for_pushes(ps, runs, cfg.workers)
        time.sleep(warmup)
        first, wall0 = ray.get(ps.drain.remote()), time.time()
        time.sleep(seconds)
        last, wall1 = ray.get(ps.drain.remote()), time.time()
        ray.get(ps.stop.remote())
        ray.get(runs)  # re-raises a worker's error
        logs = ray.get([w.push_log.remote() for w in workers])
        nodes = engine.bundle_nodes()
    finally:
        engine.close()
    row = window_figures(first, last, [e for log in logs for e in log if wall0 <= e[0] < wall1])
    row.update(nodes=len(set(nodes)), worker_nodes_off_ps=sum(n != nodes[0] for n in nodes[1:]),
               load_1m=max(load_before, load_1m()))
    return row


def measure_interleaved(cfg: Config, theta: np.ndarray, phase_s: float, rounds: int, warmup: float) -> dict[str, Any]:
    """The engine (the PS and cfg.workers adapt workers) and the local trainer in turns, in the
    workers' own processes (bench.hooks.Interleaved): `rounds` pairs of phases of `phase_s`
    seconds after `warmup`; each pair's ratio engine tasks/s over W x local tasks/s."""
    cfg = cfg.replace(**FIXED_TIME)
    engine = EngineActors(cfg, Interleaved(cfg, phase_s))
    try:
        ps = engine.parameter_server(theta)
        workers = [engine.worker(w) for w in range(cfg.workers)]
        ray.get([w.where.remote() for w in workers])
        load_before = load_1m()
        runs = [w.run.remote(ps) for w in workers]
        wait_for_pushes(ps, runs, cfg.workers)
        time.sleep(warmup)
        first = math.ceil(time.time() / phase_s)
        first += first % 2  # an engine phase: even
        time.sleep(max(0.0, (first + 2 * rounds) * phase_s - time.time()))
        load_after = load_1m()
        ray.get(ps.stop.remote())
        reports = ray.get(runs)  # re-raises a worker's error
    finally:
        engine.close()
    row = interleaved_figures([r["hooks"] for r in reports], phase_s, first, rounds)
    row.update(phase_s=phase_s, guard_s=Interleaved.GUARD_S, load_1m=max(load_before, load_after))
    return row


def interleaved_figures(results: list[dict[str, Any]], phase_s: float, first: int, rounds: int) -> dict[str, Any]:
    """From each worker's Interleaved.result(): per round (engine phase first + 2r, local phase
    the one after it), the engine's tasks/s (each worker's whole cycles between its first and last
    adaptation past the guard, summed over workers) over W x the local trainer's. Rounds whose local
    window began before every worker held are left out (counted in rounds_late); a round without
    two adaptations of every worker in its engine phase, or without a local window, too. Rates are
    means over the rounds, ratios and shares medians, the pooled ratio the means' ratio."""
    guard, workers = Interleaved.GUARD_S, len(results)
    local = {phase: (tasks / (stop - start), start) for phase, start, stop, tasks in results[0]["local"]}
    late = set()  # odd phases in which a worker came to hold after the local window had begun
    for result in results:
        late |= {phase for phase, held in result["held"] if phase in local and held > local[phase][1]}
    local = {phase: rate for phase, (rate, _) in local.items() if phase not in late}
    engine_rates, local_rates, ratios, adapting, adapt_rates = [], [], [], [], []
    for r in range(rounds):
        phase = first + 2 * r
        lo, hi = phase * phase_s + guard, (phase + 1) * phase_s
        engine = _engine_phase(results, lo, hi)
        if engine is None or phase + 1 not in local:
            continue
        rate, spans, tasks, adapt_s = engine
        engine_rates.append(rate)
        local_rates.append(local[phase + 1])
        ratios.append(rate / (workers * local[phase + 1]))
        adapting.append(adapt_s / spans)
        adapt_rates.append(tasks / adapt_s / local[phase + 1])
    if not ratios:
        raise RuntimeError(f"no interleaved round could be measured: phases of {phase_s:g} s are too short for two "
                           f"adaptations of every worker, or a worker adapted nothing, or adapted past the "
                           f"{guard:g} s guard into every local phase ({len(late)} such)")
    return {
        "rounds": len(ratios), "rounds_asked": rounds,
        "rounds_late": len(late & {first + 2 * r + 1 for r in range(rounds)}),
        "engine_tasks_per_s": float(np.mean(engine_rates)),
        "local_tasks_per_s": float(np.mean(local_rates)),
        "efficiency_vs_local": float(np.median(ratios)), "efficiency_min": min(ratios), "efficiency_max": max(ratios),
        "efficiency_pooled": float(np.mean(engine_rates) / (workers * np.mean(local_rates))),
        # where the rest goes: the share of the workers' loop time spent adapting (the rest: the wire, the
        # PS's answer, the look-ahead's own update), and how fast the engine adapts against the local trainer's
        # whole meta-step (the other processes' work on the machine slows it, or not)
        "adapting_share": float(np.median(adapting)), "adapt_speed_vs_local": float(np.median(adapt_rates)),
    }


def _engine_phase(results: list[dict[str, Any]], lo: float, hi: float) -> tuple[float, float, int, float] | None:
    """The workers' adaptations that ended in [lo, hi): (tasks/s summed over the workers, their
    spans, tasks and adapting seconds), each worker's whole cycles between its first and last;
    None when a worker did not finish two adaptations there."""
    rate, spans, tasks, adapt_s = 0.0, 0.0, 0, 0.0
    for result in results:
        ends = [e for e in result["adapted"] if lo <= e[0] < hi]
        if len(ends) < 2:
            return None
        span, n = ends[-1][0] - ends[0][0], sum(e[1] for e in ends[1:])
        rate, spans, tasks, adapt_s = rate + n / span, spans + span, tasks + n, adapt_s + sum(e[2] for e in ends[1:])
    return rate, spans, tasks, adapt_s


def wait_for_pushes(ps, runs: list, count: int, timeout_s: float = 300.0) -> None:
    """Until `count` pushes have arrived: a process's first inner loop costs seconds of lazy
    initialisation in torch, which the warm-up should not have to cover."""
    deadline = time.monotonic() + timeout_s
    while ray.get(ps.drain.remote())["counters"]["pushes"] < count:
        done, _ = ray.wait(runs, timeout=0)
        if done:
            ray.get(done)  # a worker failed
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} pushes reached the parameter server in {timeout_s:.0f} s")
        time.sleep(0.1)


def window_figures(first: dict[str, Any], last: dict[str, Any], pushes: list[tuple[float, float, int, int]]) -> dict[str, Any]:
    """Rates between two PS drains; latency and bytes from the pushes sent in between
    (entries of AdaptWorker.push_log: wall time sent, latency s, bytes pushed, bytes pulled)."""
    span = last["uptime_s"] - first["uptime_s"]
    c0, c1 = first["counters"], last["counters"]
    pushed = c1["pushes"] - c0["pushes"]
    dropped = c1["dropped_stale"] - c0["dropped_stale"]
    histogram = Counter(c1["staleness"])
    histogram.subtract(c0["staleness"])
    histogram = {int(s): n for s, n in sorted(histogram.items()) if n > 0}
    applied = sum(histogram.values())
    latencies = np.array([p[1] for p in pushes]) if pushes else np.array([math.nan])
    return {
        "window_s": span,
        "tasks_per_s": (c1["applied_tasks"] - c0["applied_tasks"]) / span,
        "meta_steps_per_s": (last["progress"] - first["progress"]) / span,
        "pushes_per_s": pushed / span,
        "ps_busy_fraction": (last["busy_s"] - first["busy_s"]) / span,
        "allreduce_fraction": 0.0,  # no all-reduce: the PS aggregates (allreduce rows: bench/allreduce.py)
        "push_latency_median_ms": float(np.median(latencies)) * 1e3,
        "push_latency_p95_ms": float(np.percentile(latencies, 95)) * 1e3,
        "staleness_mean": sum(s * n for s, n in histogram.items()) / applied if applied else math.nan,
        "staleness_max": max(histogram, default=math.nan),
        "staleness_histogram": json.dumps(histogram),
        "dropped_deltas": dropped,
        "dropped_fraction": dropped / pushed if pushed else math.nan,
        "mb_per_s": sum(p[2] + p[3] for p in pushes) / span / 1e6,
    }
