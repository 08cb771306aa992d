"""A run survives dead workers, a dead parameter server and interruption; bad input ends in one
line and exit code 2. Real local Ray, real processes."""
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch

from conftest import in_thread, named_actor, tiny
from reptile_dist.engine.driver import train_ray
from reptile_dist.local import train_local
from reptile_dist.rundir import load_checkpoint

quiet = dict(progress=False, say=lambda m: None)
CLI = [sys.executable, "-m", "reptile_dist.cli"]


def _params(out):
    state = load_checkpoint(str(out / "final.pt"))["model_state"]
    return torch.cat([v.flatten() for v in state.values()])


def _wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_worker_is_replaced_and_the_run_completes(ray_local, tmp_path, mode):
    cfg = tiny("sine", meta_iters=150, log_every=10, checkpoint_every=25).replace(backend="ray", mode=mode, workers=2)
    out = tmp_path / "run"
    thread, outcome = in_thread(lambda: train_ray(cfg, str(out), **quiet))
    _wait_for(out / "checkpoints" / "ckpt-00000025.pt")
    ray.kill(named_actor("worker-"))
    thread.join(timeout=180)
    assert "value" in outcome, outcome
    assert outcome["value"]["workers_replaced"] == 1
    assert torch.isfinite(_params(out)).all()
    events = [r["event"] for r in pq.read_table(out / "metrics.parquet").to_pylist() if r.get("event")]
    assert any("replaced" in e for e in events)


def test_a_killed_parameter_server_is_restored_from_the_last_checkpoint(ray_local, tmp_path):
    every = 20
    cfg = tiny("sine", meta_iters=120, log_every=10, checkpoint_every=every)
    out = tmp_path / "run"
    thread, outcome = in_thread(lambda: train_ray(cfg.replace(backend="ray", mode="sync", workers=2), str(out), **quiet))
    _wait_for(out / "checkpoints" / f"ckpt-{2 * every:08d}.pt")
    ray.kill(named_actor("ps-"))
    thread.join(timeout=180)
    assert "value" in outcome, outcome
    summary = outcome["value"]
    assert summary["ps_restarts"] == 1
    assert 0 <= summary["redone_steps"] <= every
    # tasks are seeded by step, so the restored run ends exactly where an uninterrupted one does
    train_local(cfg, str(tmp_path / "local"), **quiet)
    assert torch.allclose(_params(out), _params(tmp_path / "local"), atol=1e-6)


def test_resume_after_an_interrupt_equals_the_uninterrupted_sync_run(tmp_path):
    out = tmp_path / "run"
    args = CLI + ["train", "--config", "sine", "--backend", "ray", "--workers", "2", "--mode", "sync", "--no-progress",
                  "--set", "meta_iters=150", "--set", "checkpoint_every=30", "--set", "eval_tasks=10",
                  "--set", "eval_tasks_periodic=10", "--set", "torch_threads=1", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "ckpt-00000060.pt", timeout=240)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) != 0
    assert not (out / "final.pt").exists()
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cfg = tiny("sine", meta_iters=150, checkpoint_every=30, eval_tasks=10)
    train_local(cfg, str(tmp_path / "local"), **quiet)
    assert torch.allclose(_params(out), _params(tmp_path / "local"), atol=1e-6)


def _garbage(path):
    path.write_bytes(b"this is not an arrow file")
    return str(path)


BAD_INPUTS = [
    ("unknown config key", ["--set", "bogus=1"], "unknown config key 'bogus'"),
    ("negative step size", ["--set", "meta_step_size=-1"], "meta_step_size=-1"),
    ("negative inner lr", ["--set", "inner_lr=-0.1"], "inner_lr"),
    ("more ways than classes", ["--config", "synthetic", "--set", "ways=100"], "ways=100 is larger than"),
    ("more shots than images", ["--config", "synthetic", "--set", "shots=25"], "exceed"),
    ("zero workers", ["--backend", "ray", "--workers", "0"], "workers=0"),
    ("missing data file", ["--config", "omniglot-5w1s", "--data", "/nonexistent/omniglot.arrow"], "/nonexistent/omniglot.arrow"),
    ("corrupt data file", ["--config", "omniglot-5w1s", "--data", "{garbage}"], "garbage.arrow"),
    ("unreachable address", ["--backend", "ray", "--address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
    ("folder holds a different run", ["--set", "inner_lr=0.5", "--out", "{existing}"], "different run"),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("existing") / "run"
    train_local(tiny("sine", meta_iters=2), str(out), **quiet)
    return out


@pytest.mark.parametrize("name, args, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, existing_run, name, args, message):
    args = [a.replace("{garbage}", _garbage(tmp_path / "garbage.arrow")).replace("{existing}", str(existing_run))
            for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    before = {p: p.stat().st_mtime_ns for p in existing_run.rglob("*")}
    result = subprocess.run(CLI + ["train", "--config", "sine", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("reptile-dist: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in existing_run.rglob("*")} == before  # nothing already written touched
