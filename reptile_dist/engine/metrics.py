"""The engine's live figures through Ray's metrics API (`ray.util.metrics`), so the Ray dashboard
and a Prometheus/Grafana set-up scraping Ray's metrics endpoint show a run without reading files.
Prometheus sees them with Ray's `ray_` prefix, counters also with a `_total` suffix
(`ray_reptile_ps_pushes_total`); rates such as pushes/s are Prometheus's `rate()` of a counter.

    reptile_ps_pushes            counter    pushes received by the parameter server
    reptile_ps_applied_tasks     counter    tasks whose deltas were applied to theta
    reptile_ps_dropped_stale     counter    async pushes dropped past staleness_bound
    reptile_ps_rejected_deltas   counter    non-finite deltas rejected; tag worker (the sender's index)
    reptile_ps_staleness         histogram  staleness of each update applied (versions; 0 in sync mode)
    reptile_ps_busy_fraction     gauge      share of the parameter server's time spent applying pushes
    reptile_ps_meta_steps        gauge      meta-steps done (fractional in async mode)
    reptile_worker_tasks         counter    tasks adapted; tag worker
    reptile_worker_tasks_per_s   gauge      tasks/s of a worker between its last two pushes; tag worker
    reptile_workers_replaced     counter    dead adapt workers replaced by the driver
"""
from __future__ import annotations

import time
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

STALENESS_BOUNDARIES = [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5]  # staleness is a whole number of versions
_replaced: Counter | None = None


class ParameterServerMetrics:
    """`update` after every push adds what the aggregator's counters gained since the last call."""

    def __init__(self, counters: Any):
        self.pushes = Counter("reptile_ps_pushes", "pushes received by the parameter server")
        self.applied_tasks = Counter("reptile_ps_applied_tasks", "tasks whose deltas were applied to theta")
        self.dropped_stale = Counter("reptile_ps_dropped_stale", "async pushes dropped past staleness_bound")
        self.rejected = Counter("reptile_ps_rejected_deltas", "non-finite deltas rejected, by sending worker",
                                tag_keys=("worker",))
        self.staleness = Histogram("reptile_ps_staleness", "staleness of each update applied (versions)",
                                   boundaries=STALENESS_BOUNDARIES)
        self.busy_fraction = Gauge("reptile_ps_busy_fraction", "share of the parameter server's time spent on pushes")
        self.meta_steps = Gauge("reptile_ps_meta_steps", "meta-steps done (fractional in async mode)")
        self._seen = _snapshot(counters)  # a restored server's counters start from its checkpoint's

    def update(self, counters: Any, row: dict[str, Any] | None, meta_steps: float, busy_fraction: float) -> None:
        """`counters`: the aggregator's Counters; `row`: the update's log row (None: theta did not move)."""
        now = _snapshot(counters)
        for name in ("pushes", "applied_tasks", "dropped_stale"):
            gained = now[name] - self._seen[name]
            if gained > 0:
                getattr(self, name).inc(gained)
        for worker, count in now["rejected_by_worker"].items():
            gained = count - self._seen["rejected_by_worker"].get(worker, 0)
            if gained > 0:
                self.rejected.inc(gained, tags={"worker": str(worker)})
        self._seen = now
        if row is not None and "staleness" in row:
            self.staleness.observe(float(row["staleness"]))
        self.meta_steps.set(meta_steps)
        self.busy_fraction.set(busy_fraction)


class WorkerMetrics:
    """An adapt worker's tasks; `pushed(tasks)` with every push."""

    def __init__(self, index: int):
        self.tasks = Counter("reptile_worker_tasks", "tasks adapted by an adapt worker", tag_keys=("worker",))
        self.tasks_per_s = Gauge("reptile_worker_tasks_per_s", "tasks/s of an adapt worker between its last two pushes",
                                 tag_keys=("worker",))
        for metric in (self.tasks, self.tasks_per_s):
            metric.set_default_tags({"worker": str(index)})
        self._last: float | None = None

    def pushed(self, tasks: int) -> None:
        now = time.perf_counter()
        if tasks <= 0:  # Ray's counters take positive increments only
            return
        self.tasks.inc(tasks)
        if self._last is not None and now > self._last:
            self.tasks_per_s.set(tasks / (now - self._last))
        self._last = now


def count_worker_replaced() -> None:
    """The driver replaced a dead adapt worker (created on first use: inside the driver's Ray session)."""
    global _replaced
    if _replaced is None:
        _replaced = Counter("reptile_workers_replaced", "dead adapt workers replaced by the driver")
    _replaced.inc()


def _snapshot(counters: Any) -> dict[str, Any]:
    return {"pushes": counters.pushes, "applied_tasks": counters.applied_tasks,
            "dropped_stale": counters.dropped_stale, "rejected_by_worker": dict(counters.rejected_by_worker)}
