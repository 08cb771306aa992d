"""Starting the engine's actors, for a run's driver and for the bench alike.

    placement group = [parameter server + evaluator] + W x [adapt worker]

Inside a Tune trial the trial's own placement group already holds these bundles after the
trial's (bundle 0), so the engine's start at offset 1.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from reptile_dist.config import Config
from reptile_dist.engine.adapt_worker import CRASH_FILE_ENV, AdaptWorker, Workspace
from reptile_dist.engine.cluster import ClusterError, engine_bundles
from reptile_dist.engine.parameter_server import PS_CPUS, ParameterServer, concurrency
from reptile_dist.plugins import Plugins
from reptile_dist.training import LoopHooks

PLACEMENT_TIMEOUT_S = 120
START_TIMEOUT_S = 300.0  # a started actor answers where() once placed and its data is loaded
# A worker runs its loop, answers where() and push_log(), and, after the PS was restored, starts a
# new loop while the old one is still finishing.
WORKER_CONCURRENCY = 3


class EngineActors:
    """The placement group of one engine and the actors started in it; `close()` kills them and
    removes the group if this created it."""

    def __init__(self, cfg: Config, hooks: LoopHooks | None = None, plugins: Plugins | None = None):
        self.cfg = cfg
        self.hooks = hooks
        self.plugins = plugins  # None: every actor imports the config's own
        self.run_id = uuid.uuid4().hex[:8]
        self.actors: list = []
        self.bundles = engine_bundles(cfg)
        pg = get_current_placement_group()
        if pg is not None:  # a Tune trial reserved [trial] + engine_bundles for us
            self.pg, self.offset, self.own_pg = pg, 1, False
            return
        pg = placement_group(self.bundles, strategy=cfg.placement)
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise ClusterError(f"the cluster cannot place {len(self.bundles)} bundles {self.bundles} "
                               f"within {PLACEMENT_TIMEOUT_S} s: {ray.available_resources()} available")
        self.pg, self.offset, self.own_pg = pg, 0, True

    def in_bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.offset + index,
                                                placement_group_capture_child_tasks=False)

    def bundle_nodes(self) -> list[str]:
        """The node id of each bundle (0: the parameter server's)."""
        from ray.util.placement_group import placement_group_table

        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        return [nodes[self.offset + i] for i in range(len(self.bundles))]

    def _started(self, actor):
        self.actors.append(actor)
        return actor

    def parameter_server(self, theta: np.ndarray, outer_state: dict | None = None, version: int = 0,
                         applied_tasks: int = 0, generation: int = 1):
        # Half of bundle 0's CPU: the PS mostly waits, and the evaluator takes the other half.
        return self._started(ray.remote(ParameterServer).options(
            name=f"ps-{self.run_id}-{generation}", num_cpus=PS_CPUS, max_concurrency=concurrency(self.cfg),
            scheduling_strategy=self.in_bundle(0),
        ).remote(self.cfg.to_dict(), theta, outer_state, version, applied_tasks))

    def evaluator(self, generation: int = 1):
        return self._started(ray.remote(Workspace).options(
            name=f"evaluator-{self.run_id}-{generation}", num_cpus=0.5, scheduling_strategy=self.in_bundle(0),
        ).remote(self.cfg.to_dict(), self.plugins))

    def worker(self, w: int, generation: int = 0):
        res = self.bundles[1 + w]
        return self._started(ray.remote(AdaptWorker).options(
            name=f"worker-{self.run_id}-{w}" + (f"-r{generation}" if generation else ""),
            max_concurrency=WORKER_CONCURRENCY, num_cpus=res["CPU"], num_gpus=res.get("GPU", 0),
            scheduling_strategy=self.in_bundle(1 + w), **_fault_injection(),
        ).remote(self.cfg.to_dict(), w, self.hooks, self.plugins))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.own_pg:
            remove_placement_group(self.pg)


def _fault_injection() -> dict:
    """Fault injection for tests and drills: a worker process does not see the driver's environment
    (a local Ray started its processes earlier), so the crash file travels in the runtime env."""
    path = os.environ.get(CRASH_FILE_ENV)
    return {"runtime_env": {"env_vars": {CRASH_FILE_ENV: path}}} if path else {}
