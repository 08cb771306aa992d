"""Held-out evaluations spread over Ray actors, each actor scoring a contiguous shard of the seeded
tasks, so the result equals the one-process evaluation's task for task (on the same kind of
device, and for a network that draws no random numbers while it predicts: dropout's draws depend
on where a shard starts).

`score_in_shards` is the one retry loop: a shard whose actor died, or stopped answering, is scored
again. Two callers pick the actors: a run's driver (`EngineRun.sharded_eval`: its idle workers and
evaluator) and `score_on_ray` (`reptile-dist eval --workers N`, `rd.evaluate(..., workers=N)`: new
actors started for it)."""
from __future__ import annotations

import sys
import uuid
from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayActorError

from reptile_dist.config import Config
from reptile_dist.engine.actors import START_TIMEOUT_S
from reptile_dist.engine.adapt_worker import Workspace
from reptile_dist.engine.cluster import (ClusterError, bundle_cpus, local_cluster_cpus, placement_bundles, ray_session,
                                         worker_resources)
from reptile_dist.errors import RunFailed
from reptile_dist.evaluation import TaskScores, combine_scores, score_blocks, shard_bounds
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import InnerMoment

ACTOR_PREFIX = "eval-"  # eval-<run id>-<n>: named, so a drill (or a test) can find and kill one
EVAL_S_PER_TASK = 5.0  # 20x the slowest task measured (~0.25 s, omniglot 20-way on CPU)
EVAL_ATTEMPTS = 3  # times one shard is sent before the evaluation fails

Shard = tuple[int, int]  # tasks start..stop-1


def eval_timeout_s(tasks: int) -> float:
    """How long an evaluation of `tasks` tasks may take before its actor is taken as wedged."""
    return START_TIMEOUT_S + EVAL_S_PER_TASK * tasks


def score_in_shards(shards: list[Shard], send: Callable[[list[Shard]], dict], what: str,
                    say: Callable[[str], None], after_loss: Callable[[list, list], None],
                    failed_context: str = "", wedged_after: bool = True) -> TaskScores:
    """The scores of every task in `shards`. `send(shards)` sends each shard to an actor of its
    choice, as {reference to its scores: (start, stop, actor)}. A shard whose actor died, or (with
    `wedged_after`) did not answer within `eval_timeout_s` of the largest shard, is sent again
    (tasks are seeded: the same scores), after `after_loss(the actors lost, the actors that
    answered)`; at most EVAL_ATTEMPTS times, then RunFailed (`what`: "test evaluation", say;
    `failed_context` ends that message)."""
    tasks, parts = sum(hi - lo for lo, hi in shards), {}
    if not shards:
        return combine_scores([])
    for _ in range(EVAL_ATTEMPTS):
        sent = send(shards)
        timeout = eval_timeout_s(max(hi - lo for lo, hi in shards)) if wedged_after else None
        done, late = ray.wait(list(sent), num_returns=len(sent), timeout=timeout)
        answered, lost = [], [sent[ref] for ref in late]
        for ref in done:
            try:
                parts[sent[ref][0]] = ray.get(ref)
                answered.append(sent[ref][2])
            except RayActorError:
                lost.append(sent[ref])
        if not lost:
            return combine_scores(parts[lo] for lo in sorted(parts))
        shards = [(lo, hi) for lo, hi, _ in lost]
        say(f"warning: {sum(hi - lo for lo, hi in shards)} of {tasks} {what} tasks were lost with their actor; "
            "scoring them again")
        after_loss([actor for _, _, actor in lost], answered)
    raise RunFailed(f"the {what} lost tasks {shards[0][0]}-{shards[0][1]} {EVAL_ATTEMPTS} times{failed_context}")


def score_on_ray(cfg: Config, plugins: Plugins, theta: np.ndarray, moment: InnerMoment | None, split: str,
                 ranges: list[Shard], workers: int, address: str | None = None, transductive: bool | None = None,
                 on_gpus: bool = False, say: Callable[[str], None] | None = None, block: int | None = None,
                 on_block: Callable[[int, TaskScores], None] | None = None) -> TaskScores:
    """The tasks in `ranges` ([lo, hi) ranges of task indices) of `split`, scored by `workers`
    actors on the cluster at `address`, or on a local one started for the evaluation (inside a
    running Ray session, on that), combined in order. `on_gpus`: each actor takes an adapt
    worker's GPU share where the cluster has GPUs; else a CPU share. `block`: the tasks are scored
    in blocks of that many, in order, `on_block(first task, scores)` told of each as it completes
    (a scores file keeps them); None: each range in one block. A shard lost with its actor is
    scored again on a new one. No time limit: a user's network may take any time a task, and an
    actor that dies still shows as lost."""
    say = say or (lambda message: print(message, file=sys.stderr))
    cfg = cfg.replace(workers=workers, **({} if on_gpus else {"gpus_per_worker": 0.0}))
    cpus = local_cluster_cpus(lambda has_gpus: bundle_cpus(placement_bundles(cfg, has_gpus)[1:]))
    with ray_session(address, cpus):
        res = worker_resources(cfg)
        run_id, actors, idle = uuid.uuid4().hex[:8], [], []

        def started(count: int) -> list:
            new = [ray.remote(Workspace).options(
                name=f"{ACTOR_PREFIX}{run_id}-{len(actors) + i}", num_cpus=res["CPU"], num_gpus=res.get("GPU", 0),
            ).remote(cfg.to_dict(), plugins.ship()) for i in range(count)]
            actors.extend(new)
            placed, _ = ray.wait([actor.where.remote() for actor in new], num_returns=count, timeout=START_TIMEOUT_S)
            if len(placed) < count:  # one that died while starting answers (with its error): its shard is lost
                raise ClusterError(f"{count - len(placed)} of {count} evaluation actors of {res} each did not start "
                                   f"within {START_TIMEOUT_S:.0f} s ({ray.available_resources()} available)")
            return new

        def send(shards: list[Shard]) -> dict:
            idle.extend(started(len(shards) - len(idle)) if len(shards) > len(idle) else [])
            return {actor.score.remote(theta_ref, split, lo, hi, moment, transductive): (lo, hi, actor)
                    for actor, (lo, hi) in zip(idle, shards)}

        def forget(lost: list, answered: list) -> None:  # the actors that died are not sent to again
            idle[:] = [actor for actor in idle if actor not in lost]

        try:
            theta_ref = ray.put(theta)
            return score_blocks(ranges, block, on_block=on_block, score=lambda lo, hi: score_in_shards(
                [(lo + a, lo + b) for a, b in shard_bounds(hi - lo, workers)], send, f"{split} evaluation", say,
                after_loss=forget, wedged_after=False))
        finally:
            for actor in actors:
                ray.kill(actor)
