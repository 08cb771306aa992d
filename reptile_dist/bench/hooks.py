"""The bench's own hooks in the engine's loops (training.LoopHooks): a straggler, and a timed window
for the all-reduce. A training run never carries them: they are not configuration."""
from __future__ import annotations

import time
from typing import Any

from reptile_dist.training import LoopHooks


class Straggler(LoopHooks):
    """Worker `worker` sleeps (factor - 1) x its adapt time after every adaptation, so it is
    `factor` times slower, as a slower device would be."""

    def __init__(self, worker: int, factor: float):
        self.worker = worker
        self.factor = factor

    def after_adapt(self, worker: int, adapt_s: float) -> None:
        if worker == self.worker:
            time.sleep((self.factor - 1) * adapt_s)


class TimedWindow(LoopHooks):
    """Rank 0 keeps the clock: training ends `seconds` after the first meta-step (which pays torch's
    lazy initialisation) instead of at meta_iters, and `result()` is the timeline: (end, all-reduce
    seconds) of every meta-step, perf_counter seconds from the first adaptation. Other ranks only
    vote with rank 0 through the all-reduce. `inner`: another hook (a straggler) to run as well."""

    def __init__(self, seconds: float, inner: LoopHooks | None = None):
        self.seconds = seconds
        self.inner = inner or LoopHooks()
        self.timeline: list[tuple[float, float]] = []
        self.started: float | None = None
        self.rank0 = False

    def after_adapt(self, worker: int, adapt_s: float) -> None:
        self.rank0 = worker == 0
        if self.started is None:
            self.started = time.perf_counter() - adapt_s
        self.inner.after_adapt(worker, adapt_s)

    def should_stop(self) -> bool:
        return (self.rank0 and bool(self.timeline)
                and time.perf_counter() - self.started >= self.timeline[0][0] + self.seconds)

    def after_step(self, combine_s: float) -> None:
        self.timeline.append((time.perf_counter() - self.started, combine_s))

    def result(self) -> Any:
        return self.timeline
