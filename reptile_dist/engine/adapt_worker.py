"""AdaptWorker actors: each holds a model replica and a task family, and adapts its share of
the tasks. The Evaluator is the same workspace used only to score held-out tasks, so workers
never wait for evaluation."""
from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
import ray
import torch

from reptile_dist.config import Config
from reptile_dist.evaluation import TaskScores, score_tasks, summarize
from reptile_dist.reptile import DeltaSum, InnerMoment, OuterOptimizer, adapt_tasks, draw_tasks
from reptile_dist.plugins import Plugins, build_family
from reptile_dist.engine.aggregation import apply_async_push
from reptile_dist.engine.wire import DeltaCodec
from reptile_dist.training import LoopHooks, make_learner, set_torch_threads

PUSH_LOG_LENGTH = 100_000  # the newest pushes kept for push_log()
CRASH_FILE_ENV = "REPTILE_DIST_CRASH_FILE"  # fault injection for tests and drills: AdaptWorker._crash_if_planned


def worker_share(cfg: Config, index: int, repeat: int = 0) -> list[int]:
    """Task indices worker `index` adapts for each version it pulls.

    sync: task i of the meta-step goes to worker i mod W, so the meta-batch is the local
    trainer's whichever workers take it. async: `tasks_per_push` (default meta_batch_size)
    tasks of its own per push, indexed by worker, so two workers starting from one version
    draw different tasks; `repeat`: how many pushes this worker already made from that version
    (with `prefetch` it adapts the next tasks before the new version comes back), so those
    draw different tasks too."""
    if cfg.mode == "async":
        per_push = cfg.async_tasks_per_push
        first = (repeat * cfg.workers + index) * per_push
        return list(range(first, first + per_push))
    return list(range(index, cfg.meta_batch_size, cfg.workers))


def exact_look_ahead(cfg: Config) -> bool:
    """Whether a worker can adapt its next tasks while its push travels, from the theta the PS
    will answer with: when it is the only worker (its push is the whole update, in sync and in
    async mode alike) and the outer step is plain SGD (no optimizer state held only by the PS).
    Async with `prefetch` looks ahead its own way (AdaptWorker.run)."""
    return cfg.workers == 1 and cfg.outer_optimizer == "sgd" and not (cfg.mode == "async" and cfg.prefetch)


LOOK_AHEAD_MISSES = 2  # guesses wrong in a row after which a lone worker stops looking ahead


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _same_estimate(a: InnerMoment | None, b: InnerMoment | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.steps == b.steps and _same_bits(a.sq, b.sq)


def actor_device() -> str:
    """This process's device: its GPU when Ray assigned one (and torch sees it), else the CPU."""
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class Workspace:
    """A task family and a learner on this actor's device (its GPU when Ray assigned one)."""

    def __init__(self, cfg: dict, plugins: Plugins | None = None):
        self.cfg = Config(**cfg)
        set_torch_threads(self.cfg, self.cfg.cpus_per_worker)
        self.device = actor_device()
        plugins = plugins or Plugins.of(self.cfg)
        self.family = build_family(self.cfg, plugins)
        self.learner = make_learner(self.cfg, self.family, self.device, plugins)

    def score(self, theta: np.ndarray, split: str, start: int, stop: int, moment: InnerMoment | None = None,
              transductive: bool | None = None) -> TaskScores:
        return score_tasks(self.learner, self.family, torch.tensor(theta), self.cfg, split, range(start, stop), moment,
                           transductive)

    def evaluate(self, theta: np.ndarray, split: str, tasks: int, moment: InnerMoment | None = None) -> dict[str, float]:
        return summarize(self.score(theta, split, 0, tasks, moment))

    def where(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "device": self.device}


class AdaptWorker(Workspace):
    def __init__(self, cfg: dict, index: int, hooks: LoopHooks | None = None, plugins: Plugins | None = None):
        super().__init__(cfg, plugins)
        self.index = index
        self.hooks = hooks or LoopHooks()  # a benchmark's (a straggler); a run has none
        self.codec = DeltaCodec(self.learner.initial_theta().numel(), self.cfg.carries_inner_moment,
                                self.cfg.wire_dtype)
        self._poison = threading.Event()
        # run() may be called again while an old loop is still finishing (after the PS was
        # restored): the newest loop owns the learner, an older one stops at its next turn.
        self._loop = 0
        self._learner_lock = threading.Lock()
        self._pushes: deque[tuple[float, float, int, int]] = deque(maxlen=PUSH_LOG_LENGTH)
        from reptile_dist.engine.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(index)  # tasks and tasks/s through Ray's metrics API

    def run(self, ps) -> dict[str, Any]:
        """Pull theta, adapt this worker's share, push the summed delta and take the next theta in
        the same call (ParameterServer.push_pull); until the PS says done.

        While a push is on its way the worker does what it can without the answer:
        - alone (one worker, the SGD outer step, sync or async without `prefetch`): unless that
          push ends the run, it applies the push to the theta it has, exactly as the PS will
          (`exact_look_ahead`), and adapts the next tasks there. It sends them only once the
          answer shows the same theta (and inner estimate) at the next version; otherwise it
          adapts them again from the answer, with torch's random state put back as it was before
          the guess (a plug-in network's dropout draws from it), so the run is the one it would
          be without looking ahead, bit for bit. After LOOK_AHEAD_MISSES wrong guesses in a row
          it stops guessing.
        - async with `prefetch`: it applies its own push to the theta it has, as the PS will, and
          adapts its next tasks there; it takes the answer to a push only after sending the next
          one, and adds its newest push to that answer.
        - otherwise, sync: it draws the next step's tasks."""
        cfg = self.cfg
        self._loop += 1
        loop = self._loop
        adapted, busy, guessed_right, guessed_wrong, misses = 0, 0.0, 0, 0, 0
        prefetch = cfg.mode == "async" and cfg.prefetch
        exact = exact_look_ahead(cfg)
        in_flight = None  # prefetch: (the push whose answer is not taken yet, its sum as the PS decodes it)
        drawn = None  # sync: (version, the tasks of the share at it), drawn while the last push travelled
        # exact: (version, theta, estimate, the share's result there, torch's random state before it),
        # adapted while the push travelled
        ready = None
        last_version, repeat = -1, 0  # the version the worker adapted from last, and how often

        def after(version: int) -> int:  # the version the next theta must be past
            return -1 if cfg.mode == "async" else version

        token, pushes = f"{self.index}-{uuid.uuid4().hex[:8]}", 0  # this loop's pushes, in the order sent
        got = ray.get(ps.pull.remote(after(-1)))
        while loop == self._loop and got is not None:
            version, progress = got[1], got[2]
            pulled, carried = got[0]
            theta = torch.tensor(pulled)  # arrays Ray hands over are read-only: copy
            moment = InnerMoment.from_state(carried)
            if in_flight is not None:  # prefetch: start where the PS will be once the push on its way lands
                theta, moment, version = self._look_ahead(theta, moment, version, progress, in_flight[1])
            repeat = repeat + 1 if version == last_version else 0
            last_version = version
            share = worker_share(cfg, self.index, repeat)
            if not share:
                got = ray.get(ps.pull.remote(after(version)))
                continue
            result = None
            if ready is not None:
                if ready[0] == version and _same_bits(ready[1], theta) and _same_estimate(ready[2], moment):
                    self._crash_if_planned(version, share)  # where a worker without the guess would meet it
                    result, guessed_right, misses = ready[3], guessed_right + 1, 0
                else:  # the PS moved elsewhere (a rejected push, a restored PS): adapt from its theta
                    self._set_rng_state(ready[4])
                    guessed_wrong, misses = guessed_wrong + 1, misses + 1
                    exact = misses < LOOK_AHEAD_MISSES
                ready = None
            if result is None:
                tasks = drawn[1] if drawn is not None and drawn[0] == version else None
                drawn = None
                result, adapt_s = self._adapt(loop, theta, moment, version, share, tasks)
                if result is None:
                    break
                busy += adapt_s
            if self._poison.is_set():
                self._poison.clear()
                result.delta = torch.full_like(result.delta, float("nan"))
            # Rejected here already: a non-finite sum is not worth its bytes (the PS counts it).
            payload = self.codec.encode(result) if result.finite else None
            sent_wall, sent = time.time(), time.perf_counter()
            answer = ps.push_pull.remote(self.index, version, result.tasks, payload, after(version), (token, pushes))
            pushes += 1
            adapted += result.tasks
            self.metrics.pushed(result.tasks)
            drew = 0.0
            landing = self.codec.decode(payload) if payload is not None and (prefetch or exact) else None
            if landing is not None and not landing.finite:  # the PS will reject it
                landing = None
            if prefetch:
                # What the PS will apply: the sum as it decodes it (the wire precision), if finite.
                previous, in_flight = in_flight, (answer, landing)
                if previous is None:  # the first push: nothing earlier to take, go on from the theta at hand
                    continue
                answer = previous[0]
            elif exact and landing is not None and not self._ends_run(version, progress, result.tasks):
                next_theta, next_moment = self._own_update(theta, moment, version, progress, landing)
                rng = self._rng_state()
                next_result, adapt_s = self._adapt(loop, next_theta, next_moment, version + 1,
                                                   worker_share(cfg, self.index, 0), crash_check=False)
                if next_result is None:
                    break
                busy += adapt_s
                ready = (version + 1, next_theta, next_moment, next_result, rng)
            elif cfg.mode == "sync":
                with self._learner_lock:  # a family need not be safe to draw from in two loops at once
                    t0 = time.perf_counter()
                    drawn = (version + 1, draw_tasks(self.family, cfg, version + 1, share))
                    drew = time.perf_counter() - t0
                busy += drew
            waited = time.perf_counter()
            got = ray.get(answer)
            if got is not None:
                # latency: the round trip less the PS's wait for the next version and the worker's own
                # drawing meanwhile (at least the time blocked); looking ahead, the time blocked
                now = time.perf_counter()
                latency = now - waited if prefetch or ready is not None else max(now - waited, now - sent - got[3] - drew)
                self._pushes.append((sent_wall, latency, 0 if payload is None else payload.nbytes,
                                     pulled.nbytes + (0 if carried is None else carried["sq"].nbytes)))
        if ready is not None:  # a guess never taken (the run ended elsewhere, or a newer loop took over)
            self._set_rng_state(ready[4])
        if in_flight is not None:
            ray.get(in_flight[0])  # the last push's errors surface here, as any other push's
        latencies = [entry[1] for entry in self._pushes]
        return {"worker": self.index, "tasks": adapted, "busy_s": busy,
                "adapted_ahead": guessed_right, "adapted_ahead_again": guessed_wrong,
                "push_latency_median_s": float(np.median(latencies)) if latencies else math.nan,
                "push_latency_p95_s": float(np.percentile(latencies, 95)) if latencies else math.nan,
                "hooks": self.hooks.result()}  # what a benchmark's hook measured (none in a run)

    def _adapt(self, loop: int, theta: torch.Tensor, moment: InnerMoment | None, version: int, share: list[int],
               tasks=None, crash_check: bool = True) -> tuple[DeltaSum | None, float]:
        """The share adapted from theta at `version` (its tasks, when drawn already), and the
        seconds it took; None when a newer run() loop owns the learner. `crash_check`: False for
        a guess, checked when it is taken."""
        if crash_check:
            self._crash_if_planned(version, share)
        with self._learner_lock:
            if loop != self._loop:
                return None, 0.0
            t0 = time.perf_counter()
            result = adapt_tasks(self.learner, self.family, theta, self.cfg, version, share, moment, tasks)
            adapt_s = time.perf_counter() - t0
        self.hooks.after_adapt(self.index, adapt_s)
        return result, adapt_s

    def _own_update(self, theta: torch.Tensor, moment: InnerMoment | None, version: int, progress: float,
                    total: DeltaSum) -> tuple[torch.Tensor, InnerMoment | None]:
        """theta and the inner estimate after the PS applies this worker's push `total` (as it
        decodes it) when no other worker pushes: the sync step's update (Aggregator.complete_step)
        or the async one (apply_async_push), by the same functions, so bit for bit the PS's."""
        outer = OuterOptimizer.for_config(self.cfg, theta)
        outer.inner_moment = moment
        if self.cfg.mode == "async":
            apply_async_push(outer, self.cfg, total, progress)
        else:
            outer.apply_sum(total, self.cfg.meta_step_size_at(version))
        return outer.theta, outer.inner_moment

    def _ends_run(self, version: int, progress: float, tasks: int) -> bool:
        """Whether a push of `tasks` tasks from `version` (`progress` meta-steps done) completes
        the run, when no other worker pushes (Aggregator.done)."""
        if self.cfg.mode == "async":
            return round(progress * self.cfg.meta_batch_size) + tasks >= self.cfg.meta_iters * self.cfg.meta_batch_size
        return version + 1 >= self.cfg.meta_iters

    def _rng_state(self) -> tuple:
        return torch.random.get_rng_state(), torch.cuda.get_rng_state() if self.device == "cuda" else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.random.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def _look_ahead(self, theta: torch.Tensor, moment: InnerMoment | None, version: int, progress: float,
                    pending: DeltaSum | None) -> tuple[torch.Tensor, InnerMoment | None, int]:
        """prefetch: theta (at `version`, `progress` meta-steps done) after the PS applies this
        worker's `pending` push as a fresh push (staleness 0, weight 1), as Aggregator._push_async
        does; with one worker exactly the theta the PS answers that push with. With several, the PS
        may weigh or drop it otherwise; its next answer corrects that. None (a rejected push):
        theta as it is."""
        if pending is None:
            return theta, moment, version
        theta, moment = self._own_update(theta, moment, version, progress, pending)
        return theta, moment, version + 1

    def push_log(self) -> list[tuple[float, float, int, int]]:
        """(wall time sent, latency s, bytes pushed, bytes pulled) of the newest pushes (the encoded sum, and
        theta with the carried inner estimate when there is one)."""
        return list(self._pushes)

    def _crash_if_planned(self, version: int, share: list[int]) -> None:
        """Fault injection for tests and drills: while the file named by $REPTILE_DIST_CRASH_FILE
        exists and holds "<meta-step> <task index>", the worker about to adapt that task at that
        version exits at once, as a task that crashes its process would make it. Every replacement
        meets the same task (tasks are seeded by step and index) and exits too."""
        path = os.environ.get(CRASH_FILE_ENV)
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            step, task = (int(x) for x in f.read().split())
        if version == step and task in share:
            os._exit(1)

    def poison_next_push(self) -> None:
        """Fault injection for tests and drills: the next delta this worker sends is all NaN."""
        self._poison.set()
