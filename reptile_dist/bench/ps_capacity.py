"""How many deltas one parameter server absorbs per second, against model size and the deltas'
precision on the wire.

Pushers stand in for adapt workers that take no time to adapt: each pushes a ready-made delta
and takes the next theta, as fast as the PS lets it, in the worker's own pattern (one
ParameterServer.push_pull call per delta, theta in its answer). The PS is the engine's, in async mode (every
push a new version, so every answer a fresh copy of theta), with no staleness bound,
so every delta is applied.

Beside each figure, the same pushers feed a bare actor (`BareServer`): Ray's floor for the same
traffic, one call per delta with the same bytes in and out and nothing but the add. The engine's
PS divided by it is what the PS's own code (lock, order, counters, the outer update, metrics)
costs end to end, with Ray's transport and the machine factored out, since both run minutes apart
on the same machine.
"""
from __future__ import annotations

import math
import warnings
import time
from typing import Any

import numpy as np
import ray
import torch

from reptile_dist.bench.runner import load_1m, wait_for_pushes, window_figures
from reptile_dist.config import Config
from reptile_dist.engine.parameter_server import PS_CPUS, ParameterServer, concurrency
from reptile_dist.engine.wire import DeltaCodec, WireSum
from reptile_dist.training import set_torch_threads
from reptile_dist.reptile import DeltaSum


class Pusher:
    """Pull theta, push the same delta again; until the PS stops."""

    def __init__(self, index: int, payload: WireSum):
        self.index = index
        self.payload = payload
        self.pushes: list[tuple[float, float, int, int]] = []

    def run(self, ps) -> int:
        count = 0
        got = ray.get(ps.pull.remote(-1))
        while got is not None:
            theta, _ = got[0]  # (theta, carried inner estimate)
            sent_wall, sent = time.time(), time.perf_counter()
            got = ray.get(ps.push_pull.remote(self.index, got[1], 1, self.payload, -1))
            if got is not None:
                self.pushes.append((sent_wall, time.perf_counter() - sent - got[3], self.payload.nbytes, theta.nbytes))
            count += 1
        return count

    def push_log(self) -> list[tuple[float, float, int, int]]:
        return list(self.pushes)


class BareServer:
    """The least a Ray actor can do with the PS's traffic: take the delta as it comes off the wire,
    add it to theta (float32) and answer a copy of theta, as `ParameterServer.push_pull` answers.
    No lock, no counters but the ones `drain` needs, no finite check, no float64 sum."""

    def __init__(self, theta: np.ndarray, dtype: str):
        set_torch_threads(Config(), cpus=PS_CPUS)
        self.theta = torch.from_numpy(theta.copy())
        self.bfloat16 = dtype == "bfloat16"
        self.pushes = 0
        self.version = 0
        self.stopped = False
        self.started = time.perf_counter()

    def pull(self, after_version: int = -1):
        return None if self.stopped else [(self.theta.numpy().copy(), None), self.version, float(self.version)]

    def push_pull(self, worker: int, version: int, tasks: int, payload: WireSum, after_version: int = -1):
        if self.stopped:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's warning about read-only arrays, as DeltaCodec.decode
            vector = torch.from_numpy(payload.vector)
        # to theta's float32 first: an add_ that casts as it goes is several times slower at 10M
        self.theta.add_((vector.view(torch.bfloat16) if self.bfloat16 else vector).to(torch.float32), alpha=1e-3)
        self.pushes += 1
        self.version += 1
        got = self.pull()
        return None if got is None else [*got, 0.0]

    def drain(self) -> dict[str, Any]:
        return {"counters": {"pushes": self.pushes, "applied_tasks": self.pushes, "dropped_stale": 0, "staleness": {}},
                "progress": float(self.version), "busy_s": 0.0, "uptime_s": time.perf_counter() - self.started}

    def stop(self) -> None:
        self.stopped = True


def measure_capacity(params: int, dtype: str, pushers: int, seconds: float, warmup: float,
                     bare: bool = False, threads: int | None = None) -> dict[str, Any]:
    """The engine's PS (or, `bare`, a BareServer) fed by `pushers` pushers for `seconds` after
    `warmup`; `threads`: the server's max_concurrency instead of the engine's for an async PS (1,
    a plain actor), to measure Ray's thread pool side by side."""
    cfg = Config(backend="ray", mode="async", workers=pushers, meta_iters=10**12, staleness_bound=10**9,
                 delta_dtype=dtype, eval_every=0, checkpoint_every=0)
    delta = torch.randn(params, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-4
    payload = DeltaCodec(params, False, dtype).encode(DeltaSum(delta, 1, 0.0, 0.0))
    theta = np.zeros(params, dtype=np.float32)
    server = ray.remote(BareServer) if bare else ray.remote(ParameterServer)
    server = server.options(num_cpus=PS_CPUS, max_concurrency=threads or concurrency(cfg))
    ps = server.remote(theta, dtype) if bare else server.remote(cfg.to_dict(), theta)
    senders = [ray.remote(Pusher).options(num_cpus=0.5, max_concurrency=2).remote(i, payload) for i in range(pushers)]
    try:
        load_before = load_1m()
        runs = [s.run.remote(ps) for s in senders]
        wait_for_pushes(ps, runs, pushers)
        time.sleep(warmup)
        first, wall0 = ray.get(ps.drain.remote()), time.time()
        time.sleep(seconds)
        last, wall1 = ray.get(ps.drain.remote()), time.time()
        ray.get(ps.stop.remote())
        ray.get(runs)
        logs = ray.get([s.push_log.remote() for s in senders])
    finally:
        for actor in (ps, *senders):
            ray.kill(actor)
    window = window_figures(first, last, [e for log in logs for e in log if wall0 <= e[0] < wall1])
    if bare:
        return {"pushes_per_s": window["pushes_per_s"], "push_latency_median_ms": window["push_latency_median_ms"],
                "load_1m": max(load_before, load_1m())}
    busy_per_push = (last["busy_s"] - first["busy_s"]) / max(last["counters"]["pushes"] - first["counters"]["pushes"], 1)
    return {
        "params": params, "delta_dtype": dtype, "delta_mb": payload.nbytes / 1e6, "pushers": pushers,
        "pushes_per_s": window["pushes_per_s"],
        # What the push handler alone (decode, sum in float64, apply) could take, Ray's transport aside.
        "handler_pushes_per_s": 1.0 / busy_per_push if busy_per_push > 0 else math.nan,
        "ps_busy_fraction": window["ps_busy_fraction"],
        "push_latency_median_ms": window["push_latency_median_ms"],
        "push_latency_p95_ms": window["push_latency_p95_ms"],
        "mb_per_s": window["mb_per_s"], "window_s": window["window_s"], "load_1m": max(load_before, load_1m()),
    }


def capacity_sweep(params: list[int], dtypes: list[str], pushers: list[int], seconds: float, warmup: float,
                   say=print) -> list[dict[str, Any]]:
    rows = []
    for n in params:
        for dtype in dtypes:
            for p in pushers:
                row = measure_capacity(n, dtype, p, seconds, warmup)
                floor = measure_capacity(n, dtype, p, seconds, warmup, bare=True)
                row["bare_actor_pushes_per_s"] = floor["pushes_per_s"]
                row["of_bare_actor"] = row["pushes_per_s"] / floor["pushes_per_s"] if floor["pushes_per_s"] > 0 else math.nan
                row["bare_actor_load_1m"] = floor["load_1m"]
                say(f"PS capacity  {n:>10,} params  {dtype:8}  {p} pushers: {row['pushes_per_s']:7.1f} pushes/s  "
                    f"(bare actor {floor['pushes_per_s']:7.1f}/s, handler alone {row['handler_pushes_per_s']:7.1f}/s, "
                    f"busy {row['ps_busy_fraction']:.2f}, load {row['load_1m']:.1f})")
                rows.append(row)
    return rows
