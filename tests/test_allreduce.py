"""`--mode allreduce` (Ray Train worker group, no parameter server) on a real local Ray cluster."""
import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny
from reptile_dist.engine.driver import train_ray
from reptile_dist.local import train_local
from reptile_dist.rundir import load_checkpoint

pytestmark = pytest.mark.slow  # every test starts a Ray Train worker group (13-40 s of start-up alone)

quiet = dict(progress=False, say=lambda m: None)


def _params(out):
    state = load_checkpoint(str(out / "final.pt"))["model_state"]
    return torch.cat([v.flatten() for v in state.values()])


def test_allreduce_with_two_workers_equals_the_local_trainer(ray_local, tmp_path):
    # Carried inner state, so the estimates' sums ride the all-reduce too (the other tests here run fresh),
    # and the Nesterov outer step, whose momentum every rank keeps alike.
    cfg = tiny("synthetic", meta_iters=5, inner_state="carried", outer_optimizer="nesterov", meta_step_size=0.7,
               meta_step_size_final=0.0)
    train_local(cfg, str(tmp_path / "local"), **quiet)
    summary = train_ray(cfg.replace(backend="ray", mode="allreduce", workers=2), str(tmp_path / "allreduce"), **quiet)
    local, allreduce = _params(tmp_path / "local"), _params(tmp_path / "allreduce")
    assert not torch.equal(local, _initial(cfg))  # it did train
    assert torch.allclose(local, allreduce, atol=1e-6)
    a, b = (load_checkpoint(str(tmp_path / run / "final.pt"))["inner_moment"] for run in ("local", "allreduce"))
    assert a["steps"] == b["steps"] == 5 * cfg.inner_steps
    assert torch.allclose(a["sq"], b["sq"], rtol=1e-5, atol=1e-12)
    assert summary["mode"] == "allreduce" and summary["workers"] == 2 and summary["worker_devices"] == ["cpu"]


def _initial(cfg):
    from reptile_dist.plugins import build_family
    from reptile_dist.training import make_learner

    return make_learner(cfg, build_family(cfg)).initial_theta()


def test_an_allreduce_sine_run_directory_is_complete_and_eval_reads_it(ray_local, tmp_path, capsys):
    from reptile_dist.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", "sine", "--backend", "ray", "--mode", "allreduce", "--workers", "2",
                 "--out", str(out), "--no-progress", "--set", "meta_iters=4", "--set", "checkpoint_every=2",
                 "--set", "log_every=2", "--set", "eval_every=4", "--set", "eval_tasks=20",
                 "--set", "eval_tasks_periodic=10", "--set", "torch_threads=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml", "final.pt", "metrics.jsonl",
                                                     "metrics.parquet", "run.json", "summary.json",
                                                     "tensorboard"]  # Ray Train's own storage is removed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["eval_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "allreduce" and summary["eval_tasks"] == 20 and summary["before_loss"] > 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", "5"]) == 0
    assert "query MSE" in capsys.readouterr().out


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint_with_the_same_result(ray_local, tmp_path):
    cfg = tiny("synthetic", meta_iters=20, checkpoint_every=2, log_every=2)
    train_local(cfg, str(tmp_path / "local"), **quiet)
    result = {}
    out = tmp_path / "allreduce"
    run = threading.Thread(target=lambda: result.update(
        train_ray(cfg.replace(backend="ray", mode="allreduce", workers=2), str(out), **quiet)))
    run.start()
    deadline = time.time() + 240
    # Rank 0 writes the run directory's checkpoint just before reporting Ray Train's, and the
    # controller registers reports as it polls: by step 8 an earlier one is registered.
    while not (out / "checkpoints" / "ckpt-00000008.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = [p for p in _descendants(os.getpid()) if b"RayTrainWorker" in _cmdline(p)]
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    run.join(timeout=300)
    assert result, "the run did not finish"
    assert result["restored_from_step"] is not None and 2 <= result["restored_from_step"] < 20
    assert torch.equal(_params(tmp_path / "local"), _params(out))
    assert [r["step"] for r in pq.read_table(out / "metrics.parquet").to_pylist()] == list(range(2, 21, 2))


def _descendants(pid):
    """Processes under pid (the Ray cluster this test session started), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.slow  # starts Ray Train
def test_allreduce_stops_with_one_line_when_every_update_is_rejected(ray_local, tmp_path):
    from reptile_dist.errors import RunFailed

    # An inner step size this large overflows within a step: every later sum is NaN or Inf.
    cfg = tiny("synthetic", meta_iters=30, checkpoint_every=1, keep_checkpoints=2, inner_optimizer="sgd",
               inner_lr=1e30, max_rejected_updates=3)
    out = tmp_path / "run"
    with pytest.raises(RunFailed, match="rejected for 3 meta-steps in a row|no longer finite"):
        train_ray(cfg.replace(backend="ray", mode="allreduce", workers=2), str(out), **quiet)
    for path in (out / "checkpoints").iterdir():
        assert torch.isfinite(load_checkpoint(str(path))["outer"]["theta"]).all()
    assert not (out / "final.pt").exists()
