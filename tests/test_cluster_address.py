"""Which Ray cluster a command runs on: the one `--address` names, else the one the environment's
RAY_ADDRESS names (as Ray itself does; `ray job submit` sets it for a job's command), else a new
local one. Real processes and a real cluster: the session's local one (`ray_local`) is the
"existing cluster" a command joins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "reptile_dist.cli"]
UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens there
TINY_RAY_RUN = ["train", "--config", "sine", "--backend", "ray", "--workers", "1", "--mode", "sync", "--no-progress",
                "--set", "meta_iters=4", "--set", "eval_every=0", "--set", "checkpoint_every=0",
                "--set", "eval_tasks=4", "--set", "torch_threads=1"]


def cli(args: list[str], ray_address: str | None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout,
                          env={**env, "PYTHONWARNINGS": "ignore"})


def test_an_unreachable_ray_address_in_the_environment_is_one_line_naming_it(tmp_path):
    result = cli(TINY_RAY_RUN + ["--out", str(tmp_path / "run")], UNREACHABLE)
    err = result.stderr.strip()
    assert result.returncode == 2, err[-2000:]
    assert err.count("\n") == 0 and f"cannot reach the Ray cluster at '{UNREACHABLE}' (RAY_ADDRESS)" in err, err
    assert not (tmp_path / "run").exists()  # an unreachable cluster leaves no run folder


@pytest.mark.parametrize("flag, env, expected", [
    (None, None, (None, "--address")),
    ("auto", None, ("auto", "--address")),
    (None, "10.0.0.5:6379", ("10.0.0.5:6379", "RAY_ADDRESS")),
    ("ray://head:10001", "10.0.0.5:6379", ("ray://head:10001", "--address")),
    (None, "local", (None, "RAY_ADDRESS")),  # Ray's word for a new local cluster
    ("local", "10.0.0.5:6379", (None, "--address")),
    (None, "", (None, "--address")),
    ("10.0.0.5:6379/", None, ("10.0.0.5:6379", "--address")),  # pasted as a URL: Ray would dial the "/"
    (None, "ray://head:10001/", ("ray://head:10001", "RAY_ADDRESS")),
])
def test_the_cluster_is_the_flags_else_the_environments_else_a_new_local_one(monkeypatch, flag, env, expected):
    from reptile_dist.engine.cluster import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert cluster_address(flag) == expected


def test_a_dashboard_address_is_one_line_naming_the_addresses_that_join(tmp_path):
    result = cli(TINY_RAY_RUN + ["--out", str(tmp_path / "run")], "http://127.0.0.1:8265")
    err = result.stderr.strip()
    assert result.returncode == 2 and err.count("\n") == 0, err[-2000:]
    assert "RAY_ADDRESS 'http://127.0.0.1:8265' is a dashboard (Jobs API) address" in err and "HOST:6379" in err


def test_an_explicit_address_wins_over_the_environments(tmp_path):
    result = cli(TINY_RAY_RUN + ["--address", "127.0.0.1:7", "--out", str(tmp_path / "run")], UNREACHABLE)
    assert result.returncode == 2 and "at '127.0.0.1:7' (--address or the config's address:)" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # a Ray run in a second process, joining this session's cluster
def test_a_command_joins_the_cluster_ray_address_names(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    result = cli(TINY_RAY_RUN + ["--out", str(tmp_path / "run")], address)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in result.stderr, result.stderr[-3000:]
    assert "Started a local Ray instance" not in result.stderr
    assert (tmp_path / "run" / "final.pt").exists()


@pytest.mark.slow  # starts a Ray instance in a second process
def test_the_local_cluster_is_a_new_one_even_where_ray_address_is_set():
    # The tests' own cluster, and every command without an address where RAY_ADDRESS is unset or
    # "local", start through start_local_ray; ray.init alone would try to join RAY_ADDRESS's cluster.
    code = ("import ray\n"
            "from reptile_dist.engine.cluster import start_local_ray\n"
            "start_local_ray(num_cpus=1, log_to_driver=False)\n"
            "print('cpus', ray.cluster_resources()['CPU'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": UNREACHABLE})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpus 1.0" in result.stdout


def test_an_address_from_the_config_wins_over_the_environments_and_is_named(tmp_path):
    # the `address:` knob (--address sets it too), here from --set, wins over RAY_ADDRESS
    result = cli(TINY_RAY_RUN + ["--set", "address=127.0.0.1:7", "--out", str(tmp_path / "run")], UNREACHABLE)
    err = result.stderr.strip()
    assert result.returncode == 2 and err.count("\n") == 0, err[-2000:]
    assert "cannot reach the Ray cluster at '127.0.0.1:7' (--address or the config's address:)" in err, err


def test_a_bracketed_ipv6_address_is_dialled_without_its_brackets():
    import socket

    from reptile_dist.engine.cluster import ClusterError, check_reachable

    with socket.socket(socket.AF_INET6) as server:
        try:
            server.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"[::1]:{port}")  # reaches the listener: no error
        check_reachable(f"ray://[::1]:{port}")
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at '\[::1\]:\d+' \(--address\)"):
        check_reachable(f"[::1]:{port}", timeout_s=1.0)
