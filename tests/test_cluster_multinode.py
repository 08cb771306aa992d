"""End to end on a real multi-node cluster: `cluster/local.sh up 1` (a head and one worker node,
token auth on), `ray job submit` of a short sine run with two workers, then the run directory
and Ray's state API.

The cluster gets its own temp dir and ports, so it runs beside the default local.sh cluster and
a test suite's ray.init(); `down` stops only its processes, by PID.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

# Brings up a two-node cluster and submits a job to it. One xdist group: under `make test` (two
# pytest processes, --dist loadgroup) every test here runs in the process that set the cluster up.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two-node-cluster")]

LOCAL_SH = REPO / "cluster" / "local.sh"
BIN = Path(sys.executable).parent  # local.sh uses the ray of .venv too, and puts it first on PATH
UP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300  # the job takes 23-36 s on a loaded 2-core machine


def free_port(taken: set[int], span: int = 1) -> int:
    """A port p with p..p+span-1 free and not in `taken` (then added). Below Linux's ephemeral
    range (32768+) and above the worker ports `ray start` hands out (10002-19999), where Ray's own
    random ports do not land."""
    for _ in range(200):
        port = random.randrange(20000, 32000 - span)
        if taken & set(range(port, port + span)):
            continue
        try:
            for p in range(port, port + span):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", p))
        except OSError:
            continue
        taken.update(range(port, port + span))
        return port
    raise RuntimeError("no free port found in 20000-32000")


def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def ray_list(kind: str, cluster: dict, *filters: str) -> list[dict]:
    """Ray's state API (through the dashboard), as JSON."""
    cmd = [str(BIN / "ray"), "list", kind, "--address", cluster["dashboard"], "--detail", "--format", "json"]
    for f in filters:
        cmd += ["--filter", f]
    result = run(cmd, cluster["env"], 60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def cluster_processes(temp_dir: str) -> list[str]:
    """The command lines naming the cluster's temp dir, read at full width: its daemons (gcs_server,
    raylets, dashboard, monitors). Ray's workers rename themselves (ray::IDLE) and are not among
    them; they exit with their raylet."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in ps.splitlines() if temp_dir in line]


def the_only_process_with_the_cluster(request, tmp_path_factory) -> None:
    """Fails where another pytest process of this run also set the cluster up: the xdist group did
    not keep this module's tests together (pytest-dev/pytest-xdist#1386, under pytest 9.2), and each
    process would start, and wait on, a cluster of its own."""
    workerinput = getattr(request.config, "workerinput", None)  # set in pytest-xdist's workers only
    if workerinput is None:  # one pytest process
        return
    worker_id = workerinput["workerid"]
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each process's own
    mine = shared / f"two-node-cluster-{worker_id}"
    mine.touch()
    others = sorted(p.name.rsplit("-", 1)[1] for p in shared.glob("two-node-cluster-*") if p != mine)
    if others:
        pytest.fail(f"the two-node cluster's tests ran in {worker_id} and {', '.join(others)}: --dist loadgroup "
                    "did not group them (pytest-xdist#1386; pyproject.toml keeps pytest below 9.2)", pytrace=False)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    from ray._private.utils import get_dashboard_dependency_error

    the_only_process_with_the_cluster(request, tmp_path_factory)

    missing = get_dashboard_dependency_error()
    if missing is not None:
        pytest.fail(f"job submission needs ray[default] (dashboard + job server): {missing}; "
                    "run `.venv/bin/pip install -e '.[test]'`", pytrace=False)
    for program in ("ray", "reptile-dist"):
        if not (BIN / program).is_file():
            pytest.fail(f"{BIN / program} missing: the job runs the programs installed beside ray", pytrace=False)

    # A short path: Ray's sockets live under the temp dir and unix socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rd-multinode-", dir="/tmp")
    taken: set[int] = set()
    ports = {"REPTILE_RAY_PORT": free_port(taken), "REPTILE_DASHBOARD_PORT": free_port(taken),
             "REPTILE_RAY_CLIENT_PORT": free_port(taken), "REPTILE_AGENT_PORT": free_port(taken, span=2)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job API address is explicit
    # COLUMNS: a narrow terminal's width (pytest-xdist's workers had 80 in their environment here; a
    # plain pytest process had none), which `ps` cuts lines at unless told not to; local.sh must
    # still find its processes.
    env.update({k: str(v) for k, v in ports.items()}, REPTILE_RAY_TEMP_DIR=temp_dir, RAY_AUTH_MODE="token",
               COLUMNS="80")
    try:
        up = run([str(LOCAL_SH), "up", "1"], env, UP_TIMEOUT_S)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['REPTILE_DASHBOARD_PORT']}",
               "dashboard_port": ports["REPTILE_DASHBOARD_PORT"], "up": up.stdout}
    finally:
        try:
            down = run([str(LOCAL_SH), "down"], env, 60)
        except subprocess.TimeoutExpired as exc:
            down = subprocess.CompletedProcess(exc.cmd, -1, exc.stdout or "", f"timed out after {exc.timeout} s")
        left = cluster_processes(temp_dir)
        for line in left:  # not left running for the rest of the suite (and the machine)
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert down.returncode == 0, f"local.sh down failed:\n{down.stdout}\n{down.stderr}"
        assert not left, f"local.sh down left {len(left)} of the cluster's processes running:\n{down.stdout}\n" + \
            "\n".join(left)


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """The README's job command, shrunk: the sine preset, W=2, sync."""
    out = tmp_path_factory.mktemp("multinode") / "sine-job"  # absolute: the job runs in an unpacked copy
    submission_id = f"reptile-multinode-{os.getpid()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", submission_id,
           "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", str(REPO), "--",
           "reptile-dist", "train", "--config", "sine", "--backend", "ray", "--workers", "2", "--mode", "sync",
           "--address", "auto", "--no-progress", "--out", str(out),
           # The capacities alone force one worker per node: the head's 2 CPUs hold the PS bundle
           # and one worker, the worker node's 1 CPU the other. SPREAD says so explicitly, so that
           # a bigger head (REPTILE_HEAD_CPUS) cannot quietly take both workers as PACK would.
           "--set", "placement=SPREAD",
           "--set", "meta_iters=20", "--set", "log_every=5", "--set", "checkpoint_every=10",
           "--set", "eval_every=10", "--set", "eval_tasks_periodic=10", "--set", "eval_tasks=20",
           "--set", "torch_threads=1"]
    submit = run(cmd, cluster["env"], JOB_TIMEOUT_S)
    return {"submit": submit, "out": out, "record": ray_list("jobs", cluster, f"submission_id={submission_id}")}


def test_the_head_serves_the_job_api_on_localhost_only(cluster):
    nodes = ray_list("nodes", cluster)
    head_ip = next(n["node_ip"] for n in nodes if n["is_head_node"])
    assert head_ip not in {"127.0.0.1", "localhost"}  # else this check would prove nothing
    with pytest.raises(OSError):
        socket.create_connection((head_ip, cluster["dashboard_port"]), timeout=5).close()


def test_job_succeeds_and_leaves_a_complete_run_directory(job):
    submit = job["submit"]
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout[-4000:]}\n{submit.stderr[-4000:]}"
    assert [j["status"] for j in job["record"]] == ["SUCCEEDED"], job["record"]  # Ray's record agrees
    out = job["out"]
    for name in ("config.yaml", "metrics.parquet", "final.pt", "summary.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert list((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["mode"] == "sync" and summary["workers"] == 2
    assert summary["meta_iters"] == 20 and math.isfinite(summary["test_loss"])


def test_the_two_workers_ran_on_the_two_nodes(cluster, job):
    assert job["submit"].returncode == 0, "the job failed; see test_job_succeeds_and_leaves_a_complete_run_directory"
    summary = json.loads((job["out"] / "summary.json").read_text())
    nodes = ray_list("nodes", cluster)
    alive = {n["node_id"] for n in nodes if n["state"] == "ALIVE"}
    assert len(alive) == 2, nodes
    # The run's own record (each worker's node, from its runtime context; no replacements) ...
    assert summary["workers_replaced"] == 0
    assert set(summary["worker_nodes"]) == alive
    # ... and Ray's: the job's two AdaptWorker actors (dead now, killed at the end of the run).
    workers = ray_list("actors", cluster, "class_name=AdaptWorker")
    assert len(workers) == 2, workers
    assert {a["node_id"] for a in workers} == alive
