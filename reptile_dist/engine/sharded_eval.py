"""A held-out evaluation spread over Ray actors (`reptile-dist eval --workers N`, `rd.evaluate(...,
workers=N)`): each actor scores a contiguous shard of the seeded tasks, so the result equals the
one-process evaluation's task for task (on the same kind of device, and for a network that draws
no random numbers while it predicts: dropout's draws depend on where a shard starts). A shard
whose actor dies is scored again on a new one."""
from __future__ import annotations

import sys
import uuid
from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayActorError

from reptile_dist.config import Config
from reptile_dist.engine.adapt_worker import Workspace
from reptile_dist.engine.cluster import (ClusterError, bundle_cpus, local_cluster_cpus, placement_bundles, ray_session,
                                         worker_resources)
from reptile_dist.engine.driver import FINAL_EVAL_ATTEMPTS, START_TIMEOUT_S
from reptile_dist.errors import RunFailed
from reptile_dist.evaluation import TaskScores, combine_scores, shard_bounds
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import InnerMoment

ACTOR_PREFIX = "eval-"  # eval-<run id>-<n>: named, so a drill (or a test) can find and kill one


def score_on_ray(cfg: Config, plugins: Plugins, theta: np.ndarray, moment: InnerMoment | None, split: str,
                 tasks: int, workers: int, address: str | None = None, transductive: bool | None = None,
                 on_gpus: bool = False, say: Callable[[str], None] | None = None) -> TaskScores:
    """Tasks 0..tasks-1 of `split` scored by `workers` actors on the cluster at `address`, or on a
    local one started for the evaluation (inside a running Ray session, on that). `on_gpus`: each
    actor takes an adapt worker's GPU share where the cluster has GPUs; else a CPU share."""
    say = say or (lambda message: print(message, file=sys.stderr))
    cfg = cfg.replace(workers=workers, **({} if on_gpus else {"gpus_per_worker": 0.0}))
    cpus = local_cluster_cpus(lambda has_gpus: bundle_cpus(placement_bundles(cfg, has_gpus)[1:]))
    with ray_session(address, cpus):
        res = worker_resources(cfg)
        run_id, actors = uuid.uuid4().hex[:8], []

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

        try:
            theta_ref, parts, pending = ray.put(theta), {}, shard_bounds(tasks, workers)
            for _ in range(FINAL_EVAL_ATTEMPTS):
                sent = {actor.score.remote(theta_ref, split, lo, hi, moment, transductive): (lo, hi)
                        for actor, (lo, hi) in zip(started(len(pending)), pending)}
                lost = []
                for ref, (lo, hi) in sent.items():
                    try:
                        parts[lo] = ray.get(ref)
                    except RayActorError:
                        lost.append((lo, hi))
                if not lost:
                    return combine_scores(parts[lo] for lo in sorted(parts))
                say(f"warning: {sum(hi - lo for lo, hi in lost)} of {tasks} evaluation tasks were lost with their "
                    "actor; scoring them again on a new one")
                pending = lost
            raise RunFailed(f"evaluation tasks {pending[0][0]}-{pending[0][1]} were lost with their actor "
                            f"{FINAL_EVAL_ATTEMPTS} times")
        finally:
            for actor in actors:
                ray.kill(actor)
