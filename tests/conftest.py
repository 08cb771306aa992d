"""Shared fixtures: real files, real local Ray, small sizes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from omniglot_fixture import write_release

REPO = Path(__file__).resolve().parents[1]
# The official release is not in the repository (a user downloads it); CI provides it here.
SHARED_OMNIGLOT = Path(os.environ.get("REPTILE_SHARED_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))
# Characters per alphabet of the generated releases. Small: 20 drawers per character, more than 20
# evaluation characters (20-way test tasks) and several alphabets per set (the alphabet split).
# Paper-sized: more than the paper split's 1200 training characters, 2 drawers each to stay fast
# (still more drawings than prepare_omniglot decodes in one process, so its worker pool runs too).
SMALL_RELEASE = {"background": [5, 6, 7, 6], "evaluation": [7, 8, 7]}
PAPER_SIZED_RELEASE = {"background": [70] * 10, "evaluation": [65] * 8}


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (start-up costs ~2 s)."""
    import ray

    from reptile_dist.engine.cluster import start_local_ray

    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny(name: str, **overrides):
    """A preset shrunk to test size."""
    from reptile_dist.config import load_config

    base = dict(eval_tasks=10, eval_tasks_periodic=5, eval_every=0, log_every=2, checkpoint_every=0, torch_threads=1)
    base.update(overrides)
    return load_config(name, base)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Each pytest process prepares the full release for itself (about 10 s on 2 busy cores): every
    test that uses it, directly or through another fixture, goes to one xdist group, so that under
    `make test` (--dist loadgroup) one process runs them all."""
    for item in items:
        if "official_omniglot_table" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("official-omniglot"))


@pytest.fixture(scope="session")
def official_omniglot_table(tmp_path_factory) -> Path:
    """The full official Omniglot table, prepared once per session; skips where the release is absent."""
    zips = [SHARED_OMNIGLOT / "images_background.zip", SHARED_OMNIGLOT / "images_evaluation.zip"]
    if not all(z.is_file() for z in zips):
        pytest.skip(f"official Omniglot release not found at {SHARED_OMNIGLOT} "
                    "(images_background.zip, images_evaluation.zip); CI provides it")
    from reptile_dist.data.omniglot import prepare_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "omniglot.arrow"
    prepare_omniglot(zips, out)
    return out


@pytest.fixture(scope="session")
def generated_omniglot_zips(tmp_path_factory) -> list[Path]:
    """images_background.zip and images_evaluation.zip of a small generated release."""
    return write_release(tmp_path_factory.mktemp("generated-omniglot"), SMALL_RELEASE)


@pytest.fixture(scope="session")
def generated_omniglot_table(generated_omniglot_zips, tmp_path_factory) -> Path:
    """The small generated release, prepared by the project's own `prepare_omniglot`."""
    from reptile_dist.data.omniglot import prepare_omniglot

    out = tmp_path_factory.mktemp("generated-table") / "omniglot.arrow"
    prepare_omniglot(generated_omniglot_zips, out)
    return out


@pytest.fixture(scope="session")
def paper_sized_omniglot_table(tmp_path_factory) -> Path:
    """A generated release with enough characters for the paper split, prepared like the others."""
    from reptile_dist.data.omniglot import prepare_omniglot

    folder = tmp_path_factory.mktemp("paper-sized-omniglot")
    out = folder / "omniglot.arrow"
    prepare_omniglot(write_release(folder, PAPER_SIZED_RELEASE, drawers=2), out)
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
