"""A held-out evaluation spread over Ray actors (`reptile-dist eval --workers N`, `rd.evaluate(...,
workers=N)`): each actor scores a contiguous shard of the seeded tasks, so the result equals the
one-process evaluation's task for task (on the same kind of device, and for a network that draws
no random numbers while it predicts: dropout's draws depend on where a shard starts)."""
from __future__ import annotations

import numpy as np
import ray
from ray.exceptions import GetTimeoutError

from reptile_dist.config import Config
from reptile_dist.engine.adapt_worker import Workspace
from reptile_dist.engine.cluster import (ClusterError, bundle_cpus, local_cluster_cpus, placement_bundles, ray_session,
                                         worker_resources)
from reptile_dist.engine.driver import START_TIMEOUT_S
from reptile_dist.evaluation import TaskScores, combine_scores, shard_bounds
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import InnerMoment


def score_on_ray(cfg: Config, plugins: Plugins, theta: np.ndarray, moment: InnerMoment | None, split: str,
                 tasks: int, workers: int, address: str | None = None, transductive: bool | None = None,
                 on_gpus: bool = False) -> TaskScores:
    """Tasks 0..tasks-1 of `split` scored by `workers` actors on the cluster at `address`, or on a
    local one started for the evaluation (inside a running Ray session, on that). `on_gpus`: each
    actor takes an adapt worker's GPU share where the cluster has GPUs; else a CPU share."""
    cfg = cfg.replace(workers=workers, **({} if on_gpus else {"gpus_per_worker": 0.0}))
    cpus = local_cluster_cpus(lambda has_gpus: bundle_cpus(placement_bundles(cfg, has_gpus)[1:]))
    with ray_session(address, cpus):
        res = worker_resources(cfg)
        shards = shard_bounds(tasks, workers)
        actors = [ray.remote(Workspace).options(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0)).remote(
            cfg.to_dict(), plugins.ship()) for _ in shards]
        try:
            try:
                ray.get([actor.where.remote() for actor in actors], timeout=START_TIMEOUT_S)
            except GetTimeoutError:
                raise ClusterError(f"{len(actors)} evaluation actors of {res} each did not start within "
                                   f"{START_TIMEOUT_S:.0f} s ({ray.available_resources()} available)") from None
            theta_ref = ray.put(theta)
            parts = ray.get([actor.score.remote(theta_ref, split, lo, hi, moment, transductive)
                             for actor, (lo, hi) in zip(actors, shards)])
        finally:
            for actor in actors:
                ray.kill(actor)
    return combine_scores(parts)
