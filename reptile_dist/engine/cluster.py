"""Joining or starting a Ray cluster, and what the engine asks of it.

What the engine asks is one list of placement-group bundles (`placement_bundles`); the driver's
placement group, a sweep trial's and the size of a local cluster are all derived from it.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import ray

from reptile_dist.config import Config
from reptile_dist.errors import UserError
from reptile_dist.plugins import Plugins
from reptile_dist.training import RunSetup, finished_run, prepare_run, setup_run

HEAD_RESOURCE = "reptile_head"  # advertised by the head node in cluster/ configs
HEAD_SHARE = 0.01  # a token amount of HEAD_RESOURCE: it only pins a bundle to the head node
NAMESPACE = "reptile-dist"
# Objects up to this size travel inside the call's own message instead of through the object store
# (Ray's default: 100 KiB). A push of the Omniglot nets (2 x 113k-117k float64 with the carried
# estimate, 1.8 MB) and theta in its answer then cost one message each way instead of a store
# object created, sealed, fetched and released on both sides; one parameter server took about
# 1.2-1.4x the deltas/s this way side by side on one node (README "Parameter-server capacity").
# Larger nets still go through the store. A Ray setting of the whole cluster: a local cluster gets it
# here, a cluster/ config passes the same value to the head's `ray start --system-config`.
INLINE_OBJECT_BYTES = 4 * 1024 * 1024
SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_OBJECT_BYTES}


class ClusterError(UserError):
    """The Ray cluster could not be reached or cannot host the run (a user-facing, one-line error)."""


def check_reachable(address: str, source: str = "--address", timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address that does not answer.
    `source`: where the address came from, for the message."""
    if address == "auto":
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"{source} {address!r} is a dashboard (Jobs API) address, which `ray job submit` takes; "
                           "join the cluster at its HOST:6379, ray://HOST:10001 or 'auto'")
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]:PORT
    if not host or not port.isdigit():
        raise ClusterError(f"{source} {address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({source}): {exc.strerror or exc}") from None


def cluster_address(address: str | None, source: str = "--address") -> tuple[str | None, str]:
    """(the cluster a command joins, where that came from): `address` (from `source`), else the
    environment's RAY_ADDRESS; None, and Ray's "local", for a new local cluster. A trailing "/"
    (an address pasted as a URL) is dropped: Ray would keep it in the address it dials."""
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    address = address.rstrip("/") if address else address
    return (None if address in (None, "", "local") else address), source


@contextmanager
def ray_session(address: str | None, num_cpus: int, include_dashboard: bool = False,
                source: str = "--address") -> Iterator[None]:
    """Join `address` (`source`: where it came from, for messages), else the cluster that the
    environment's RAY_ADDRESS names (as Ray itself does; `ray job submit` sets it for a job's
    command), else start a local cluster in-process that advertises `num_cpus` logical CPUs; shut
    down at the end. Inside a running session (a Tune trial, a caller's), use that one."""
    if ray.is_initialized():
        yield  # leave it running: it is not ours
        return
    address, source = cluster_address(address, source)
    if address:
        check_reachable(address, source)
    try:
        with own_sigterm_handler():
            if address:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
            else:
                start_local_ray(num_cpus, include_dashboard)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({source}): "
                           f"{str(exc).splitlines()[0]}") from None
    except BaseException:  # Ctrl-C or SIGTERM while Ray starts: leave no half-started cluster behind
        ray.shutdown()
        raise
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def own_sigterm_handler() -> Iterator[None]:
    """ray.init puts its own SIGTERM handler in the driver (it prints a native stack and ends the
    process at once); a Python handler the program had (the CLI's: stop as Ctrl-C does, with the
    clean-up and the checkpoint message), or an ignored SIGTERM, is put back after it."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before) or before == signal.SIG_IGN:
            signal.signal(signal.SIGTERM, before)


def start_local_ray(num_cpus: int, include_dashboard: bool = False, log_to_driver: bool = True) -> None:
    """A local Ray cluster in this process, with the engine's namespace and system settings (the
    one place a local cluster is started, for runs, sweeps, the bench and the tests alike). A new
    one even where RAY_ADDRESS is set, which ray.init alone would join."""
    ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=include_dashboard,
             log_to_driver=log_to_driver,
             _system_config=dict(SYSTEM_CONFIG))  # a copy: Ray adds its own keys to the dict it is given


def local_cluster_cpus(cpus_needed: Callable[[bool], float]) -> int:
    """Logical CPUs for a local cluster: the machine's cores, or more when `cpus_needed(cluster_has_gpus)`
    asks for more. Ray finds the machine's GPUs only when it starts, so the larger of the two cases
    counts. The parameter server and evaluator mostly wait, so oversubscribing the cores is intended."""
    return max(os.cpu_count() or 1, math.ceil(max(cpus_needed(False), cpus_needed(True))))


def ray_cluster(cfg: Config, address: str | None, source: str = "--address"):
    """`ray_session` for one run; a local cluster has room for the run's placement group. Ray
    Train's placement-group cleaner polls the state API, which the dashboard serves (on
    127.0.0.1); without it, it logs a warning every second of an allreduce run."""
    cpus = local_cluster_cpus(lambda cluster_has_gpus: bundle_cpus(placement_bundles(cfg, cluster_has_gpus)))
    return ray_session(address, cpus, include_dashboard=cfg.mode == "allreduce", source=source)


def run_on_cluster(cfg: Config, out: str, address: str | None, resume: bool, say: Callable[[str], None],
                   plugins: Plugins | None, fit: Callable[[RunSetup], dict]) -> dict:
    """What every engine does around its training: the summary of a finished run asked to resume;
    else the family and network built and checked before Ray starts, the run directory claimed
    once the cluster is there (an unreachable one leaves no folder), `fit(run_setup)`, the folder
    released."""
    finished = finished_run(out, resume, say)
    if finished is not None:
        return finished
    prepared = prepare_run(cfg, plugins)
    # The CLI's --address arrives as the config's address: (it sets that knob).
    source = "--address" if address or not cfg.address else "--address or the config's address:"
    with ray_cluster(cfg, address or cfg.address or None, source):
        s = setup_run(cfg, out, resume, say, prepared)
        try:
            return fit(s)
        finally:
            s.run.release()


def placement_bundles(cfg: Config, cluster_has_gpus: bool, head_node: bool = False) -> list[dict[str, float]]:
    """The engine's bundles on a cluster with or without GPUs and a head node (cluster/ configs).

    Bundle 0: the parameter server and evaluator, sharing one CPU, on the head node when there is
    one. Bundles 1..W: one adapt worker each, with `gpus_per_worker` GPUs and one CPU when the
    cluster has GPUs (and the config asks for them), else `cpus_per_worker` CPUs.
    """
    server = {"CPU": 1.0, **head_pin(head_node)}
    if cluster_has_gpus and cfg.gpus_per_worker > 0:
        worker = {"CPU": 1.0, "GPU": cfg.gpus_per_worker}
    else:
        worker = {"CPU": cfg.cpus_per_worker}
    return [server] + [dict(worker) for _ in range(cfg.workers)]


def head_pin(head_node: bool) -> dict[str, float]:
    return {HEAD_RESOURCE: HEAD_SHARE} if head_node else {}


def bundle_cpus(bundles: list[dict[str, float]]) -> float:
    return sum(bundle.get("CPU", 0.0) for bundle in bundles)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_has_head_node() -> bool:
    return ray.cluster_resources().get(HEAD_RESOURCE, 0) > 0


def engine_bundles(cfg: Config) -> list[dict[str, float]]:
    """The engine's bundles on the running cluster (see `placement_bundles`)."""
    return placement_bundles(cfg, cluster_gpus() > 0, cluster_has_head_node())


def worker_resources(cfg: Config) -> dict[str, float]:
    """One adapt worker's share of the running cluster (Ray Train's workers in an allreduce run)."""
    return engine_bundles(cfg)[1]
