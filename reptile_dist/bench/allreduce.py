"""One all-reduce combination: the engine's own Ray Train worker loop (engine/allreduce.py), run for
a warm-up and a measured window instead of meta_iters.

Ray Train's start-up (controller, worker group, gloo: 13-40 s on 2 cores) and the evaluations
around training fall outside the window: rank 0 keeps the time each meta-step ended and how long
its all-reduce took, and every figure comes from the meta-steps that ended inside
[end of the first meta-step + warm-up, + seconds], as the parameter-server rows come from two
drains (runner.py). The columns that describe a parameter server get fixed values (no PS: busy 0,
staleness 0, nothing dropped); the push-latency columns hold the all-reduce's duration instead.
"""
from __future__ import annotations

import json
import math
import tempfile
from typing import Any

import numpy as np
import torch

from reptile_dist.bench.hooks import Straggler, TimedWindow
from reptile_dist.bench.runner import FIXED_TIME, load_1m
from reptile_dist.config import Config
from reptile_dist.engine import wire
from reptile_dist.engine.allreduce import TRAIN_STORAGE, make_trainer
from reptile_dist.training import setup_run

COUNTERS = len(wire.COUNTS) + 1  # float64 values sent after the vector: the counts and the stop vote (all_reduce_sum)


def measure_allreduce(cfg: Config, seconds: float, warmup: float, straggler: Straggler | None = None) -> dict[str, Any]:
    """Train with cfg.workers Ray Train workers for `warmup` + `seconds` after their first meta-step."""
    # One evaluation task before and after (worker_loop always evaluates; it is outside the window),
    # and no restarts: a failure should surface, not be measured.
    cfg = cfg.replace(**FIXED_TIME, mode="allreduce", eval_tasks=1, eval_tasks_periodic=1, max_failures=0)
    load_before = load_1m()
    # A timed run writes no checkpoints, so this folder only holds config.yaml and Ray Train's run state.
    with tempfile.TemporaryDirectory(prefix="reptile-bench-allreduce-") as folder:
        s = setup_run(cfg, folder, say=lambda message: None)
        trainer = make_trainer(cfg, s, s.run.path(TRAIN_STORAGE), progress=False,
                               hooks=TimedWindow(warmup + seconds, straggler))
        done = trainer.fit().return_value
    row = window_figures(done["hooks"], warmup, seconds, cfg.workers, cfg.meta_batch_size, s.outer.theta.numel(),
                         cfg.carries_inner_moment, cfg.wire_dtype)
    row.update(nodes=len({p["node_id"] for p in done["placements"]}),
               worker_nodes_off_ps=0,  # there is no parameter server to be off
               load_1m=max(load_before, load_1m()))
    return row


def window_figures(timeline: list[tuple[float, float]], warmup: float, seconds: float, workers: int,
                   meta_batch_size: int, params: int, carried: bool = False, dtype: str = "float64") -> dict[str, Any]:
    """Rates over the meta-steps that ended in the window; timeline: rank 0's (end s, all-reduce s) per meta-step."""
    start = timeline[0][0] + warmup
    end = min(start + seconds, timeline[-1][0])  # rank 0 stops the group at its first all-reduce after start + seconds
    inside = [(t, ar) for t, ar in timeline if start < t <= end]
    span = end - start
    steps = len(inside)
    latencies = np.array([ar for _, ar in inside]) if inside else np.array([math.nan])
    # Ring all-reduce (gloo): each worker sends 2(W-1)/W of the buffer per meta-step, so the group sends
    # 2(W-1) buffers. Modelled from the buffer size, not counted on the wire.
    # The vector (delta, and the carried estimates' sum) in the wire precision, then float64 counts.
    vector_bytes = params * (2 if carried else 1) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    buffer_bytes = vector_bytes + COUNTERS * 8
    return {
        "window_s": span,
        "tasks_per_s": steps * meta_batch_size / span,
        "meta_steps_per_s": steps / span,
        "pushes_per_s": steps * workers / span,  # every worker contributes one delta per meta-step
        "ps_busy_fraction": 0.0,  # no parameter server
        "allreduce_fraction": float(latencies.sum()) / span if inside else math.nan,
        "push_latency_median_ms": float(np.median(latencies)) * 1e3,  # the all-reduce, from rank 0
        "push_latency_p95_ms": float(np.percentile(latencies, 95)) * 1e3,
        "staleness_mean": 0.0,  # every worker adapts from the same theta of the same meta-step
        "staleness_max": 0,
        "staleness_histogram": json.dumps({0: steps * workers}),
        "dropped_deltas": 0,
        "dropped_fraction": 0.0,
        "mb_per_s": 2 * (workers - 1) * buffer_bytes * steps / span / 1e6,
    }
