"""The bench's own hooks in the engine's loops (training.LoopHooks): a straggler, and a timed window
for the all-reduce. A training run never carries them: they are not configuration."""
from __future__ import annotations

import time
from typing import Any

from reptile_dist.engine.adapt_worker import actor_device, worker_share
from reptile_dist.plugins import build_family
from reptile_dist.reptile import OuterOptimizer, meta_step
from reptile_dist.training import LoopHooks, make_learner


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


class Interleaved(LoopHooks):
    """The engine and the local trainer in turns, in the adapt workers' own processes.

    Time is cut into phases of `phase_s` seconds on the wall clock (`time.time() // phase_s`, so
    every worker process on a node switches at the same moments without being told). In even
    phases the engine runs as it would. In odd ones the workers hold still after their next
    adaptation: worker 0 runs the local trainer's meta-step (`reptile.meta_step`, with a learner
    and outer optimizer of its own) on its own torch threads until the phase ends, the others wait.
    Each pair of phases, seconds apart, in one process, compares the engine with the local trainer
    as the bracketing windows in the driver cannot: this machine's speed drifts between minutes,
    and the driver is another process than the workers.

    A worker enters a phase only after its adaptation, so phases start late by up to one
    adaptation: GUARD_S seconds at the start of every phase are not measured, and a round in which
    a worker came to hold later than the local trainer's window began (an adaptation longer than
    the guard) is left out by `runner.interleaved_figures`. `result()`: the wall time at which this
    worker finished each adaptation in an even phase, with its tasks and the seconds it took; when
    it came to hold in each odd phase; and (worker 0) the local trainer's (phase, start, stop,
    tasks) windows. The local trainer's learner is built from the configuration's own plug-ins,
    seeded as a run's is (make_learner)."""

    GUARD_S = 0.5

    def __init__(self, cfg, phase_s: float):
        if phase_s <= 2 * self.GUARD_S:
            raise ValueError(f"an interleaved phase must be longer than {2 * self.GUARD_S:g} s, got {phase_s:g}")
        self.cfg = cfg
        self.phase_s = phase_s
        self.adapted: list[tuple[float, int, float]] = []
        self.held: list[tuple[int, float]] = []
        self.local_windows: list[tuple[int, float, float, int]] = []
        self._local = None  # [learner, family, outer, next step] of worker 0's local trainer, built on first use
        self._step_s = 0.0  # the local trainer's last meta-step, for the next phase's "does one more fit"

    def after_adapt(self, worker: int, adapt_s: float) -> None:
        if worker == 0 and self._local is None:  # in the warm-up: the first adaptation comes long before the window
            self._local = self._local_trainer()
        now = time.time()
        phase = int(now // self.phase_s)
        if phase % 2 == 0:
            self.adapted.append((now, len(worker_share(self.cfg, worker)), adapt_s))
            return
        self.held.append((phase, now))
        end = (phase + 1) * self.phase_s
        if worker == 0:
            self._run_local(phase, end)
        while (left := end - time.time()) > 0:  # back in the next phase, not a rounding short of it
            time.sleep(left)

    def _local_trainer(self) -> list:
        """[learner, family, outer optimizer, next step] on the device the worker adapts on, its
        first meta-step (which pays lazy initialisation) done."""
        family = build_family(self.cfg)
        learner = make_learner(self.cfg, family, actor_device())
        outer = OuterOptimizer.for_config(self.cfg, learner.initial_theta())
        meta_step(learner, family, outer, self.cfg, 0, range(self.cfg.meta_batch_size))  # its lazy first step
        t0 = time.perf_counter()
        meta_step(learner, family, outer, self.cfg, 1, range(self.cfg.meta_batch_size))
        self._step_s = time.perf_counter() - t0
        return [learner, family, outer, 2]

    def _run_local(self, phase: int, end: float) -> None:
        learner, family, outer, step = self._local
        time.sleep(max(0.0, phase * self.phase_s + self.GUARD_S - time.time()))  # the other workers settle
        tasks, start = 0, time.time()
        while time.time() + self._step_s < end:  # no meta-step that would run past the phase
            t0 = time.perf_counter()
            tasks += meta_step(learner, family, outer, self.cfg, step, range(self.cfg.meta_batch_size)).tasks
            self._step_s = time.perf_counter() - t0
            step += 1
        self._local[3] = step
        if tasks:
            self.local_windows.append((phase, start, time.time(), tasks))

    def result(self) -> Any:
        return {"adapted": self.adapted, "held": self.held, "local": self.local_windows}
