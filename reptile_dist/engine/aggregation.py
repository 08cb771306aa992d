"""How the parameter server turns deltas into updates of theta. Pure logic, no Ray: the actor in
`parameter_server.py` only adds waiting and transport.

sync:  a barrier per meta-step. Deltas for version v are summed until every task of the step has
       arrived, then theta <- outer(theta, sum / tasks, eps(v)) and v -> v + 1; this is exactly the
       local trainer's update.
async: a delta is applied on arrival. Its staleness s = current version - version it started from;
       deltas with s > staleness_bound are dropped, the rest weighted by 1 (none) or 1/(1+s)
       (inverse) and scaled by tasks/meta_batch_size, so a meta-batch's worth of fresh pushes
       moves theta as far as one synchronous meta-step. eps follows applied tasks, not wall time.
Either way a delta holding NaN or Inf never touches theta: it is rejected, counted, and its
sender named. With `inner_state: carried` a push also carries the sum of its tasks' final inner
second-moment estimates: sync mode makes their mean over the step the next estimate (as the local
trainer does), async mode takes the mean of each applied push.
"""
from __future__ import annotations

import functools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reptile_dist.config import Config
from reptile_dist.reptile import DeltaSum, OuterOptimizer


def apply_async_push(outer: OuterOptimizer, cfg: Config, total: DeltaSum, progress: float,
                     weight: float = 1.0) -> float:
    """An async push's update of `outer`'s theta, with `progress` meta-steps done: eps(progress) *
    weight * sum / meta_batch_size, which is eps * weight * (tasks / meta_batch_size) * mean, so a
    meta-batch's worth of fresh pushes moves theta as far as one synchronous meta-step. The PS's
    update, and a prefetching worker's look-ahead at its own push (adapt_worker.py). Returns eps."""
    step_size = cfg.meta_step_size_at(progress)
    outer.apply_sum(total, step_size * weight, per=cfg.meta_batch_size)
    return step_size


@dataclass
class Push:
    worker: int
    version: int
    tasks: int
    total: DeltaSum | None  # the push's tasks' summed deltas (engine/wire.py decodes it); None: the worker rejected it


@dataclass
class Counters:
    pushes: int = 0
    applied_tasks: int = 0
    dropped_stale: int = 0
    rejected_nonfinite: int = 0
    rejected_by_worker: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    rejected_in_a_row: int = 0  # meta-steps (sync) or pushes (async) in a row with nothing applied

    def as_dict(self) -> dict[str, Any]:
        return {"pushes": self.pushes, "applied_tasks": self.applied_tasks, "dropped_stale": self.dropped_stale,
                "rejected_nonfinite": self.rejected_nonfinite,
                "rejected_by_worker": dict(self.rejected_by_worker), "staleness": dict(self.staleness)}


class Aggregator:
    """theta, its version and the outer optimizer; `push` returns a log row when theta moved."""

    def __init__(self, cfg: Config, theta: np.ndarray, outer_state: dict | None = None, version: int = 0,
                 applied_tasks: int = 0):
        self.cfg = cfg
        self.outer = OuterOptimizer.for_config(cfg, torch.from_numpy(np.array(theta, dtype=np.float32)))
        if outer_state is not None:
            self.outer.load_state_dict(outer_state)
        self.version = version
        self.counters = Counters(applied_tasks=applied_tasks)
        self.messages: list[str] = []
        self._pending: list[Push] = []
        self._pending_tasks = 0
        self._pushed: set[int] = set()  # workers heard from at this version (a replacement may push again)

    @property
    def theta(self) -> np.ndarray:
        return self.outer.theta.numpy()

    @property
    def progress(self) -> float:
        """Meta-steps done: the version in sync mode, applied tasks / meta_batch_size in async."""
        if self.cfg.mode == "async":
            return self.counters.applied_tasks / self.cfg.meta_batch_size
        return float(self.version)

    @property
    def done(self) -> bool:
        return self.progress >= self.cfg.meta_iters

    def _finite(self, push: Push) -> bool:
        if push.total is not None and push.total.finite:
            return True
        self.counters.rejected_nonfinite += 1
        self.counters.rejected_by_worker[push.worker] += 1
        self.messages.append(f"rejected a non-finite delta from worker {push.worker} (version {push.version})")
        return False

    def push(self, p: Push) -> dict[str, Any] | None:
        self.counters.pushes += 1
        if self.cfg.mode == "async":
            return self._push_async(p)
        return self._push_sync(p)

    def _push_sync(self, p: Push) -> dict[str, Any] | None:
        if p.version != self.version or p.worker in self._pushed:
            self.messages.append(f"ignored a delta for version {p.version} from worker {p.worker} (at {self.version})")
            return None
        self._pushed.add(p.worker)
        self._pending_tasks += p.tasks
        if self._finite(p):
            self._pending.append(p)
        if self._pending_tasks < self.cfg.meta_batch_size:
            return None
        return self.complete_step()

    def complete_step(self) -> dict[str, Any]:
        """Apply the finite deltas that arrived for this version and release the next one."""
        arrived, self._pending, self._pending_tasks = self._pending, [], 0
        self._pushed = set()
        tasks = sum(p.tasks for p in arrived)
        step_size = self.cfg.meta_step_size_at(self.version)
        row = {"step": self.version + 1, "meta_step_size": step_size, "tasks": tasks}
        if tasks:
            total = functools.reduce(operator.add, (p.total for p in arrived))
            self.outer.apply_sum(total, step_size)
            self.counters.applied_tasks += tasks
            self.counters.staleness[0] += len(arrived)
            self.counters.rejected_in_a_row = 0
            row.update(train_loss=total.loss_sum / tasks, train_accuracy=total.accuracy_sum / tasks, staleness=0.0)
        else:
            self.counters.rejected_in_a_row += 1
        self.version += 1
        return row

    def _push_async(self, p: Push) -> dict[str, Any] | None:
        # A prefetching worker names the version its own previous push was to make (adapt_worker.py);
        # should that push not have been applied after all, the version named is one ahead: never
        # count that as fresher than fresh.
        staleness = max(0, self.version - p.version)
        if staleness > self.cfg.staleness_bound:
            self.counters.dropped_stale += 1
            return None
        if not self._finite(p):
            self.counters.rejected_in_a_row += 1
            return None
        weight = 1.0 if self.cfg.staleness_weighting == "none" else 1.0 / (1.0 + staleness)
        step_size = apply_async_push(self.outer, self.cfg, p.total, self.progress, weight)
        self.counters.applied_tasks += p.tasks
        self.counters.staleness[staleness] += 1
        self.counters.rejected_in_a_row = 0
        self.version += 1
        return {"step": self.progress, "meta_step_size": step_size, "tasks": p.tasks,
                "train_loss": p.total.loss_sum / p.tasks, "train_accuracy": p.total.accuracy_sum / p.tasks,
                "staleness": float(staleness)}

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to restore this aggregator exactly."""
        return {"outer": self.outer.state_dict(), "version": self.version, "applied_tasks": self.counters.applied_tasks}
