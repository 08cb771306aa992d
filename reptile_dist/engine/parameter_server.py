"""The ParameterServer actor: holds theta (flat float32 numpy) and the outer optimizer, and serves
pulls and pushes for the adapt workers.

In sync mode a threaded actor (Ray runs its calls on a pool of `concurrency(cfg)` threads), so a
pull can wait for the barrier on its own thread without blocking pushes; one condition variable
guards the aggregator and wakes the waiting pulls. Threads rather than asyncio: a push holds the
GIL for its whole (short) handler either way, the code is plain blocking Python, and side by side
it absorbed as many deltas/s as the asyncio actor it replaced. In async mode no call waits (a pull
answers with the theta at hand, and Ray runs one caller's calls to a plain actor in the order
sent, which is the order `push` applies them in anyway), so there it is a plain actor, one call at
a time: side by side, the plain actor absorbed 1.11-1.21x the deltas of the threaded one at 100k
parameters (README "Parameter-server capacity"). Its figures go to Ray's metrics API as they
change (engine/metrics.py).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from reptile_dist.config import Config
from reptile_dist.engine.aggregation import Aggregator, Push
from reptile_dist.engine.metrics import ParameterServerMetrics
from reptile_dist.engine.wire import DeltaCodec, WireSum
from reptile_dist.training import Cadence, set_torch_threads

PS_CPUS = 0.5  # the parameter server's share of bundle 0 (the evaluator has the other half)
# How long a push waits for the pushes sent before it from the same worker loop (`push`'s `sent`);
# past it, it is applied anyway, with a message: an earlier push that never arrives must not stall
# the run. On the async PS (a plain actor, which runs each caller's calls in the order sent) the
# wait is a safety net that no call can end early: it holds the only thread for the whole timeout.
IN_ORDER_TIMEOUT_S = 5.0


def concurrency(cfg: Config) -> int:
    """Ray's max_concurrency for the run's PS. Sync: threads for a call in flight from each of
    cfg.workers, as many again from replaced workers whose last call still waits for the next
    version, and the driver's own calls (drain, state, complete_step, stop). Async: 1, a plain actor
    (no call waits)."""
    return 1 if cfg.mode == "async" else 4 * cfg.workers + 8


class ParameterServer:
    def __init__(self, cfg: dict, theta: np.ndarray, outer_state: dict | None = None, version: int = 0,
                 applied_tasks: int = 0):
        self.cfg = Config(**cfg)
        # Its work is element-wise over theta: one thread, as its half-CPU share asks; more would
        # spin against the workers for the same cores.
        set_torch_threads(self.cfg, cpus=PS_CPUS)
        self.agg = Aggregator(self.cfg, theta, outer_state, version, applied_tasks)
        self.codec = DeltaCodec(len(theta), self.cfg.carries_inner_moment, self.cfg.wire_dtype)
        self.cadence = Cadence.of(self.cfg)
        self.rows: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.busy_s = 0.0
        self.stopped = False
        self.changed = threading.Condition()  # guards everything below and wakes the waiting pulls
        self._last_progress = self.agg.progress
        self._theta_copy, self._copy_version = None, -1  # theta as of _copy_version, never changed in place
        self._next_push: dict[str, int] = {}  # a worker loop's token -> the number of its next push to apply
        self.metrics = ParameterServerMetrics(self.agg.counters)

    def pull(self, after_version: int = -1):
        """[(theta, carried inner estimate as `InnerMoment.as_numpy` or None), version, meta-steps done]
        once the version is past `after_version`; None when the run is over.

        theta travels in the answer itself rather than as a reference to an object put once per
        version, so the caller has it in the same round trip instead of fetching it with a second
        request. It is a copy, made once per version, because the next update changes theta in
        place; the estimate is replaced, never changed in place, by each update."""
        with self.changed:
            self.changed.wait_for(lambda: self.agg.version > after_version or self.agg.done or self.stopped)
            if self.agg.done or self.stopped:
                return None
            if self._copy_version != self.agg.version:  # one copy per version, whoever pulls it
                self._theta_copy, self._copy_version = self.agg.theta.copy(), self.agg.version
            moment = self.agg.outer.inner_moment
            return [(self._theta_copy, None if moment is None else moment.as_numpy()), self.agg.version,
                    self.agg.progress]

    def push_pull(self, worker: int, version: int, tasks: int, payload: WireSum | None,
                  after_version: int = -1, sent: tuple[str, int] | None = None):
        """A push, then the pull that follows it, in one call (a round trip less per meta-step than
        a push and a pull): `pull`'s answer with a fourth item, the seconds this call waited for the
        next version (the sync barrier), or None when the run is over."""
        self.push(worker, version, tasks, payload, sent)
        waited = time.perf_counter()
        got = self.pull(after_version)
        return None if got is None else [*got, time.perf_counter() - waited]

    def push(self, worker: int, version: int, tasks: int, payload: WireSum | None,
             sent: tuple[str, int] | None = None) -> None:
        """`payload`: the worker's DeltaSum as `DeltaCodec.encode` made it; None when the worker
        found it non-finite and sent only the count. `sent`: (the sending loop's token, this push's
        number in it, from 0), so that one loop's pushes are applied in the order sent: a
        prefetching worker has two on their way. Ray already runs them in that order on the async
        PS (a plain actor); this holds it on any actor with a thread pool, where either of the
        threads running them may take the lock first."""
        with self.changed:
            try:
                if sent is not None:
                    loop, number = sent
                    in_order = self.changed.wait_for(lambda: self._next_push.get(loop, 0) >= number or self.stopped,
                                                     timeout=IN_ORDER_TIMEOUT_S)
                    if not in_order:
                        self.agg.messages.append(f"applied push {number} of worker {worker} without the one before it, "
                                                 f"which had not arrived after {IN_ORDER_TIMEOUT_S:g} s")
                    self._next_push[loop] = max(self._next_push.get(loop, 0), number + 1)
                if self.agg.done or self.stopped:
                    return
                t0 = time.perf_counter()
                total = None if payload is None else self.codec.decode(payload)
                row = self.agg.push(Push(worker, version, tasks, total))
                if row is not None:
                    self._after_update(row)
                self.busy_s += time.perf_counter() - t0
                self.metrics.update(self.agg.counters, row, self.agg.progress, self.busy_fraction)
            finally:
                self.changed.notify_all()

    def complete_step(self) -> int:
        """Sync mode: apply what arrived for the current version without waiting for the rest
        (used when a worker died mid-step and the run is configured not to wait)."""
        with self.changed:
            row = self.agg.complete_step()
            self._after_update(row)
            self.metrics.update(self.agg.counters, row, self.agg.progress, self.busy_fraction)
            self.changed.notify_all()
            return self.agg.version

    def _after_update(self, row: dict[str, Any]) -> None:
        row["wall_s"] = time.perf_counter() - self.started
        self.rows.append(row)
        before, now = self._last_progress, self.agg.progress
        self._last_progress = now
        step = int(now)
        if self.cadence.checkpoint(before, now):
            self.snapshots.append({"kind": "checkpoint", "step": step, "state": self.agg.state()})
        if self.cadence.evaluate(before, now):
            self.snapshots.append({"kind": "eval", "step": step, "theta": self.agg.theta.copy(),
                                   "moment": self.agg.outer.inner_moment})

    def drain(self) -> dict[str, Any]:
        """Everything new since the last drain, for the driver to log and save."""
        with self.changed:
            rows, self.rows = self.rows, []
            snaps, self.snapshots = self.snapshots, []
            messages, self.agg.messages = self.agg.messages, []
            return {"rows": rows, "snapshots": snaps, "messages": messages, "version": self.agg.version,
                    "progress": self.agg.progress, "done": self.agg.done, "counters": self.agg.counters.as_dict(),
                    "rejected_in_a_row": self.agg.counters.rejected_in_a_row,
                    "busy_fraction": self.busy_fraction,
                    "busy_s": self.busy_s, "uptime_s": time.perf_counter() - self.started}

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / max(time.perf_counter() - self.started, 1e-9)

    def state(self) -> dict[str, Any]:
        with self.changed:
            return {**self.agg.state(), "theta": self.agg.theta.copy()}

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
