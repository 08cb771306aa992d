"""A held-out evaluation spread over Ray actors (`reptile-dist eval --workers N`, `rd.evaluate(...,
workers=N)`): each actor scores a contiguous shard of the seeded tasks, so the result equals the
one-process evaluation's, task for task."""
from __future__ import annotations

import numpy as np
import ray

from reptile_dist.config import Config
from reptile_dist.engine.adapt_worker import Workspace
from reptile_dist.engine.cluster import bundle_cpus, local_cluster_cpus, placement_bundles, ray_session, worker_resources
from reptile_dist.evaluation import TaskScores, combine_scores, shard_bounds
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import InnerMoment


def score_on_ray(cfg: Config, plugins: Plugins, theta: np.ndarray, moment: InnerMoment | None, split: str,
                 tasks: int, workers: int, address: str | None = None,
                 transductive: bool | None = None) -> TaskScores:
    """Tasks 0..tasks-1 of `split` scored by `workers` actors (each with an adapt worker's share of
    the cluster: a GPU where it has them) on the cluster at `address`, or on a local one started
    for the evaluation; inside a running Ray session, on that."""
    cfg = cfg.replace(workers=workers)
    cpus = local_cluster_cpus(lambda has_gpus: bundle_cpus(placement_bundles(cfg, has_gpus)[1:]))
    with ray_session(address, cpus):
        res = worker_resources(cfg)
        shards = shard_bounds(tasks, workers)
        actors = [ray.remote(Workspace).options(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0)).remote(
            cfg.to_dict(), plugins.ship()) for _ in shards]
        try:
            theta_ref = ray.put(theta)
            parts = ray.get([actor.score.remote(theta_ref, split, lo, hi, moment, transductive)
                             for actor, (lo, hi) in zip(actors, shards)])
        finally:
            for actor in actors:
                ray.kill(actor)
    return combine_scores(parts)
