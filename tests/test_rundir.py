"""Run directories and resume: what a run directory refuses, and what a resume verifies."""
import json
import math

import pytest
import torch
import yaml

from conftest import tiny
from reptile_dist.config import Config
from reptile_dist.local import train_local
from reptile_dist.rundir import RunDir, RunDirError, load_checkpoint
from reptile_dist.training import RunFailed

quiet = dict(progress=False, say=lambda m: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), **quiet)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _interrupted(finished, tmp_path):
    """The finished run as it was after its step-2 checkpoint."""
    out = _copy(finished, tmp_path / "run")
    for name in ("final.pt", "summary.json", "checkpoints/ckpt-00000004.pt"):
        (out / name).unlink()
    return out


def test_resume_needs_nothing_but_the_folder(finished, tmp_path):
    out = _interrupted(finished, tmp_path)
    cfg = RunDir(str(out)).recorded_config()  # what `train --out DIR --resume` alone uses
    assert cfg == tiny("synthetic", meta_iters=4, checkpoint_every=2)
    summary = train_local(cfg, str(out), resume=True, **quiet)
    assert summary["meta_iters"] == 4
    a, b = (load_checkpoint(str(run / "final.pt"))["model_state"] for run in (out, finished))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run ends where the uninterrupted one did


def test_a_final_evaluation_stopped_part_way_goes_on_from_the_tasks_its_run_kept(finished, tmp_path, monkeypatch):
    """The final evaluation keeps every task's scores in the run directory (test-scores.jsonl) as it
    goes: a run stopped during it resumes without scoring those tasks again, and ends with the
    uninterrupted run's figures."""
    import reptile_dist.training as training

    out = tmp_path / "run"
    calls = []

    def stopped_in_the_third_block(learner, family, theta, cfg, split, tasks, *args):
        calls.append(list(tasks))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return score_tasks(learner, family, theta, cfg, split, tasks, *args)

    from reptile_dist.evaluation import score_tasks

    monkeypatch.setattr(training, "SCORES_BLOCK", 3)
    monkeypatch.setattr(training, "score_tasks", stopped_in_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), **quiet)
    kept = (out / "test-scores.jsonl").read_text().splitlines()
    assert len(kept) == 1 + 6 and not (out / "summary.json").exists()

    said = []
    calls.clear()
    summary = train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), resume=True,
                          progress=False, say=said.append)
    assert calls == [[6, 7, 8], [9]]  # only the tasks it lacked
    assert "6 of the 10 test tasks scored already" in " ".join(said)
    whole = json.loads((finished / "summary.json").read_text())
    assert summary["eval_tasks"] == 10
    for key in ("test_loss", "test_loss_ci95"):
        assert summary[key] == whole[key]
    assert len((out / "test-scores.jsonl").read_text().splitlines()) == 1 + 10


def test_a_runs_scores_file_of_other_weights_is_scored_anew(finished, tmp_path):
    """A test-scores.jsonl that names other weights (or is not one) is not mixed in: scored anew."""
    out = tmp_path / "run"
    _copy(finished, out)
    for name in ("summary.json", "final.pt"):
        (out / name).unlink()
    (out / "test-scores.jsonl").write_text((finished / "test-scores.jsonl").read_text().replace(
        '"weights_sha256": "', '"weights_sha256": "0'))
    said = []
    summary = train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), resume=True,
                          progress=False, say=said.append)
    assert any("holds the scores of another evaluation (it differs in weights_sha256): scoring the test tasks anew"
               in line for line in said), said
    assert summary["test_loss"] == json.loads((finished / "summary.json").read_text())["test_loss"]
    assert (out / "test-scores.jsonl").read_text() == (finished / "test-scores.jsonl").read_text()


def test_an_edited_config_yaml_is_refused_by_the_checkpoints_own_config(finished, tmp_path):
    out = _interrupted(finished, tmp_path)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    recorded.update(inner_lr=0.01, meta_iters=6)
    (out / "config.yaml").write_text(yaml.safe_dump(recorded))
    cfg = RunDir(str(out)).recorded_config()
    with pytest.raises(RunDirError, match=r"another configuration \(differs in: inner_lr, meta_iters\)"):
        train_local(cfg, str(out), resume=True, **quiet)
    assert not (out / "final.pt").exists()


def test_a_config_yaml_without_a_newer_field_resumes_with_its_default(finished, tmp_path):
    out = _interrupted(finished, tmp_path)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    del recorded["inner_state"]  # as a version before the field existed wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(recorded))
    cfg = RunDir(str(out)).recorded_config()
    assert cfg.inner_state == Config().inner_state
    assert train_local(cfg, str(out), resume=True, **quiet)["meta_iters"] == 4


def test_no_readable_checkpoint_refuses_to_resume_and_changes_nothing(finished, tmp_path):
    out = _interrupted(finished, tmp_path)
    (out / "checkpoints" / "ckpt-00000002.pt").write_bytes(b"truncated")
    rows = (out / "metrics.parquet").read_bytes()
    with pytest.raises(RunDirError, match="no readable checkpoint to resume from \\(1 found, none readable\\)"):
        train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), resume=True, **quiet)
    assert (out / "metrics.parquet").read_bytes() == rows


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.name != ".lock"}
    said = []
    cfg = tiny("synthetic", meta_iters=4, checkpoint_every=2, eval_tasks=2)  # even with other settings
    summary = train_local(cfg, str(finished), resume=True, progress=False, say=said.append)
    assert summary == json.loads((finished / "summary.json").read_text())
    assert said == [f"{finished} is a finished run (4 meta-steps); nothing to resume"]
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.name != ".lock"} == before


def test_a_run_directory_records_its_format_and_identity_and_so_do_checkpoints(finished):
    run = json.loads((finished / "run.json").read_text())
    checkpoint = load_checkpoint(str(finished / "checkpoints" / "ckpt-00000004.pt"))
    assert run["format"] == "reptile-dist-run-v1"
    assert run["config_identity"] == checkpoint["config_identity"] and len(run["config_identity"]) == 16


@pytest.mark.parametrize("make", ["user folder", "file", "root"])
def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, make):
    cfg = tiny("synthetic", meta_iters=2)
    if make == "user folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "summary.json").write_text("my own results")
        message = "not empty and holds no run"
    elif make == "file":
        out = tmp_path / "notes.txt"
        out.write_text("my notes")
        message = "is a file"
    else:
        out, message = "/", "not empty and holds no run"
    with pytest.raises(RunDirError, match=message):
        train_local(cfg, str(out), **quiet)
    if make == "user folder":
        assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
        assert (out / "summary.json").read_text() == "my own results"


def test_a_second_training_into_the_same_folder_is_refused(tmp_path):
    cfg = tiny("synthetic", meta_iters=2)
    out = tmp_path / "run"
    holder = RunDir(str(out))
    holder.start(cfg)  # another training holding the folder
    with pytest.raises(RunDirError, match="in use by another training"):
        train_local(cfg, str(out), resume=True, **quiet)
    holder.release()
    said = []  # free now: the claimed folder holds a run with no checkpoint yet, started again
    assert train_local(cfg, str(out), resume=True, progress=False, say=said.append)["meta_iters"] == 2
    assert f"{out} stopped before its first checkpoint; starting it again from meta-step 0" in said


def test_a_run_stopped_before_its_first_checkpoint_starts_again_on_resume(finished, tmp_path):
    """Nothing saved to lose: the resume starts from meta-step 0 in the same folder, drops the rows
    the stopped run logged, and ends where an uninterrupted run does."""
    out = _interrupted(finished, tmp_path)
    (out / "checkpoints" / "ckpt-00000002.pt").unlink()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("step" in row for row in logged)  # rows it logged before it stopped
    said = []
    summary = train_local(RunDir(str(out)).recorded_config(), str(out), resume=True, progress=False, say=said.append)
    assert summary["meta_iters"] == 4 and f"{out} stopped before its first checkpoint; starting it again from meta-step 0" in said
    a, b = (load_checkpoint(str(run / "final.pt"))["model_state"] for run in (out, finished))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [[row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
             for run in (out, finished)]
    assert steps[0] == steps[1]  # each row once, as in the uninterrupted run


def test_temporaries_left_by_a_crash_are_removed_at_start(finished, tmp_path):
    out = _interrupted(finished, tmp_path)
    stale = [out / ".config.yaml.k2j4.tmp", out / "checkpoints" / ".ckpt-00000004.pt.x9z.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    train_local(tiny("synthetic", meta_iters=4, checkpoint_every=2), str(out), resume=True, **quiet)
    assert not any(path.exists() for path in stale)


def test_non_finite_updates_are_skipped_then_stop_the_run_and_no_bad_theta_is_saved(tmp_path):
    # An inner step size this large overflows within a step: every later sum is NaN or Inf.
    cfg = tiny("synthetic", meta_iters=30, checkpoint_every=1, keep_checkpoints=2, inner_optimizer="sgd",
               inner_lr=1e30, max_rejected_updates=3)
    out = tmp_path / "run"
    with pytest.raises(RunFailed, match="rejected for 3 meta-steps in a row|no longer finite"):
        train_local(cfg, str(out), **quiet)
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints, "the good checkpoints before the failure are kept"
    for path in checkpoints:
        assert torch.isfinite(load_checkpoint(str(path))["outer"]["theta"]).all()
    assert not (out / "final.pt").exists()


def test_summaries_are_valid_json_whatever_they_hold(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_summary({"test_loss": math.nan, "nested": {"a": [math.inf, 1.0]}, "t": torch.tensor(2.5)})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"test_loss": None,
                                                                           "nested": {"a": [None, 1.0]}, "t": 2.5}


def test_the_cli_resumes_from_the_folder_alone_and_refuses_a_flag_that_disagrees(finished, tmp_path, capsys):
    from reptile_dist.cli import main

    out = _interrupted(finished, tmp_path)
    assert main(["train", "--out", str(out), "--resume", "--set", "inner_lr=0.5", "--no-progress"]) == 2
    assert "differs in: inner_lr" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # as recorded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["meta_iters"] == 4
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # finished: says so
    assert "nothing to resume" in capsys.readouterr().out


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    import reptile_dist.rundir as rundir
    from reptile_dist.cli import main
    from reptile_dist.files import atomic_write

    def full_disk_at_step_4(path, content):
        if "ckpt-00000004" not in str(path):
            return atomic_write(path, content)

        def half_then_enospc(sink):
            sink.write(content[: len(content) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return atomic_write(path, half_then_enospc)

    monkeypatch.setattr(rundir, "atomic_write", full_disk_at_step_4)
    out = tmp_path / "run"
    args = ["train", "--config", "synthetic", "--out", str(out), "--no-progress", "--set", "meta_iters=6",
            "--set", "checkpoint_every=2", "--set", "eval_tasks=5", "--set", "eval_tasks_periodic=5",
            "--set", "eval_every=0", "--set", "torch_threads=1"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reptile-dist: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "ckpt-00000004" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]  # whole, no temporary
    assert load_checkpoint(str(out / "checkpoints" / "ckpt-00000002.pt"))["step"] == 2
    monkeypatch.undo()  # space again: the run resumes from the folder alone
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_the_kept_in_progress_runs_checkpoint_is_the_manifests_last_stretch_and_its_configs():
    """pretrained/in-progress/ keeps a long run between sessions: its newest checkpoint must be the
    one the manifest's last stretch ended at, and belong to the config.yaml kept beside it (resume
    refuses a checkpoint of another configuration)."""
    from pathlib import Path

    from reptile_dist.config import load_config
    from reptile_dist.rundir import config_identity

    kept = Path(__file__).resolve().parents[1] / "pretrained" / "in-progress"
    for run in json.loads((kept / "manifest.json").read_text()):
        folder = kept / run["run"]
        checkpoints = sorted((folder / "checkpoints").glob("ckpt-*.pt"))
        assert [c.relative_to(kept).as_posix() for c in checkpoints] == [run["checkpoint"]]
        state = load_checkpoint(str(checkpoints[-1]))
        last = run["stretches"][-1]
        assert state["step"] == last["to_step"] and last["from_step"] < last["to_step"]
        assert [s["to_step"] for s in run["stretches"][:-1]] == [s["from_step"] for s in run["stretches"][1:]]
        cfg = load_config(str(folder / "config.yaml"))
        assert state["config_identity"] == config_identity(cfg) and cfg.meta_iters == run["meta_iters"]
    # no run folder is left behind that the manifest has forgotten (a finished run moves to records/)
    assert {p.name for p in kept.iterdir() if p.is_dir()} == {run["run"] for run in json.loads((kept / "manifest.json").read_text())}


def test_a_finished_long_runs_record_covers_its_schedule_and_matches_the_shipped_models_entry():
    """pretrained/records/ keeps a finished long run: its stretches join up from 0 to meta_iters,
    and the shipped model's manifest entry states the run's own final evaluation and wall time."""
    from pathlib import Path

    from reptile_dist.config import load_config

    pretrained = Path(__file__).resolve().parents[1] / "pretrained"
    # the run's own preset's entry (a 1-shot run's weights also ship as the 5-shot model, scored apart)
    shipped = {(entry.get("record"), entry["preset"]): entry for entry in json.loads((pretrained / "manifest.json").read_text())}
    for run in json.loads((pretrained / "records" / "manifest.json").read_text()):
        folder = pretrained / "records" / run["run"]
        stretches = run["stretches"]
        assert stretches[0]["from_step"] == 0 and stretches[-1]["to_step"] == run["meta_iters"]
        assert [s["to_step"] for s in stretches[:-1]] == [s["from_step"] for s in stretches[1:]]
        assert load_config(str(folder / "config.yaml")).meta_iters == run["meta_iters"]
        summary = json.loads((folder / "summary.json").read_text())
        entry = shipped[(f"records/{run['run']}", run["preset"])]
        assert summary["meta_iters"] == entry["meta_iters"] == run["meta_iters"]
        assert round(100 * summary["test_accuracy"], 2) == entry["test_accuracy"]
        assert round(100 * summary["test_ci95"], 2) == entry["test_ci95"]
        assert round(100 * summary["test_transductive_accuracy"], 2) == entry["test_transductive_accuracy"]
        assert summary["eval_tasks"] == entry["eval_tasks"]
        assert sum(s["wall_s"] for s in stretches) == entry["train_wall_s"]


def test_a_shipped_models_kept_scores_are_its_weights_and_give_its_figures():
    """A shipped model evaluated apart from its run (`eval --scores`) keeps every task's scores: the
    file's header names the shipped weights and inner estimate, and its tasks give the manifest's
    figures (so a figure in the README is checked against the evaluation behind it)."""
    from pathlib import Path

    from reptile_dist.api import _load
    from reptile_dist.evaluation import ScoresFile, evaluation_identity, summarize

    pretrained = Path(__file__).resolve().parents[1] / "pretrained"
    entries = [e for e in json.loads((pretrained / "manifest.json").read_text()) if "scores" in e]
    assert entries, "no shipped model names its scores file"
    for entry in entries:
        model = _load(str(pretrained / entry["file"]), None, "cpu")
        header = json.loads((pretrained / entry["scores"]).read_text().splitlines()[0])["evaluation"]
        # where it ran (the data path from the repository root, device auto) as the file says; the weights checked
        cfg = model.cfg.replace(data=header["config"]["data"], device=header["config"]["device"])
        kept = ScoresFile(pretrained / entry["scores"],  # refuses a file of other weights or settings
                          evaluation_identity(model.theta, model.moment, cfg, "test", None))
        result = summarize(kept.scores(entry["eval_tasks"]))
        assert len(kept.done) == result["tasks"] == entry["eval_tasks"]
        assert round(100 * result["accuracy"], 2) == entry["test_accuracy"]
        assert round(100 * result["accuracy_ci95"], 2) == entry["test_ci95"]
        assert round(100 * result["transductive_accuracy"], 2) == entry["test_transductive_accuracy"]
        assert round(100 * result["transductive_accuracy_ci95"], 2) == entry["test_transductive_ci95"]
