"""What the engine asks of a Ray cluster, counted once: a sweep's estimate of a trial and a local
cluster's size agree with the bundles a trial and a run really request, with GPUs and without.
Pure logic: whether the cluster has GPUs is passed in, so no GPU (and no Ray) is needed."""
from __future__ import annotations

import itertools
import math
import os

import pytest

from reptile_dist.config import Config
from reptile_dist.engine.cluster import HEAD_RESOURCE, bundle_cpus, local_cluster_cpus, placement_bundles
from reptile_dist.sweep import parse_sweep
from reptile_dist.sweep.placement import TRIAL_CPU
from reptile_dist.sweep.trainable import trial_resources


def sweep(space: dict, **base_set):
    return parse_sweep({
        "base": {"config": "sine", "set": base_set},
        "space": space,
        "budget": {"num_samples": 1, "meta_iters": 10, "report_every": 5},
    })


def requested_cpus(spec, params: dict, cluster_has_gpus: bool) -> float:
    """Logical CPUs in the placement group a trial with `params` hands to Tune."""
    return trial_resources(spec, params, cluster_has_gpus, head_node=False).required_resources["CPU"]


def test_the_engine_asks_one_cpu_for_the_server_and_cpus_per_worker_for_each_worker_without_gpus():
    cfg = Config(workers=3, cpus_per_worker=0.5, gpus_per_worker=1.0)
    assert placement_bundles(cfg, cluster_has_gpus=False) == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 3


def test_a_gpu_worker_takes_its_gpus_and_one_cpu_and_a_cpu_only_config_ignores_the_gpus():
    assert placement_bundles(Config(workers=2, cpus_per_worker=4.0, gpus_per_worker=0.5), cluster_has_gpus=True) \
        == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.5}] * 2
    assert placement_bundles(Config(workers=2, cpus_per_worker=4.0, gpus_per_worker=0.0), cluster_has_gpus=True) \
        == [{"CPU": 1.0}] + [{"CPU": 4.0}] * 2


def test_on_a_cluster_with_a_head_node_the_server_is_pinned_there_at_no_cpu_cost():
    cfg = Config(workers=2)
    pinned = placement_bundles(cfg, cluster_has_gpus=False, head_node=True)
    assert pinned[0][HEAD_RESOURCE] > 0 and all(HEAD_RESOURCE not in b for b in pinned[1:])
    assert bundle_cpus(pinned) == bundle_cpus(placement_bundles(cfg, cluster_has_gpus=False))


@pytest.mark.parametrize("cluster_has_gpus, expected", [(False, TRIAL_CPU + 1 + 3 * 0.5), (True, TRIAL_CPU + 1 + 3 * 1.0)])
def test_sweep_estimate_equals_what_a_cpu_config_trial_requests(cluster_has_gpus, expected):
    spec = sweep({"meta_step_size": {"choice": [0.1, 1.0]}}, workers=3, cpus_per_worker=0.5, gpus_per_worker=1.0)
    assert requested_cpus(spec, {"meta_step_size": 0.1}, cluster_has_gpus) == pytest.approx(expected)
    assert spec.placement_cpus(cluster_has_gpus) == pytest.approx(expected)


@pytest.mark.parametrize("cluster_has_gpus, expected", [(False, TRIAL_CPU + 1 + 2 * 4.0), (True, TRIAL_CPU + 1 + 2 * 1.0)])
def test_sweep_estimate_equals_what_a_gpu_config_trial_requests(cluster_has_gpus, expected):
    spec = sweep({"meta_step_size": {"choice": [0.1, 1.0]}}, workers=2, cpus_per_worker=4.0, gpus_per_worker=0.5)
    assert requested_cpus(spec, {"meta_step_size": 0.1}, cluster_has_gpus) == pytest.approx(expected)
    assert spec.placement_cpus(cluster_has_gpus) == pytest.approx(expected)


@pytest.mark.parametrize("cluster_has_gpus", [False, True])
def test_sweep_estimate_is_the_largest_trial_over_searched_resources(cluster_has_gpus):
    space = {"workers": [1, 3], "cpus_per_worker": [0.5, 2.0], "gpus_per_worker": [0.0, 1.0]}
    spec = sweep({name: {"choice": values} for name, values in space.items()})
    trials = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    assert spec.placement_cpus(cluster_has_gpus) == pytest.approx(
        max(requested_cpus(spec, params, cluster_has_gpus) for params in trials))


def test_a_local_cluster_fits_the_placement_group_whether_or_not_ray_finds_gpus():
    cores = os.cpu_count() or 1
    assert local_cluster_cpus(lambda cluster_has_gpus: cores + (7.5 if cluster_has_gpus else 2.0)) == math.ceil(cores + 7.5)
    assert local_cluster_cpus(lambda cluster_has_gpus: cores + (2.0 if cluster_has_gpus else 7.5)) == math.ceil(cores + 7.5)
    assert local_cluster_cpus(lambda cluster_has_gpus: 1.0) == cores  # the machine's cores at least
