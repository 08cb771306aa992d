"""Joining or starting a Ray cluster, and what the engine asks of it."""
from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager
from typing import Iterator

import ray

from reptile_dist.config import Config

HEAD_RESOURCE = "reptile_head"  # advertised by the head node in cluster/ configs
NAMESPACE = "reptile-dist"


class ClusterError(ValueError):
    """The Ray cluster could not be reached or cannot host the run (a user-facing, one-line error)."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address that does not answer."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from None


def logical_cpus_needed(cfg: Config) -> float:
    return cfg.workers * cfg.cpus_per_worker + 1  # + one for the parameter server and evaluator


@contextmanager
def ray_session(address: str | None, num_cpus: int, include_dashboard: bool = False) -> Iterator[None]:
    """Join `address`, or start a local cluster in-process that advertises `num_cpus` logical CPUs
    and shut it down at the end; inside a running session (a Tune trial, a caller's), use it."""
    if ray.is_initialized():
        yield  # leave it running: it is not ours
        return
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=include_dashboard, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def ray_cluster(cfg: Config, address: str | None):
    """`ray_session` for one run. A local cluster advertises at least enough logical CPUs for the
    run's placement group: the parameter server and evaluator mostly wait, so oversubscribing the
    cores is intended. Ray Train's placement-group cleaner polls the state API, which the
    dashboard serves (on 127.0.0.1); without it, it logs a warning every second of an allreduce run."""
    cpus = max(os.cpu_count() or 1, math.ceil(logical_cpus_needed(cfg)))
    return ray_session(address, cpus, include_dashboard=cfg.mode == "allreduce")


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def worker_resources(cfg: Config) -> dict[str, float]:
    """One GPU (or the configured fraction) per worker when the cluster has GPUs, else CPUs."""
    if cfg.gpus_per_worker > 0 and cluster_gpus() > 0:
        return {"CPU": 1.0, "GPU": cfg.gpus_per_worker}
    return {"CPU": cfg.cpus_per_worker}


def server_resources() -> dict[str, float]:
    """The parameter server and evaluator share one CPU, on the head node when it says so."""
    res = {"CPU": 1.0}
    if ray.cluster_resources().get(HEAD_RESOURCE, 0) > 0:
        res[HEAD_RESOURCE] = 0.01
    return res


def engine_bundles(cfg: Config) -> list[dict[str, float]]:
    """Bundle 0: parameter server + evaluator; bundles 1..W: one adapt worker each."""
    return [server_resources()] + [worker_resources(cfg) for _ in range(cfg.workers)]
