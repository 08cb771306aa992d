"""The driver of a distributed run: place the actors, watch them, log, checkpoint, evaluate.

    placement group = [PS + evaluator] + W x [adapt worker]
    workers: pull theta -> adapt their share -> push sum of deltas   (adapt_worker.py)
    PS: aggregate sync or async, snapshot theta for checkpoints and evaluations (parameter_server.py)
    driver: drain the PS every tick -> metrics.parquet, checkpoints, evaluator requests
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from reptile_dist.config import Config
from reptile_dist.engine.actors import EngineActors
from reptile_dist.engine.cluster import ray_cluster
from reptile_dist.evaluation import combine_scores, headline, summarize
from reptile_dist.reptile import InnerMoment
from reptile_dist.training import (Cadence, RunSetup, Throughput, checkpoint_state, finish_run, periodic_split,
                                   setup_run)

TICK_S = 0.2


class RunFailed(RuntimeError):
    """The run cannot go on (every delta rejected for too long, a worker error)."""


def train_ray(cfg: Config, out: str, address: str | None = None, resume: bool = False, progress: bool = True,
              say: Callable[[str], None] = print, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Meta-train with Ray actors; the run directory ends up with the same files as a local run.

    `on_log(row)` is called with every logged row and, when a periodic evaluation finishes, with
    `{"step": its step, "eval_...": ...}`."""
    if cfg.mode == "allreduce":  # no parameter server: a Ray Train worker group (allreduce.py)
        from reptile_dist.engine.allreduce import train_allreduce

        return train_allreduce(cfg, out, address, resume, progress, say, on_log)
    with ray_cluster(cfg, address):
        return EngineRun(cfg, out, resume, progress, say, on_log).run()


class EngineRun:
    def __init__(self, cfg: Config, out: str, resume: bool, progress: bool, say, on_log):
        self.cfg = cfg
        self.out = out
        self.resume = resume
        self.progress = progress
        self.say = say
        self.on_log = on_log
        self.pending_evals: dict[Any, int] = {}
        self.window: list[dict[str, Any]] = []
        self.cadence = Cadence.of(cfg)
        self.last_log = 0.0
        self.last_logged_wall = 0.0
        self.ps_generation = 0
        self.workers_replaced = 0
        self.redone_steps = 0
        self.redone_tasks = 0

    # --- actors -------------------------------------------------------------------------
    def start_worker(self, w: int, generation: int = 0):
        return self.engine.worker(w, generation)

    def start_ps(self, theta: np.ndarray, outer_state: dict, version: int, applied_tasks: int):
        self.ps_generation += 1
        return self.engine.parameter_server(theta, outer_state, version, applied_tasks, self.ps_generation)

    def start_actors(self, s: RunSetup) -> None:
        restored = s.restored or {}
        self.ps = self.start_ps(s.outer.theta.numpy(), s.outer.state_dict(), restored.get("version", s.start_step),
                                restored.get("applied_tasks", s.start_step * self.cfg.meta_batch_size))
        self.evaluator = self.engine.evaluator()
        self.workers = [self.start_worker(w) for w in range(self.cfg.workers)]
        self.placements = ray.get([w.where.remote() for w in self.workers])  # also waits for data loading

    # --- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        s = setup_run(cfg, self.out, self.resume, self.say)
        self.setup = s
        self.initial_outer = s.outer.state_dict()
        self.last_log = float(s.start_step)
        self.engine = EngineActors(cfg)
        try:
            self.start_actors(s)
            before_ref = None
            if s.start_step == 0:
                before_ref = self.evaluator.evaluate.remote(s.outer.theta.numpy(), periodic_split(s.family), cfg.eval_tasks_periodic)
            throughput = Throughput()
            self.session_start_tasks = s.start_step * cfg.meta_batch_size
            runs = {w.run.remote(self.ps): i for i, w in enumerate(self.workers)}
            info = self.watch(runs, s)
            throughput.pause(self.tasks_this_session(info))
            state = ray.get(self.ps.state.remote())
            self.collect_evals(wait=True)
            before = None
            if before_ref is not None:
                before = ray.get(before_ref)
                self.say(f"before meta-training ({periodic_split(s.family)}): {headline(before, s.family.kind)}")
            theta = torch.from_numpy(np.array(state["theta"]))
            moment = InnerMoment.from_state(state["outer"].get("inner_moment"))
            test = self.sharded_eval(state["theta"], "test", cfg.eval_tasks, moment)
            extra = {"ps_busy_fraction": info["busy_fraction"], "dropped_stale": info["counters"]["dropped_stale"],
                     "rejected_nonfinite": info["counters"]["rejected_nonfinite"],
                     "rejected_by_worker": info["counters"]["rejected_by_worker"],
                     "staleness_histogram": info["counters"]["staleness"],
                     "workers_replaced": self.workers_replaced, "ps_restarts": self.ps_generation - 1,
                     "redone_steps": self.redone_steps,
                     "worker_nodes": sorted({p["node_id"] for p in self.placements}),
                     "worker_devices": sorted({p["device"] for p in self.placements})}
            step = cfg.meta_iters
            return finish_run(s, theta, step, throughput, time.perf_counter() - started, before, extra, self.say, test,
                              moment)
        finally:
            s.run.flush_metrics()
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
        returned: set[int] = set()
        last_progress = float(s.start_step)
        while True:
            try:
                info = ray.get(self.ps.drain.remote())
            except RayActorError:
                runs = self.restore_ps(s, last_progress)
                returned.clear()
                continue
            last_progress = info["progress"]
            self.handle(info, s)
            now = int(info["progress"])
            bar.update(now - shown)
            shown = now
            if self.window and self.progress:
                last = s.run.metrics[-1] if s.run.metrics else {}
                bar.set_postfix({k: f"{last[k]:.3g}" for k in ("train_loss", "tasks_per_s") if isinstance(last.get(k), float)})
            if info["rejected_in_a_row"] >= cfg.max_rejected_updates:
                raise RunFailed(f"every delta was rejected for {info['rejected_in_a_row']} updates in a row "
                                f"(non-finite losses?); stopped at meta-step {now}, checkpoints kept")
            finished, _ = ray.wait([r for r, w in runs.items() if w not in returned], timeout=0,
                                   num_returns=len(runs) - len(returned))
            for ref in finished:
                w = runs[ref]
                try:
                    ray.get(ref)
                    returned.add(w)
                except RayTaskError as exc:
                    if isinstance(exc, RayActorError):
                        break  # the worker lost the PS; the next drain notices and restores it
                    raise
                except RayActorError:
                    if not info["done"]:
                        runs.pop(ref)
                        runs[self.replace_worker(w, info)] = w
                    else:
                        returned.add(w)
            if info["done"] and len(returned) == len(runs):
                bar.close()
                return info
            time.sleep(TICK_S)

    def replace_worker(self, w: int, info: dict[str, Any]):
        """A worker died: its in-flight delta is lost. Start a replacement with the same index
        (so it takes the same task share); in sync mode either wait for it to adapt that share
        or, with on_worker_loss=skip, complete the step with the deltas that arrived."""
        self.workers_replaced += 1
        self.say(f"worker {w} died at meta-step {int(info['progress'])}; starting a replacement")
        if self.cfg.mode == "sync" and self.cfg.on_worker_loss == "skip":
            ray.get(self.ps.complete_step.remote())
        self.workers[w] = self.start_worker(w, generation=self.workers_replaced)
        self.placements[w] = ray.get(self.workers[w].where.remote())
        self.setup.run.log({"step": info["progress"], "event": f"worker {w} replaced"})
        return self.workers[w].run.remote(self.ps)

    def restore_ps(self, s: RunSetup, progress: float) -> dict:
        """The PS died: restore theta, the outer optimizer and the step from the newest readable
        checkpoint (tasks are seeded by step, so that is the whole RNG state) and restart every
        worker loop against the new PS. At most one checkpoint interval is redone."""
        state = s.run.latest_checkpoint(warn=self.say)
        if state is None:
            state = {"step": 0, "outer": self.initial_outer, "version": 0, "applied_tasks": 0}
        step = int(state["step"])
        self.redone_steps += max(0, int(progress) - step)
        self.redone_tasks += max(0, int(round((progress - step) * self.cfg.meta_batch_size)))
        self.say(f"parameter server lost at meta-step {int(progress)}; restored from meta-step {step}")
        self.ps = self.start_ps(state["outer"]["theta"].numpy(), state["outer"], state.get("version", step),
                                state.get("applied_tasks", step * self.cfg.meta_batch_size))
        s.run.truncate_metrics(step)
        s.run.log({"step": step, "event": f"parameter server restored (redid {int(progress) - step} meta-steps)"})
        self.window = []
        self.last_log = float(step)
        self.pending_evals = {ref: st for ref, st in self.pending_evals.items() if st <= step}
        return {w.run.remote(self.ps): i for i, w in enumerate(self.workers)}

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
                                                                     applied_tasks=state["applied_tasks"]),
                                      self.cfg.keep_checkpoints)
            else:
                ref = self.evaluator.evaluate.remote(snap["theta"], periodic_split(s.family), self.cfg.eval_tasks_periodic,
                                                     snap.get("moment"))
                self.pending_evals[ref] = snap["step"]
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
        if not self.pending_evals:
            return
        done, _ = ray.wait(list(self.pending_evals), num_returns=len(self.pending_evals), timeout=None if wait else 0)
        for ref in done:
            step = self.pending_evals.pop(ref)
            result = {f"eval_{k}": v for k, v in ray.get(ref).items() if k != "tasks"}
            rows = self.setup.run.metrics
            match = next((r for r in reversed(rows) if r.get("step") == step), None)
            if match is None:
                rows.append({"step": step, **result})
            else:
                match.update(result)
            if self.on_log is not None:  # evaluations finish after their step was logged (Tune reports them)
                self.on_log({"step": step, **result})

    def sharded_eval(self, theta: np.ndarray, split: str, tasks: int, moment: InnerMoment | None = None) -> dict[str, float]:
        """The final evaluation split across the workers and the evaluator (they are idle now)."""
        actors = self.workers + [self.evaluator]
        bounds = np.linspace(0, tasks, len(actors) + 1).astype(int)
        theta_ref = ray.put(theta)
        parts = ray.get([a.score.remote(theta_ref, split, int(lo), int(hi), moment)
                         for a, lo, hi in zip(actors, bounds[:-1], bounds[1:]) if hi > lo])
        return summarize(combine_scores(parts))
