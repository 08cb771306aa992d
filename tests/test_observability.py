"""Seeing a run as it happens: rows streamed to metrics.jsonl, TensorBoard events, `status` and
`plot` from the run directory, Ray's metrics, and the loggers' one-line errors. Real files, real
processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import tiny
from reptile_dist.cli import main
from reptile_dist.local import train_local
from reptile_dist.rundir import RunDir, parse_stream, stream_line

quiet = dict(progress=False, say=lambda m: None)
CLI = [sys.executable, "-m", "reptile_dist.cli"]
PNG = b"\x89PNG\r\n\x1a\n"


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 6-step sine runs (two inner step sizes), a row a meta-step, evaluations at 3 and 6,
    checkpoints at 4 and 6."""
    folder = tmp_path_factory.mktemp("runs")
    made = []
    for name, lr in (("a", 0.02), ("b", 0.05)):
        cfg = tiny("sine", meta_iters=6, log_every=1, eval_every=3, checkpoint_every=4, inner_lr=lr)
        train_local(cfg, str(folder / name), **quiet)
        made.append(folder / name)
    return made


def test_a_runs_tensorboard_events_hold_the_logged_scalars(runs):
    out = runs[0]
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [step for step, _ in _scalars(out, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in _scalars(out, "train/loss")] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert [s for s, _ in _scalars(out, "eval/loss")] == [3, 6]
    assert [v for _, v in _scalars(out, "eval/loss_ci95")] == pytest.approx([rows[2]["eval_loss_ci95"],
                                                                             rows[5]["eval_loss_ci95"]], rel=1e-6)
    assert [s for s, _ in _scalars(out, "progress/meta_step_size")] == [1, 2, 3, 4, 5, 6]
    assert len(_scalars(out, "progress/tasks_per_s")) == 6


def test_the_stream_and_the_table_hold_the_same_rows(runs):
    out = runs[0]
    streamed = parse_stream((out / "metrics.jsonl").read_bytes())
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in streamed] == [1, 2, 3, 4, 5, 6]
    assert _same_rows(table, streamed)


def _same_rows(table, streamed):
    """Rows equal as logged: NaN equals NaN, a key a row lacks is null in the table."""
    def norm(row):
        return {k: ("nan" if isinstance(v, float) and v != v else v) for k, v in row.items() if v is not None}
    return [norm(r) for r in table] == [norm(r) for r in streamed]


def test_rows_survive_a_sigkill_before_the_first_checkpoint_and_status_and_plot_read_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "sine", "--out", str(out), "--no-progress"] + [
        a for kv in ("meta_iters=100000", "log_every=1", "checkpoint_every=0", "eval_every=0", "eval_tasks_periodic=2",
                     "torch_threads=1") for a in ("--set", kv)]
    process = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    stream = out / "metrics.jsonl"
    try:
        deadline = time.time() + 90
        while not (stream.exists() and stream.read_bytes().count(b"\n") >= 5):
            assert process.poll() is None and time.time() < deadline, "no rows streamed"
            time.sleep(0.05)
        status = json.loads(subprocess.run(CLI + ["status", str(out), "--json"], capture_output=True, text=True,
                                           check=True).stdout)
        assert status["state"] == "running" and status["step"] >= 5 and status["eta_s"] > 0
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "metrics.parquet").exists() and not (out / "checkpoints").exists()  # no checkpoint came
    with open(stream, "ab") as f:
        f.write(b'{"step":99999,"train_lo')  # a line torn by the kill
    steps = [r["step"] for r in RunDir(str(out)).read_metrics()]
    assert len(steps) >= 5 and steps == list(range(1, len(steps) + 1))

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "no checkpoint yet; `reptile-dist train --out" in capsys.readouterr().out  # and how to start it again
    assert main(["status", str(out), "--json"]) == 0
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "--out", str(png), "--x", "wall"]) == 0
    assert png.read_bytes().startswith(PNG)


def test_status_reads_a_stopped_run_and_says_how_to_resume(runs, tmp_path, capsys):
    out = _killed_at_step_5(runs[0], tmp_path / "stopped")
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stopped, meta-step 5/6" in text and "--resume" in text


def _killed_at_step_5(finished, out):
    """The finished run as a kill just after meta-step 5's row left it: rows 1-5 streamed (and a
    torn sixth), the table and the checkpoints as at meta-step 4."""
    shutil.copytree(finished, out)
    for name in ("final.pt", "summary.json", "checkpoints/ckpt-00000006.pt", ".lock"):
        (out / name).unlink()
    rows = parse_stream((out / "metrics.jsonl").read_bytes())
    (out / "metrics.jsonl").write_text("".join(stream_line(r) for r in rows[:5]) + stream_line(rows[5])[:20])
    pq.write_table(pq.read_table(out / "metrics.parquet").slice(0, 4), out / "metrics.parquet")
    return out


def test_a_resumed_run_streams_each_meta_step_once_with_the_values_of_an_uninterrupted_one(runs, tmp_path):
    finished = runs[0]
    out = _killed_at_step_5(finished, tmp_path / "run")
    cfg = RunDir(str(out)).recorded_config()
    train_local(cfg, str(out), resume=True, **quiet)
    streamed = parse_stream((out / "metrics.jsonl").read_bytes())
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in streamed] == [r["step"] for r in table] == [1, 2, 3, 4, 5, 6]
    uninterrupted = pq.read_table(finished / "metrics.parquet").to_pylist()
    for key in ("train_loss", "meta_step_size", "eval_loss"):
        assert [r[key] for r in table] == [r[key] for r in uninterrupted], key
    # TensorBoard hides the events of the redone meta-steps 5 and 6 from the first session.
    assert [step for step, _ in _scalars(out, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "run.json").read_text())["run_id"] == json.loads((finished / "run.json").read_text())["run_id"]


def test_a_late_evaluation_is_streamed_into_its_row(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.start(tiny("sine", loggers=[]))
    run.log({"step": 2, "train_loss": 1.0})
    run.log({"step": 4, "train_loss": 0.5})
    run.annotate(2, {"eval_loss": 0.7, "eval_loss_ci95": 0.1})  # finished after meta-step 4 was logged
    run.annotate(3, {"eval_loss": 0.6})  # no row of its own: kept as one
    expected = [{"step": 2, "train_loss": 1.0, "eval_loss": 0.7, "eval_loss_ci95": 0.1},
                {"step": 4, "train_loss": 0.5}, {"step": 3, "eval_loss": 0.6}]
    assert run.metrics == expected
    assert RunDir(str(tmp_path / "run")).read_metrics() == expected  # as a reader sees it, before any flush
    run.flush_metrics()
    run.release()
    assert RunDir(str(tmp_path / "run")).read_metrics() == expected


def test_a_remote_run_directory_streams_every_30_s_and_at_checkpoints_and_copies_its_logger_files_up(monkeypatch):
    import pyarrow.fs as pafs

    import reptile_dist.rundir as rundir

    run = RunDir("mock:///bucket/run")  # pyarrow's in-memory object store: no appending, as s3:// and gs://
    run.start(tiny("sine"))
    run.log({"step": 1, "train_loss": 1.0})
    assert run.read_metrics() == []  # within REMOTE_STREAM_S of the last write
    monkeypatch.setattr(rundir, "REMOTE_STREAM_S", 0.0)
    run.log({"step": 2, "train_loss": 0.5})
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    monkeypatch.setattr(rundir, "REMOTE_STREAM_S", 1e9)
    run.log({"step": 3, "train_loss": 0.25})
    run.flush_metrics()  # a checkpoint
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.release()
    files = [i.base_name for i in run.fs.get_file_info(pafs.FileSelector("bucket/run/tensorboard"))]
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")


def test_plot_writes_a_png_for_one_run_and_for_two(runs, tmp_path, capsys):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["plot", str(runs[0]), "--out", str(one)]) == 0
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(two), "--x", "tasks"]) == 0
    for png in (one, two):
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000
    assert f"wrote {two}" in capsys.readouterr().out


def test_status_of_a_finished_run(runs, capsys):
    assert main(["status", str(runs[0])]) == 0
    text = capsys.readouterr().out
    assert "finished, meta-step 6/6 (100.0%)" in text
    assert "latest evaluation (meta-step 6): loss" in text and "test: loss" in text
    assert main(["status", str(runs[0]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["eta_s"] is None and status["test"]["eval_tasks"] == 10


@pytest.mark.parametrize("command", ["status", "plot"])
def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"reptile-dist: error: {tmp_path} is not a run directory (no config.yaml)"]


def _train_args(out, *sets):
    return ["train", "--config", "sine", "--out", str(out), "--no-progress", "--set", "meta_iters=2",
            "--set", "eval_tasks=2", "--set", "eval_tasks_periodic=2", "--set", "torch_threads=1"] + \
        [a for kv in sets for a in ("--set", kv)]


def test_a_bad_logger_name_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out, "loggers=[tensorboard, neptune]")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reptile-dist: error: loggers: 'neptune' is not one of tensorboard, mlflow, wandb"]
    assert not out.exists()


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_optional_logger_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as where the extra is not installed
    out = tmp_path / "run"
    assert main(_train_args(out, f"loggers=[tensorboard, {name}]")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"reptile-dist: error: loggers: {name} needs the {name} package")
    assert err[0].endswith(f"pip install 'reptile-dist[{name}]'")
    assert not out.exists()  # refused before the folder is claimed


def test_a_failing_logger_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import reptile_dist.loggers as loggers

    class Broken:
        def __init__(self, *args):
            pass

        def log(self, row, step):
            raise ConnectionError("tracking server went away")

    monkeypatch.setattr(loggers, "TensorBoardLogger", Broken)
    out = tmp_path / "run"
    summary = train_local(tiny("sine", meta_iters=3, log_every=1), str(out), **quiet)
    assert summary["meta_iters"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: loggers:")]
    assert len(warnings) == 1 and "tensorboard stopped (ConnectionError: tracking server went away)" in warnings[0]
    assert [r["step"] for r in RunDir(str(out)).read_metrics()] == [1, 2, 3]


def test_the_parameter_server_exports_what_its_counters_gained(monkeypatch):
    import reptile_dist.engine.metrics as metrics
    from reptile_dist.engine.aggregation import Counters

    recorded = []

    class Recording:
        def __init__(self, name, description="", tag_keys=None, boundaries=None):
            self.name = name

        def inc(self, value=1.0, tags=None):
            recorded.append((self.name, value, tags))

        observe = set = inc

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics, kind, Recording)
    counters = Counters(applied_tasks=10)  # a parameter server restored at 10 applied tasks
    exported = metrics.ParameterServerMetrics(counters)
    counters.pushes, counters.applied_tasks = 2, 12
    counters.rejected_by_worker[1] += 1
    exported.update(counters, {"staleness": 1.0}, 2.4, 0.25)
    assert sorted(recorded, key=str) == sorted([
        ("reptile_ps_pushes", 2, None), ("reptile_ps_applied_tasks", 2, None),
        ("reptile_ps_rejected_deltas", 1, {"worker": "1"}), ("reptile_ps_staleness", 1.0, None),
        ("reptile_ps_meta_steps", 2.4, None), ("reptile_ps_busy_fraction", 0.25, None)], key=str)
    recorded.clear()
    counters.pushes = 3
    exported.update(counters, None, 2.4, 0.3)
    assert ("reptile_ps_pushes", 1, None) in recorded and not any(r[0] == "reptile_ps_rejected_deltas" for r in recorded)
