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


@pytest.fixture(scope="session")
def omniglot_table(tmp_path_factory) -> Path:
    """The full Omniglot table, prepared once per session from the shared official zips."""
    zips = [SHARED_OMNIGLOT / "images_background.zip", SHARED_OMNIGLOT / "images_evaluation.zip"]
    missing = [str(z) for z in zips if not z.is_file()]
    if missing:
        pytest.fail(f"Omniglot release missing: {', '.join(missing)} (tests need the official zips there)", pytrace=False)
    from reptile_dist.data.omniglot import prepare_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "omniglot.arrow"
    prepare_omniglot(zips, out)
    return out


def named_actor(prefix: str, timeout: float = 60.0):
    """A live actor of this test's run whose name starts with `prefix` (e.g. "worker-", "ps-")."""
    import time

    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        for name in names:
            try:
                return ray.get_actor(name)
            except ValueError:
                pass  # it died between listing and lookup
        time.sleep(0.05)
    raise AssertionError(f"no actor named {prefix}* appeared within {timeout} s")


def in_thread(fn):
    """Run fn() in a thread; returns (thread, result dict with 'value' or 'error')."""
    import threading

    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result
