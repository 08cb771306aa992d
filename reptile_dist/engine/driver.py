"""The driver of a distributed run: place the actors, watch them, log, checkpoint, evaluate.

    placement group = [PS + evaluator] + W x [adapt worker]
    workers: pull theta -> adapt their share -> push sum of deltas   (adapt_worker.py)
    PS: aggregate sync or async, snapshot theta for checkpoints and evaluations (parameter_server.py)
    driver: drain the PS every tick -> metrics.parquet, checkpoints, evaluator requests

A dead worker is replaced, a dead PS restored from the newest checkpoint, a dead evaluator
restarted; each after a backoff, and at most cfg.max_failures times in a row (`Restarts`).
"""
from __future__ import annotations

import math
import time
from itertools import cycle
from typing import Any, Callable

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm import tqdm

from reptile_dist.config import Config
from reptile_dist.engine.actors import START_TIMEOUT_S, EngineActors
from reptile_dist.engine.cluster import run_on_cluster
from reptile_dist.engine.sharded_eval import eval_timeout_s, score_in_shards
from reptile_dist.evaluation import SCORES_BLOCK, ScoresFile, headline, shard_bounds, summarize
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import InnerMoment
from reptile_dist.training import (Cadence, RunFailed, RunSetup, Throughput, checkpoint_state, finish_run, kept_test_scores,
                                   periodic_split)

TICK_S = 0.2
# Waits that would otherwise hang the driver when an actor cannot be placed or stops answering.
PS_TIMEOUT_S = 120.0  # drain, state and complete_step take milliseconds on a live PS
BACKOFF_MAX_S = 30.0
HEALTHY_S = 60.0


class Restarts:
    """Failures in a row of each restartable actor ("worker 0", "the parameter server", "the
    evaluator"), capped by `limit` (cfg.max_failures, -1: none), with the wait before the next
    restart doubling from 1 s to BACKOFF_MAX_S. Tasks are seeded by step and index, so a task
    that kills its worker kills every replacement: without the cap that loops forever. An actor
    that ran HEALTHY_S while the run moved past its last failure starts again from zero."""

    def __init__(self, limit: int):
        self.limit = limit
        self.started: dict[str, float] = {}
        self.last: dict[str, tuple[int, float]] = {}  # actor -> (failures in a row, meta-step of the last)

    def start(self, actor: str) -> None:
        self.started[actor] = time.monotonic()

    def failed(self, actor: str, progress: float) -> float:
        """Count a failure at meta-step `progress`; the seconds to wait before the restart.
        Raises RunFailed once the failures in a row exceed the limit."""
        count, at = self.last.get(actor, (0, -1.0))
        if time.monotonic() - self.started.get(actor, -math.inf) >= HEALTHY_S and progress > at:
            count = 0
        count += 1
        self.last[actor] = (count, progress)
        if 0 <= self.limit < count:
            raise RunFailed(f"{actor} failed {count} times in a row, the last at meta-step {int(progress)} "
                            f"(max_failures={self.limit}); checkpoints kept")
        return min(BACKOFF_MAX_S, 2.0 ** (count - 1))


def train_ray(cfg: Config, out: str, address: str | None = None, resume: bool = False, progress: bool = True,
              say: Callable[[str], None] = print, on_log: Callable[[dict[str, Any]], None] | None = None,
              plugins: Plugins | None = None) -> dict[str, Any]:
    """Meta-train with Ray actors; the run directory ends up with the same files as a local run.

    `on_log(row)` is called with every logged row and, when a periodic evaluation finishes, with
    `{"step": its step, "eval_...": ...}`. `plugins`: the family and network factories (default:
    the config's), handed to every actor. `address` (else cfg.address): a cluster to join."""
    plugins = (plugins or Plugins.of(cfg)).ship()
    if cfg.mode == "allreduce":  # no parameter server: a Ray Train worker group (allreduce.py)
        from reptile_dist.engine.allreduce import train_allreduce

        return train_allreduce(cfg, out, address, resume, progress, say, on_log, plugins)
    return run_on_cluster(cfg, out, address, resume, say, plugins,
                          lambda s: EngineRun(cfg, out, resume, progress, say, on_log).run(s))


class EngineRun:
    def __init__(self, cfg: Config, out: str, resume: bool, progress: bool, say, on_log):
        self.cfg = cfg
        self.out = out
        self.resume = resume
        self.progress = progress
        self.say = say
        self.on_log = on_log
        self.pending_evals: dict[Any, tuple[int, int]] = {}  # ref -> (its meta-step, evaluator generation)
        self.window: list[dict[str, Any]] = []
        self.cadence = Cadence.of(cfg)
        self.last_log = 0.0
        self.last_logged_wall = 0.0
        self.at = 0.0  # meta-steps done at the last drain
        self.ps_generation = 0
        self.evaluator_generation = 0
        self.workers_replaced = 0
        self.redone_steps = 0
        self.adapted_ahead = self.adapted_ahead_again = 0  # the workers' loops' reports (AdaptWorker.run)
        self.redone_tasks = 0
        self.restarts = Restarts(cfg.max_failures)
        self.down: dict[int, float] = {}  # dead worker -> when its replacement may start (inf: none needed)

    # --- actors -------------------------------------------------------------------------
    def start_worker(self, w: int, generation: int = 0):
        self.restarts.start(f"worker {w}")
        return self.engine.worker(w, generation)

    def start_ps(self, theta: np.ndarray, outer_state: dict, version: int, applied_tasks: int):
        self.ps_generation += 1
        self.restarts.start("the parameter server")
        return self.engine.parameter_server(theta, outer_state, version, applied_tasks, self.ps_generation)

    def start_evaluator(self) -> None:
        self.evaluator_generation += 1
        self.restarts.start("the evaluator")
        self.evaluator = self.engine.evaluator(self.evaluator_generation)

    def start_actors(self, s: RunSetup) -> None:
        restored = s.restored or {}
        self.ps = self.start_ps(s.outer.theta.numpy(), s.outer.state_dict(), restored.get("version", s.start_step),
                                restored.get("applied_tasks", s.start_step * self.cfg.meta_batch_size))
        self.start_evaluator()
        self.workers = [self.start_worker(w) for w in range(self.cfg.workers)]
        self.placements = self.started([*self.workers, self.evaluator], "the workers and the evaluator")[:-1]

    def started(self, actors: list, what: str) -> list[dict[str, Any]]:
        """Where each actor runs, once placed and loaded; RunFailed when that takes too long."""
        try:
            return ray.get([a.where.remote() for a in actors], timeout=START_TIMEOUT_S)
        except GetTimeoutError:
            raise RunFailed(f"{what} could not be placed or did not start within {START_TIMEOUT_S:.0f} s "
                            f"(meta-step {int(self.at)}, available: {ray.available_resources()}); "
                            "checkpoints kept") from None

    def ps_call(self, method):
        """`method` of the PS, called and waited for; RayActorError when the PS died."""
        try:
            return ray.get(method.remote(), timeout=PS_TIMEOUT_S)
        except GetTimeoutError:
            raise RunFailed(f"the parameter server did not answer within {PS_TIMEOUT_S:.0f} s "
                            f"(meta-step {int(self.at)}); checkpoints kept") from None

    # --- the run ------------------------------------------------------------------------
    def run(self, s: RunSetup) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        self.setup = s
        self.initial_outer = s.outer.state_dict()
        self.last_log = float(s.start_step)
        self.at = float(s.start_step)
        self.engine = EngineActors(cfg, plugins=s.plugins)
        try:
            self.start_actors(s)
            before_ref = None
            if s.start_step == 0:
                before_ref = self.evaluator.evaluate.remote(s.outer.theta.numpy(), periodic_split(s.family), cfg.eval_tasks_periodic)
            throughput = Throughput()
            self.session_start_tasks = s.start_step * cfg.meta_batch_size
            runs = {w.run.remote(self.ps): i for i, w in enumerate(self.workers)}
            while True:
                info = self.watch(runs, s)
                try:
                    state = self.ps_call(self.ps.state)
                    break
                except RayActorError:  # lost after the last drain: restore it and let the loops finish again
                    runs = self.restore_ps(s)
            throughput.pause(self.tasks_this_session(info))
            self.collect_evals(wait=True)
            before = None
            if before_ref is not None:
                before = self.before_training(before_ref, s)
                self.say(f"before meta-training ({periodic_split(s.family)}): {headline(before, s.family.kind)}")
            theta = torch.from_numpy(np.array(state["theta"]))
            moment = InnerMoment.from_state(state["outer"].get("inner_moment"))
            devices = "+".join(sorted({str(p["device"]).split(":")[0] for p in self.placements} | {"cpu"}))  # the evaluator's
            test = self.sharded_eval(state["theta"], "test", cfg.eval_tasks, moment,
                                     kept_test_scores(s, theta, moment, devices, self.say))
            extra = {"ps_busy_fraction": info["busy_fraction"], "dropped_stale": info["counters"]["dropped_stale"],
                     "rejected_nonfinite": info["counters"]["rejected_nonfinite"],
                     "rejected_by_worker": info["counters"]["rejected_by_worker"],
                     "staleness_histogram": info["counters"]["staleness"],
                     "workers_replaced": self.workers_replaced, "ps_restarts": self.ps_generation - 1,
                     "evaluator_restarts": self.evaluator_generation - 1,
                     "redone_steps": self.redone_steps,
                     # pushes adapted while the one before travelled (a lone worker, AdaptWorker.run),
                     # and those adapted again because the PS's answer differed
                     "adapted_ahead": self.adapted_ahead, "adapted_ahead_again": self.adapted_ahead_again,
                     "worker_nodes": sorted({p["node_id"] for p in self.placements}),
                     "worker_devices": sorted({p["device"] for p in self.placements})}
            step = cfg.meta_iters
            return finish_run(s, theta, step, throughput, time.perf_counter() - started, before, extra, self.say, test,
                              moment)
        finally:
            s.run.flush_metrics()
            s.run.release()
            self.engine.close()

    def tasks_this_session(self, info: dict[str, Any]) -> int:
        return self.redone_tasks + info["counters"]["applied_tasks"] - self.session_start_tasks

    def watch(self, runs: dict, s: RunSetup) -> dict[str, Any]:
        """Drain the PS every tick until the run is done and every worker loop has returned;
        replace dead workers, restore a dead PS from the last checkpoint."""
        cfg = self.cfg
        bar = tqdm(total=cfg.meta_iters, initial=s.start_step, disable=not self.progress, desc="meta-train",
                   dynamic_ncols=True)
        shown = s.start_step
        try:
            while True:
                try:
                    info = self.ps_call(self.ps.drain)
                except RayActorError:
                    runs = self.restore_ps(s)
                    continue
                self.at = info["progress"]
                self.handle(info, s)
                now = int(info["progress"])
                bar.update(now - shown)
                shown = now
                if self.window and self.progress:
                    last = s.run.metrics[-1] if s.run.metrics else {}
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("train_loss", "tasks_per_s")
                                     if isinstance(last.get(k), float)})
                if info["rejected_in_a_row"] >= cfg.max_rejected_updates:
                    raise RunFailed(f"every delta was rejected for {info['rejected_in_a_row']} updates in a row "
                                    f"(non-finite losses?); stopped at meta-step {now}, checkpoints kept")
                finished = ray.wait(list(runs), timeout=0, num_returns=len(runs))[0] if runs else []
                for ref in finished:
                    try:
                        report = ray.get(ref)
                        self.adapted_ahead += report["adapted_ahead"]
                        self.adapted_ahead_again += report["adapted_ahead_again"]
                    except RayTaskError as exc:
                        if isinstance(exc, RayActorError):
                            break  # the worker lost the PS; the next drain notices and restores it
                        raise
                    except RayActorError:
                        self.worker_died(runs.pop(ref), info)
                        continue
                    runs.pop(ref)
                if info["done"] and not runs:
                    return info
                if not info["done"]:  # once done, a replacement would only find the run over
                    self.start_replacements(runs)
                time.sleep(TICK_S)
        finally:
            bar.close()

    def worker_died(self, w: int, info: dict[str, Any]) -> None:
        """A worker died: its in-flight delta is lost. A replacement with the same index (so it
        takes the same task share) starts after the backoff; in sync mode it adapts that share,
        or, with on_worker_loss=skip, the step completes now with the deltas that arrived."""
        if info["done"]:
            self.down[w] = math.inf  # nothing left to adapt; its final-evaluation shard goes to the others
            return
        delay = self.restarts.failed(f"worker {w}", info["progress"])
        self.say(f"worker {w} died at meta-step {int(info['progress'])}; a replacement starts in {delay:.0f} s")
        self.down[w] = time.monotonic() + delay
        if self.cfg.mode == "sync" and self.cfg.on_worker_loss == "skip":
            try:
                self.ps_call(self.ps.complete_step)
            except RayActorError:
                pass  # the PS died too: the next drain restores it from the last checkpoint

    def start_replacements(self, runs: dict) -> None:
        """Start the replacements whose backoff is over; their loops join `runs`."""
        for w, due in list(self.down.items()):
            if due > time.monotonic():
                continue
            del self.down[w]
            self.workers_replaced += 1
            from reptile_dist.engine.metrics import count_worker_replaced  # Ray's metrics API (engine/metrics.py)

            count_worker_replaced()
            self.workers[w] = self.start_worker(w, generation=self.workers_replaced)
            try:
                self.placements[w] = self.started([self.workers[w]], f"the replacement of worker {w}")[0]
            except RayActorError:  # it died starting: another failure in a row
                self.worker_died(w, {"progress": self.at, "done": False})
                continue
            self.setup.run.log({"step": self.at, "event": f"worker {w} replaced"})
            runs[self.workers[w].run.remote(self.ps)] = w

    def restore_ps(self, s: RunSetup) -> dict:
        """The PS died: restore theta, the outer optimizer and the step from the newest readable
        checkpoint (tasks are seeded by step, so that is the whole RNG state) and restart every
        worker loop against the new PS. At most one checkpoint interval is redone."""
        progress = self.at
        delay = self.restarts.failed("the parameter server", progress)
        state = s.run.latest_checkpoint(warn=self.say)
        if state is None:
            state = {"step": 0, "outer": self.initial_outer, "version": 0, "applied_tasks": 0}
        step = int(state["step"])
        self.redone_steps += max(0, int(progress) - step)
        self.redone_tasks += max(0, int(round((progress - step) * self.cfg.meta_batch_size)))
        self.say(f"parameter server lost at meta-step {int(progress)}; restoring from meta-step {step} "
                 f"in {delay:.0f} s")
        time.sleep(delay)  # nothing moves without a PS; the wait only keeps a crash loop from spinning
        self.ps = self.start_ps(state["outer"]["theta"].numpy(), state["outer"], state.get("version", step),
                                state.get("applied_tasks", step * self.cfg.meta_batch_size))
        s.run.truncate_metrics(step)
        s.run.log({"step": step, "event": f"parameter server restored (redid {int(progress) - step} meta-steps)"})
        self.window = []
        self.last_log = float(step)
        self.at = float(step)
        self.pending_evals = {ref: e for ref, e in self.pending_evals.items() if e[0] <= step}
        # A worker that died after the old PS was done has steps to adapt again.
        self.down = {w: time.monotonic() if due == math.inf else due for w, due in self.down.items()}
        return {w.run.remote(self.ps): i for i, w in enumerate(self.workers) if i not in self.down}

    def restart_evaluator(self, why: str) -> None:
        """A new evaluator in place of one that died or stopped answering."""
        delay = self.restarts.failed("the evaluator", self.at)
        self.say(f"the evaluator {why} at meta-step {int(self.at)}; restarting it in {delay:.0f} s")
        ray.kill(self.evaluator)  # it may be wedged rather than dead
        time.sleep(delay)
        self.start_evaluator()
        self.started([self.evaluator], "a restarted evaluator")
        self.setup.run.log({"step": self.at, "event": f"evaluator restarted ({why})"})

    def handle(self, info: dict[str, Any], s: RunSetup) -> None:
        for message in info["messages"]:
            tqdm.write(f"[ps] {message}") if self.progress else self.say(f"[ps] {message}")
        for row in info["rows"]:
            self.window.append(row)
            if self.cadence.log(self.last_log, row["step"]) or info["done"] and row is info["rows"][-1]:
                self.log(info, s)
        for snap in info["snapshots"]:
            if snap["kind"] == "checkpoint":
                state = snap["state"]
                s.run.save_checkpoint(snap["step"], checkpoint_state(self.cfg, snap["step"], state["outer"],
                                                                     version=state["version"],
                                                                     applied_tasks=state["applied_tasks"],
                                                                     family_info=s.learner.family_info),
                                      self.cfg.keep_checkpoints)
            else:
                ref = self.evaluator.evaluate.remote(snap["theta"], periodic_split(s.family), self.cfg.eval_tasks_periodic,
                                                     snap.get("moment"))
                self.pending_evals[ref] = (snap["step"], self.evaluator_generation)
        self.collect_evals(wait=False)

    def log(self, info: dict[str, Any], s: RunSetup) -> None:
        rows, self.window = self.window, []
        tasks = sum(r["tasks"] for r in rows)
        applied = [r for r in rows if "train_loss" in r]
        span = rows[-1]["wall_s"] - self.last_logged_wall
        self.last_logged_wall = rows[-1]["wall_s"]
        counters = info["counters"]
        row = {
            "step": rows[-1]["step"],
            "meta_step_size": rows[-1]["meta_step_size"],
            "train_loss": float(np.mean([r["train_loss"] for r in applied])) if applied else math.nan,
            "train_accuracy": float(np.mean([r["train_accuracy"] for r in applied])) if applied else math.nan,
            "tasks_per_s": tasks / span if span > 0 else math.nan,
            "wall_s": rows[-1]["wall_s"],
            "staleness_mean": float(np.mean([r["staleness"] for r in applied])) if applied else math.nan,
            "staleness_max": float(max((r["staleness"] for r in applied), default=math.nan)),
            "dropped_stale": counters["dropped_stale"],
            "rejected_nonfinite": counters["rejected_nonfinite"],
            "ps_busy_fraction": info["busy_fraction"],
            "workers_replaced": self.workers_replaced,
            "ps_restarts": self.ps_generation - 1,
        }
        s.run.log(row)
        self.last_log = row["step"]
        if self.on_log is not None:
            self.on_log(row)

    def collect_evals(self, wait: bool) -> None:
        """Record the periodic evaluations that finished (with `wait`, all of them, or those the
        evaluator answers in time). A lost one is only reported: the run goes on without it."""
        if not self.pending_evals:
            return
        timeout = eval_timeout_s(len(self.pending_evals) * self.cfg.eval_tasks_periodic) if wait else 0
        done, late = ray.wait(list(self.pending_evals), num_returns=len(self.pending_evals), timeout=timeout)
        for ref in done:
            step, generation = self.pending_evals.pop(ref)
            try:
                scores = ray.get(ref)
            except RayActorError:
                self.evaluation_lost(step, generation, "died")
                continue
            result = {f"eval_{k}": v for k, v in scores.items() if k != "tasks"}
            self.setup.run.annotate(step, result)
            if self.on_log is not None:  # evaluations finish after their step was logged (Tune reports them)
                self.on_log({"step": step, **result})
        for ref in late if wait else []:
            step, generation = self.pending_evals.pop(ref)
            self.evaluation_lost(step, generation, f"did not answer within {timeout:.0f} s")

    def evaluation_lost(self, step: int, generation: int, why: str) -> None:
        self.say(f"warning: the periodic evaluation of meta-step {step} was lost (the evaluator {why}); "
                 "the run goes on without it")
        self.setup.run.log({"step": self.at, "event": f"evaluation of meta-step {step} lost"})
        if generation == self.evaluator_generation:  # the first loss seen from this evaluator
            self.restart_evaluator(why)

    def before_training(self, ref, s: RunSetup) -> dict[str, float]:
        """The evaluation of theta_0 sent to the evaluator at the start; scored again, sharded,
        when it was lost (tasks are seeded: the same result)."""
        tasks = self.cfg.eval_tasks_periodic
        try:
            return ray.get(ref, timeout=eval_timeout_s(tasks))
        except (RayActorError, GetTimeoutError) as exc:
            self.say("warning: the before-training evaluation was lost; scoring it again")
            if isinstance(exc, GetTimeoutError):  # a dead evaluator is found, and restarted, by the shard it loses
                self.restart_evaluator(f"did not answer within {eval_timeout_s(tasks):.0f} s")
            return self.sharded_eval(s.outer.theta.numpy(), periodic_split(s.family), tasks)

    def sharded_eval(self, theta: np.ndarray, split: str, tasks: int, moment: InnerMoment | None = None,
                     kept: ScoresFile | None = None) -> dict[str, float]:
        """An evaluation split across the workers and the evaluator (they are idle now). A shard
        whose actor died or stopped answering is scored again on the others, or on a restarted
        evaluator (tasks are seeded: the same scores); that actor is not sent to again. `kept`: a
        scores file; only the tasks it lacks are scored, in blocks of SCORES_BLOCK per live actor,
        each kept as it completes."""
        actors = [a for w, a in enumerate(self.workers) if w not in self.down] + [self.evaluator]
        theta_ref = ray.put(theta)

        def send(shards: list) -> dict:
            return {actor.score.remote(theta_ref, split, lo, hi, moment): (lo, hi, actor)
                    for (lo, hi), actor in zip(shards, cycle(actors))}

        def after_loss(lost: list, answered: list) -> None:
            nonlocal actors
            if any(actor is self.evaluator for actor in lost):
                self.restart_evaluator(f"lost its {split} evaluation shard")
            actors = [a for a in actors if a is not self.evaluator and all(a is not gone for gone in lost)]
            actors.append(self.evaluator)  # a restarted one, when it was lost

        def score(lo: int, hi: int):
            return score_in_shards([(lo + a, lo + b) for a, b in shard_bounds(hi - lo, len(actors))], send,
                                   f"{split} evaluation", self.say, after_loss,
                                   f" (meta-step {int(self.at)}); checkpoints kept"
                                   + (f", and the tasks scored in {kept.path}" if kept else ""))

        if kept is None:
            return summarize(score(0, tasks))
        return summarize(kept.complete(tasks, lambda: SCORES_BLOCK * len(actors), score))
