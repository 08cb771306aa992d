"""A run survives dead workers, a dead parameter server and interruption; bad input ends in one
line and exit code 2. Real local Ray, real processes."""
import os
import re
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


@pytest.mark.slow  # a Ray run waited on past a checkpoint: 18-40 s
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


@pytest.mark.slow  # a Ray run waited on past two checkpoints, then a local one: 20-26 s
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


RAY_ACTOR_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")  # a Ray actor's forwarded output


def _signalled_at_first_checkpoint(args: list[str], out, sig, group: bool = False) -> subprocess.Popen:
    """The CLI run `args` (run directory `out`, a checkpoint every 30 steps), sent `sig` once its
    first checkpoint is on disk: early, since on a loaded machine this process may not see the
    checkpoint for a second or more, and the signal must still reach the run before it ends.
    `group`: the run starts its own process group, and the signal goes to all of it (as `timeout`,
    Slurm's scancel and systemd send theirs), Ray's daemons included."""
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group)
    _wait_for(out / "checkpoints" / "ckpt-00000030.pt", timeout=240)
    if group:
        os.killpg(run.pid, sig)
    else:
        run.send_signal(sig)
    return run


@pytest.mark.slow  # two CLI runs, each starting its own Ray
def test_resume_after_an_interrupt_equals_the_uninterrupted_sync_run(tmp_path):
    out = tmp_path / "run"
    args = CLI + ["train", "--config", "sine", "--backend", "ray", "--workers", "2", "--mode", "sync", "--no-progress",
                  "--set", "meta_iters=300", "--set", "checkpoint_every=30", "--set", "eval_tasks=10",
                  "--set", "eval_tasks_periodic=10", "--set", "torch_threads=1", "--out", str(out)]
    first = _signalled_at_first_checkpoint(args, out, signal.SIGINT)
    assert first.wait(timeout=120) != 0, first.stderr.read()[-2000:]
    assert not (out / "final.pt").exists()
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cfg = tiny("sine", meta_iters=300, checkpoint_every=30, eval_tasks=10)
    train_local(cfg, str(tmp_path / "local"), **quiet)
    assert torch.allclose(_params(out), _params(tmp_path / "local"), atol=1e-6)


@pytest.mark.slow  # a CLI run that starts its own Ray
@pytest.mark.parametrize("mode, group", [("sync", False), ("allreduce", False), ("sync", True)],
                         ids=["sync", "allreduce", "sync, its whole process group"])
def test_sigterm_stops_a_run_as_ctrl_c_does_with_one_line_and_its_checkpoint_kept(tmp_path, mode, group):
    """A scheduler's preemption (Slurm, Kubernetes) or `kill`: not Ray's stack dump of the signal
    but the interrupt's way out, exit 143, and the run keeps what it saved; in a parameter-server
    run and in an all-reduce one (Ray Train's own handler takes Ctrl-C, not SIGTERM). Sent to the
    whole process group, it also stops the local cluster's GCS and raylet under the run, whose
    shutdown would then wait a minute for them and end in Ray's abort: cli.TERMINATE_GRACE_S."""
    out = tmp_path / "run"
    args = CLI + ["train", "--config", "sine", "--backend", "ray", "--workers", "1", "--mode", mode, "--no-progress",
                  "--set", "meta_iters=100000", "--set", "checkpoint_every=30", "--set", "eval_every=0",
                  "--set", "eval_tasks=10", "--set", "torch_threads=1", "--out", str(out)]
    run = _signalled_at_first_checkpoint(args, out, signal.SIGTERM, group)
    assert run.wait(timeout=120) == 143
    stderr = run.stderr.read()
    lines = [line for line in stderr.splitlines() if line.startswith("reptile-dist:")]
    assert lines == ["reptile-dist: terminated (SIGTERM); the run directory keeps its last checkpoint"], stderr[-2000:]
    # Ray's own actors' output, forwarded with a "(Name pid=N)" prefix, is not the CLI's: Ray Train's
    # PlacementGroupCleaner prints a traceback when another test's Ray runs on the machine too.
    ours = "\n".join(line for line in stderr.splitlines() if not RAY_ACTOR_LINE.match(line))
    assert "SIGTERM received" not in ours and "Traceback" not in ours, stderr[-2000:]
    assert not (out / "final.pt").exists()
    kept = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert kept and load_checkpoint(str(kept[-1]))


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
    ("folder as config", ["--config", os.path.dirname(os.path.abspath(__file__))], "is a folder"),
    ("config file that is not a mapping", ["--config", "{garbage}"], "expected a mapping"),
    ("out is an existing file", ["--out", "{garbage}"], "garbage.arrow"),
    ("out below an existing file", ["--out", "{garbage}/run"], "garbage.arrow"),
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


BAD_CONFIG_FILES = [
    ("number as data", b"data: 5\n", "data must be a string, got 5"),
    ("list as data", b"data: [a]\n", "data must be a string, got ['a']"),
    ("invalid YAML", b"inner_lr: [\n", "not valid YAML"),
    ("number as key", b"5: x\n", "key 5 is not a name"),
    ("binary file", b"\x89PNG\r\n\x1a\n\xff\xfe", "not valid YAML"),
]


@pytest.mark.parametrize("name, content, message", BAD_CONFIG_FILES, ids=[b[0] for b in BAD_CONFIG_FILES])
def test_a_bad_config_file_gives_one_line_and_exit_code_2(tmp_path, name, content, message):
    config = tmp_path / "mine.yaml"
    config.write_bytes(content)
    result = subprocess.run(CLI + ["train", "--config", str(config), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("reptile-dist: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bug_ends_in_its_traceback_not_in_a_bad_input_line(tmp_path):
    # A plain ValueError from our own code is a bug: Python's traceback and exit code 1, never exit 2.
    code = ("import sys, reptile_dist.cli as cli\n"
            "def broken(args):\n    raise ValueError('a bug in a command')\n"
            "cli.COMMANDS['config'] = broken\nsys.exit(cli.main(['config']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-1500:]
    assert "Traceback" in result.stderr and "ValueError: a bug in a command" in result.stderr
    assert "reptile-dist: error:" not in result.stderr


def _events(out):
    return [r["event"] for r in pq.read_table(out / "metrics.parquet").to_pylist() if r.get("event")]


@pytest.mark.slow  # a Ray run waited on past a checkpoint: 21-30 s
@pytest.mark.parametrize("eval_every", [10, 0], ids=["periodic evaluations", "final evaluation only"])
def test_a_killed_evaluator_is_restarted_and_the_run_ends_with_a_full_evaluation(ray_local, tmp_path, eval_every):
    # With periodic evaluations the loss shows as a lost one; without, as a lost shard of the final one.
    cfg = tiny("sine", meta_iters=150, log_every=10, checkpoint_every=25, eval_every=eval_every, eval_tasks=30)
    out = tmp_path / "run"
    thread, outcome = in_thread(lambda: train_ray(cfg.replace(backend="ray", mode="sync", workers=2), str(out), **quiet))
    _wait_for(out / "checkpoints" / "ckpt-00000025.pt")
    ray.kill(named_actor("evaluator-"))
    thread.join(timeout=180)
    assert "value" in outcome, outcome
    summary = outcome["value"]
    assert summary["eval_tasks"] == 30 and summary["evaluator_restarts"] == 1
    assert any(e.startswith("evaluator restarted") for e in _events(out))


@pytest.mark.slow  # a Ray run, and its resume: ~20 s
def test_the_engines_final_evaluation_keeps_its_tasks_and_a_resume_scores_only_the_missing(ray_local, tmp_path):
    import json

    cfg = tiny("sine", meta_iters=20, eval_tasks=30).replace(backend="ray", mode="sync", workers=2)
    out = tmp_path / "run"
    first = train_ray(cfg, str(out), **quiet)
    header, *tasks = (out / "test-scores.jsonl").read_text().splitlines()
    assert sorted(json.loads(t)["task"] for t in tasks) == list(range(30))
    # as if stopped after 12 tasks, one of them marked: a resume must keep it, not score it again
    rows = sorted((json.loads(t) for t in tasks), key=lambda r: r["task"])
    marked = dict(rows[0], loss=rows[0]["loss"] + 3.0)
    (out / "test-scores.jsonl").write_text("\n".join([header] + [json.dumps(r) for r in [marked] + rows[1:12]]) + "\n")
    (out / "summary.json").unlink()
    said = []
    again = train_ray(cfg, str(out), resume=True, progress=False, say=said.append)
    assert any("12 of the 30 test tasks scored already" in line for line in said), said
    assert again["eval_tasks"] == 30
    assert again["test_loss"] == pytest.approx(first["test_loss"] + 3.0 / 30, rel=1e-9)
    assert len((out / "test-scores.jsonl").read_text().splitlines()) == 1 + 30


@pytest.mark.slow  # a worker and two replacements crash in turn, 1 s and 2 s apart: ~31 s
def test_a_task_that_crashes_every_replacement_stops_the_run_after_max_failures(ray_local, tmp_path, monkeypatch):
    from reptile_dist.engine.adapt_worker import CRASH_FILE_ENV
    from reptile_dist.engine.driver import RunFailed

    crash = tmp_path / "crash"
    crash.write_text("5 0")  # meta-step 5, task 0: worker 0's share in sync mode, for every replacement too
    monkeypatch.setenv(CRASH_FILE_ENV, str(crash))
    cfg = tiny("sine", meta_iters=50, checkpoint_every=2, max_failures=2).replace(backend="ray", mode="sync", workers=2)
    out = tmp_path / "run"
    thread, outcome = in_thread(lambda: train_ray(cfg, str(out), **quiet))
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), RunFailed), outcome
    message = str(outcome["error"])
    assert "worker 0 failed 3 times in a row, the last at meta-step 5 (max_failures=2)" in message, message
    assert "\n" not in message
    assert (out / "checkpoints" / "ckpt-00000004.pt").exists() and not (out / "final.pt").exists()
    assert _events(out).count("worker 0 replaced") == 2


@pytest.mark.slow  # the only test of the fast tier that would start Ray
def test_a_parameter_server_lost_while_skipping_a_dead_workers_step_is_left_to_the_restore(ray_local, tmp_path):
    # The PS dying inside complete_step is not deterministic end to end: the handling path on a real dead PS.
    import numpy as np

    from reptile_dist.engine.driver import EngineRun
    from reptile_dist.engine.parameter_server import ParameterServer

    cfg = tiny("sine").replace(backend="ray", mode="sync", workers=2, on_worker_loss="skip")
    said = []
    run = EngineRun(cfg, str(tmp_path / "run"), resume=False, progress=False, say=said.append, on_log=None)
    run.ps = ray.remote(ParameterServer).options(num_cpus=0).remote(cfg.to_dict(), np.zeros(3, dtype=np.float32))
    ray.kill(run.ps)
    run.worker_died(0, {"progress": 3.0, "done": False})  # completes the step on the dead PS: no error
    assert list(run.down) == [0] and "worker 0 died at meta-step 3" in said[0], said  # a replacement is due
    with pytest.raises(ray.exceptions.RayActorError):  # the next drain finds the PS dead, and watch restores it
        run.ps_call(run.ps.drain)


def test_restarts_back_off_and_stop_the_run_past_max_failures():
    from reptile_dist.engine.driver import BACKOFF_MAX_S, HEALTHY_S, Restarts, RunFailed

    restarts = Restarts(limit=3)
    restarts.start("worker 1")
    assert [restarts.failed("worker 1", 7.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    with pytest.raises(RunFailed, match=r"^worker 1 failed 4 times in a row, the last at meta-step 7 \(max_failures=3\)"):
        restarts.failed("worker 1", 7.0)
    restarts.start("worker 0")
    restarts.failed("worker 0", 7.0)
    restarts.started["worker 0"] -= HEALTHY_S  # it ran a while...
    assert restarts.failed("worker 0", 7.0) == 2.0  # ...but the run did not move on: still in a row
    restarts.started["worker 0"] -= HEALTHY_S
    assert restarts.failed("worker 0", 9.0) == 1.0  # ran a while and the run moved on: from zero
    unlimited = Restarts(limit=-1)
    assert [unlimited.failed("the evaluator", 1.0) for _ in range(10)][-1] == BACKOFF_MAX_S
