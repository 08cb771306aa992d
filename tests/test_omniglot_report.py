"""benchmarks/omniglot_report.py: a partial publish (say, the 20-way runs retrained) replaces its
own models' manifest entries and keeps every other one."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("omniglot_report", REPO / "benchmarks" / "omniglot_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def finished_run(folder: Path, accuracy: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("inner_state: carried\n")
    (folder / "summary.json").write_text(json.dumps({
        "split": "paper", "meta_iters": 40, "wall_s": 12.3, "tasks_per_s": 16.0, "backend": "local", "workers": 1,
        "test_accuracy": accuracy, "test_ci95": 0.01, "test_transductive_accuracy": accuracy + 0.01,
        "test_transductive_ci95": 0.01, "eval_tasks": 100}))
    pq.write_table(pa.Table.from_pylist([
        {"step": s, "eval_accuracy": accuracy, "eval_accuracy_ci95": 0.01, "eval_transductive_accuracy": accuracy,
         "eval_transductive_accuracy_ci95": 0.01} for s in (20, 40)]), folder / "metrics.parquet")


def test_a_partial_publish_replaces_its_entries_and_keeps_the_others(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    finished_run(runs / "20w", 0.75)
    finished_run(runs / "5w", 0.50)  # an old 5-way run in the same folder, not named: not reported
    (runs / "20w-5shot.log").write_text("log line\n" + json.dumps(
        {"accuracy": 0.9, "accuracy_ci95": 0.01, "transductive_accuracy": 0.91, "transductive_accuracy_ci95": 0.01,
         "tasks": 100}) + "\n")
    shipped = [{"file": "omniglot-5w1s.pt", "test_accuracy": 95.93, "record": "records/x"},
               {"file": "omniglot-20w1s.pt", "test_accuracy": 72.55},
               {"file": "omniglot-20w1s-alphabet.pt", "test_accuracy": 69.45}]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(shipped))
    figure = tmp_path / "curves.png"
    monkeypatch.setattr("sys.argv", ["omniglot_report.py", "--runs", str(runs), "--manifest", str(manifest),
                                     "--figure", str(figure), "--only", "20w", "20w-alphabet"])
    report.main()

    entries = json.loads(manifest.read_text())
    assert [e["file"] for e in entries] == ["omniglot-5w1s.pt", "omniglot-20w1s.pt", "omniglot-20w1s-alphabet.pt",
                                            "omniglot-20w5s.pt"]
    assert entries[0] == shipped[0] and entries[2] == shipped[2]  # not reported: kept as they were
    assert (entries[1]["test_accuracy"], entries[1]["meta_iters"]) == (75.0, 40)
    assert (entries[3]["test_accuracy"], entries[3]["test_transductive_accuracy"]) == (90.0, 91.0)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_finished_to_report_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["omniglot_report.py", "--runs", str(tmp_path), "--manifest", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="no finished run of 5w, 20w, 20w-alphabet"):
        report.main()
    assert not (tmp_path / "m.json").exists()
