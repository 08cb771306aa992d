"""One trial's placement group: a small bundle for the trial itself, then the engine's bundles.

    trial PG = [trial, TRIAL_CPU] + placement_bundles(cfg)   (the driver uses bundle offset 1)

Both the trial (trainable.py) and the sweep's estimate of a trial's size (spec.py) count from here.
"""
from __future__ import annotations

from reptile_dist.config import Config
from reptile_dist.engine.cluster import head_pin, placement_bundles

TRIAL_CPU = 0.01  # the trial's own actor only runs the driver loop


def trial_bundles(cfg: Config, cluster_has_gpus: bool, head_node: bool = False) -> list[dict[str, float]]:
    """Bundle 0: the trial (the engine's driver, on the head node when there is one); then the engine's."""
    return [{"CPU": TRIAL_CPU, **head_pin(head_node)}] + placement_bundles(cfg, cluster_has_gpus, head_node)
