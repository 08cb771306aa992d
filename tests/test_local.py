import json

import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny
from reptile_dist.local import train_local
from reptile_dist.rundir import CheckpointError, RunDir, RunDirError, load_checkpoint

quiet = dict(progress=False, say=lambda m: None)


def test_run_directory_is_complete(tmp_path):
    out = tmp_path / "run"
    cfg = tiny("synthetic", meta_iters=6, checkpoint_every=2, keep_checkpoints=2, eval_every=4)
    train_local(cfg, str(out), **quiet)
    for name in ("config.yaml", "metrics.parquet", "final.pt", "summary.json"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    final = torch.load(out / "final.pt", weights_only=True)
    assert {"model_state", "config", "step"} <= set(final) and final["step"] == 6
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "test_ci95", "meta_iters", "tasks_per_s", "wall_s"):
        assert summary[key] is not None, key
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == [2, 4, 6]
    assert metrics[1]["eval_accuracy"] is not None and metrics[0]["eval_accuracy"] is None
    # the logged step size is the linear annealing schedule (logged after step t-1 is applied)
    assert [r["meta_step_size"] for r in metrics] == pytest.approx([cfg.meta_step_size_at(s - 1) for s in (2, 4, 6)])


def test_a_folder_holding_a_different_run_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train_local(tiny("synthetic", meta_iters=2), out, **quiet)
    with pytest.raises(RunDirError, match="different run"):
        train_local(tiny("synthetic", meta_iters=2, inner_lr=0.01), out, **quiet)
    with pytest.raises(RunDirError, match="--resume"):
        train_local(tiny("synthetic", meta_iters=2), out, **quiet)
    assert (tmp_path / "run" / "final.pt").exists()  # nothing already written was lost


@pytest.mark.slow  # three short trainings each; tests/test_rundir.py resumes in the fast tier
@pytest.mark.parametrize("inner_state, outer", [("fresh", "nesterov"), ("carried", "sgd")])
def test_resume_continues_to_the_same_result(tmp_path, inner_state, outer):
    full = tiny("synthetic", meta_iters=6, checkpoint_every=3, inner_state=inner_state, outer_optimizer=outer)
    train_local(full, str(tmp_path / "a"), **quiet)
    train_local(full, str(tmp_path / "b"), **quiet)
    # cut run b back to its step-3 checkpoint, then resume it
    (tmp_path / "b" / "checkpoints" / "ckpt-00000006.pt").unlink()
    (tmp_path / "b" / "final.pt").unlink()
    train_local(full, str(tmp_path / "b"), resume=True, **quiet)
    a, b = load_checkpoint(str(tmp_path / "a" / "final.pt")), load_checkpoint(str(tmp_path / "b" / "final.pt"))
    assert all(torch.allclose(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    if inner_state == "carried":  # the estimate was checkpointed and restored with theta
        assert a["inner_moment"]["steps"] == b["inner_moment"]["steps"] == 6 * full.inner_steps
        assert torch.allclose(a["inner_moment"]["sq"], b["inner_moment"]["sq"])
    else:
        assert a["inner_moment"] is None


@pytest.mark.slow  # a training and three evaluations
def test_eval_of_a_carried_run_starts_from_its_saved_estimate(tmp_path, capsys):
    """`eval` of final.pt reproduces the run's own final evaluation, which started every test task
    from the estimate training left; starting them fresh instead scores differently."""
    import json

    from reptile_dist.cli import main

    out = tmp_path / "run"
    cfg = tiny("synthetic", meta_iters=8, inner_state="carried")
    summary = train_local(cfg, str(out), **quiet)
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", str(cfg.eval_tasks)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-9)
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", str(cfg.eval_tasks),
                 "--set", "inner_state=fresh"]) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fresh["loss"] != pytest.approx(summary["test_loss"], rel=1e-6)


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    out = tmp_path / "run"
    train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), **quiet)
    newest = out / "checkpoints" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ckpt-00000004"):
        load_checkpoint(str(newest))
    warnings = []
    state = RunDir(str(out)).latest_checkpoint(warn=warnings.append)
    assert state["step"] == 2 and "ckpt-00000004" in warnings[0]


def test_a_run_recorded_with_float64_deltas_resumes_under_the_auto_default(tmp_path):
    """Runs written before delta_dtype's default became "auto" recorded float64 (in config.yaml and
    every checkpoint). The wire precision is how an engine moves deltas, as the worker count is, so
    resuming such a run with today's defaults is the same run."""
    cfg = tiny("synthetic", meta_iters=4, checkpoint_every=2)
    assert cfg.delta_dtype == "auto"
    out = tmp_path / "run"
    train_local(cfg.replace(delta_dtype="float64", tasks_per_push=3), str(out), **quiet)
    (out / "final.pt").unlink()
    (out / "checkpoints" / "ckpt-00000004.pt").unlink()
    summary = train_local(cfg, str(out), resume=True, **quiet)
    assert summary["meta_iters"] == 4 and (out / "final.pt").exists()


def test_a_run_written_with_the_retired_straggler_keys_still_resumes(tmp_path):
    import yaml

    cfg = tiny("synthetic", meta_iters=4, checkpoint_every=2)
    out = tmp_path / "run"
    train_local(cfg, str(out), **quiet)
    (out / "final.pt").unlink()
    (out / "checkpoints" / "ckpt-00000004.pt").unlink()
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    recorded.update(straggler_factor=1.0, straggler_worker=0)  # what every config.yaml held before they retired
    (out / "config.yaml").write_text(yaml.safe_dump(recorded))
    summary = train_local(cfg, str(out), resume=True, **quiet)
    assert summary["meta_iters"] == 4 and (out / "final.pt").exists()
