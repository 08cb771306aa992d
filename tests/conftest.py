"""Shared fixtures: real files, real local Ray, small sizes."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (start-up costs ~2 s)."""
    import ray

    from reptile_dist.engine.cluster import NAMESPACE

    ray.init(num_cpus=4, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny(name: str, **overrides):
    """A preset shrunk to test size."""
    from reptile_dist.config import load_config

    base = dict(eval_tasks=20, eval_tasks_periodic=10, eval_every=0, log_every=2, checkpoint_every=0, torch_threads=1)
    base.update(overrides)
    return load_config(name, base)
