"""Sweeps: a bad definition fails before any trial starts; a small ASHA sine sweep on real local
Ray stops trials early and writes a best configuration that trains."""
from __future__ import annotations

import importlib.util
import time
from importlib.machinery import ModuleSpec
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from reptile_dist.cli import main
from reptile_dist.sweep import SweepError, load_sweep

REPO = Path(__file__).resolve().parents[1]

# Four trials of 30 meta-steps, reporting every 10. The grid lists the two meta step sizes with
# the lowest validation loss at meta-step 10 first (values are deterministic: sync engine, seeded
# tasks); trials 3 and 4 start only when one of those has finished, so they reach the first rung
# after both and are stopped there.
TINY = {
    "name": "tiny",
    "base": {"config": "sine", "set": {"mode": "sync", "workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1,
                                       "eval_tasks_periodic": 10, "eval_inner_steps": 8, "eval_tasks": 10}},
    "space": {"meta_step_size": {"grid": [0.03, 0.003, 0.3, 1.0]}},
    "metric": "eval_loss",
    "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2},
    "budget": {"num_samples": 1, "meta_iters": 30, "report_every": 10, "max_concurrent_trials": 2},
    "best": {"set": {"meta_iters": 20, "eval_every": 10, "checkpoint_every": 0}},
}


def write_sweep(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.parametrize("name", ["sine", "omniglot-5w1s", "omniglot-20w1s"])
def test_shipped_sweeps_are_valid(name):
    spec = load_sweep(REPO / "tuning" / f"{name}.yaml")
    assert {"meta_step_size", "inner_steps", "meta_batch_size"} <= {d.field for d in spec.space}
    per = spec.base.meta_batch_size if spec.unit == "tasks" else 1
    assert spec.base.eval_every * per == spec.report_every and spec.base.checkpoint_every == spec.base.eval_every


@pytest.mark.parametrize("path", sorted((REPO / "tuning").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_loads_and_scores_on_validation_tasks(path):
    spec = load_sweep(path)
    assert spec.num_trials() >= 2 and spec.metric.startswith("eval_")
    if spec.base.family == "omniglot":
        assert spec.base.val_characters > 0  # never the test characters
        assert spec.best_config({d.field: d.values[0] for d in spec.space}).val_characters == 0


def test_a_task_budget_gives_every_meta_batch_size_the_same_tasks(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, space={"meta_batch_size": {"choice": [2, 5, 10]}},
                                  scheduler={"name": "asha", "grace_period": 60},
                                  budget={"unit": "tasks", "meta_iters": 300, "report_every": 60}))
    assert spec.time_attr == "tasks"
    for batch, steps, every in [(2, 150, 30), (5, 60, 12), (10, 30, 6)]:
        cfg = spec.trial_config({"meta_batch_size": batch})
        assert (cfg.meta_iters, cfg.eval_every, cfg.checkpoint_every) == (steps, every, every)
        assert cfg.meta_iters * batch == 300 and cfg.keep_checkpoints == 5
    with pytest.raises(SweepError, match="budget.report_every is fewer tasks than one meta-step of meta_batch_size=10"):
        load_sweep(write_sweep(tmp_path, space={"meta_batch_size": {"choice": [2, 10]}},
                               budget={"unit": "tasks", "meta_iters": 80, "report_every": 8}))
    with pytest.raises(SweepError, match="budget.unit: tasks needs scheduler asha"):
        load_sweep(write_sweep(tmp_path, scheduler={"name": "pbt", "perturbation_interval": 20},
                               space={"meta_step_size": {"choice": [0.1, 0.3]}},
                               budget={"unit": "tasks", "meta_iters": 300, "report_every": 20}))
    with pytest.raises(SweepError, match="budget.unit='steps' is not one of meta_steps, tasks"):
        load_sweep(write_sweep(tmp_path, budget={"unit": "steps", "meta_iters": 30}))


@pytest.mark.parametrize("space, field", [
    ({"inner_stepz": {"choice": [1, 2]}}, "inner_stepz"),
    ({"meta_step_size": {"uniform": [1.0, 0.5]}}, "meta_step_size"),
    ({"meta_step_size": {"loguniform": [0.1, 0.1]}}, "meta_step_size"),
    ({"inner_steps": {"choice": []}}, "inner_steps"),
    ({"meta_batch_size": {"grid": [0, 5]}}, "meta_batch_size"),
])
def test_bad_space_fails_before_any_trial_with_one_line_naming_the_field(tmp_path, capsys, space, field):
    out = tmp_path / "out"
    code = main(["tune", "--sweep", str(write_sweep(tmp_path, space=space)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"space.{field}" in err, err
    assert not out.exists()


def optuna_installed(monkeypatch, installed: bool) -> None:
    """Make the sweep loader find optuna, or not, whichever this machine has."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "optuna":
            return ModuleSpec("optuna", None) if installed else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_search_optuna_without_optuna_says_what_to_install(tmp_path, monkeypatch):
    optuna_installed(monkeypatch, False)
    with pytest.raises(SweepError, match=r"search: optuna is not installed \(pip install 'reptile-dist\[tune\]'\)"):
        load_sweep(write_sweep(tmp_path, search="optuna"))


def test_search_optuna_refuses_a_grid_and_names_its_field(tmp_path, monkeypatch):
    optuna_installed(monkeypatch, True)
    with pytest.raises(SweepError, match=r"space\.meta_step_size: grid is not supported with search: optuna"):
        load_sweep(write_sweep(tmp_path, search="optuna"))


CASES = {"small": {"meta_batch_size": 2}, "nesterov": {"meta_batch_size": 5, "outer_optimizer": "nesterov",
                                                     "outer_momentum": 0.5, "meta_step_size": 0.2}}


def test_named_cases_set_their_fields_together_and_count_like_a_grid(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, space={"cases": CASES, "inner_steps": {"grid": [1, 2]}},
                                  budget={"unit": "tasks", "meta_iters": 100, "report_every": 50}))
    assert spec.num_trials() == 4 and sorted(spec.param_space()["cases"]["grid_search"]) == ["nesterov", "small"]
    cfg = spec.trial_config({"cases": "nesterov", "inner_steps": 2})
    assert (cfg.outer_optimizer, cfg.outer_momentum, cfg.meta_step_size, cfg.inner_steps) == ("nesterov", 0.5, 0.2, 2)
    assert (cfg.meta_batch_size, cfg.meta_iters) == (5, 20)  # the task budget in the case's meta-batch
    small = spec.trial_config({"cases": "small", "inner_steps": 1})
    assert (small.outer_optimizer, small.meta_step_size, small.meta_batch_size, small.meta_iters) == (
        spec.base.outer_optimizer, spec.base.meta_step_size, 2, 50)
    assert spec.mutations() == {}  # cases, like grids, are never perturbed


@pytest.mark.parametrize("cases, message", [
    ({"a": {"inner_stepz": 1}}, r"space\.cases\.a: unknown config field 'inner_stepz'"),
    ({"a": {"workers": 2}}, r"space\.cases\.a\.workers: a trial.s resources are sized over the whole space"),
    ({"a": {"meta_step_size": 0.5}}, r"space\.cases\.a\.meta_step_size: also searched in space\.meta_step_size"),
    ({"a": {"outer_optimizer": "lion"}}, r"space\.cases\.a: .*outer_optimizer"),
    ({"a": {}}, r"space\.cases\.a: expected a mapping of config fields"),
    ([{"outer_optimizer": "sgd"}], r"space\.cases: expected a mapping of case names"),
])
def test_bad_cases_fail_before_any_trial_naming_the_case(tmp_path, cases, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, space={"cases": cases, "meta_step_size": {"grid": [0.1, 1.0]}}))


@pytest.mark.parametrize("changes, message", [
    (dict(space={"cases": CASES, "prefetch": {"choice": [False, True]}}, base={"config": "sine", "set": {"mode": "async"}}),
     r"space\.cases\.nesterov with prefetch=True: prefetch needs outer_optimizer=sgd"),
    (dict(space={"cases": {"ar": {"mode": "allreduce"}}}), r"space\.cases\.ar\.mode: sweeps run the parameter-server engine"),
    (dict(space={"cases": CASES}, best={"set": {"prefetch": True, "mode": "async"}}),
     r"best\.set: prefetch needs outer_optimizer=sgd"),
    (dict(space={"cases": CASES, "inner_steps": {"choice": [1, 2]}}, scheduler={"name": "pbt", "perturbation_interval": 20},
          budget={"meta_iters": 40, "report_every": 10}), r"space\.cases: PBT copies a better trial's whole configuration"),
    (dict(scheduler={"name": "pbt", "perturbation_interval": 20}, budget={"meta_iters": 40, "report_every": 10}),
     r"space: PBT needs a field to perturb"),
])
def test_cases_are_checked_with_every_searched_value_and_the_scheduler(tmp_path, changes, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, **changes))


def test_the_curves_hold_every_report_once_by_trial_and_step():
    import math
    from types import SimpleNamespace

    import pandas as pd

    from reptile_dist.sweep.runner import curves_table

    spec = load_sweep(REPO / "tuning" / "omniglot-20w1s-outer.yaml")
    reports = pd.DataFrame([  # a resumed trial reports step 240 again; the second time counts
        {"meta_step": 240, "tasks": 1200, "eval_accuracy": 0.30, "eval_accuracy_ci95": 0.02, "train_loss": 2.0},
        {"meta_step": 480, "tasks": 2400, "eval_accuracy": 0.40, "eval_accuracy_ci95": float("nan")},
        {"meta_step": 240, "tasks": 1200, "eval_accuracy": 0.31, "eval_accuracy_ci95": 0.02, "train_loss": 1.9},
        {"meta_step": 720, "tasks": 3600, "eval_accuracy": float("nan")},  # no metric: not a point
    ])
    grid = [SimpleNamespace(path="/t/a", metrics_dataframe=reports),
            SimpleNamespace(path="/t/b", metrics_dataframe=pd.DataFrame()),  # never reported
            SimpleNamespace(path="/t/c", metrics_dataframe=None)]
    rows = [{"path": f"/t/{p}", "trial_id": p, "cases": "paper"} for p in "abc"]
    curves = curves_table(spec, grid, rows)
    assert [(c["trial_id"], c["meta_step"], c["tasks"], c["eval_accuracy"]) for c in curves] == [
        ("a", 240, 1200, 0.31), ("a", 480, 2400, 0.40)]
    assert curves[0]["train_loss"] == 1.9 and curves[0]["cases"] == "paper"
    assert math.isnan(curves[1]["eval_accuracy_ci95"]) and math.isnan(curves[1]["train_loss"])


@pytest.mark.slow  # two Tune trials
def test_a_task_budget_sweep_of_cases_runs_each_to_the_same_tasks_and_writes_its_curves(ray_local, tmp_path):
    from reptile_dist.sweep.runner import run_sweep

    sweep = write_sweep(tmp_path, space={"cases": CASES}, scheduler={"name": "asha", "grace_period": 60},
                        budget={"unit": "tasks", "meta_iters": 100, "report_every": 50, "max_concurrent_trials": 2})
    result = run_sweep(load_sweep(sweep), str(tmp_path / "sweep"), verbose=0)
    rows = result["rows"]
    assert sorted((r["cases"], r["meta_step"], r["tasks"], r["status"]) for r in rows) == [
        ("nesterov", 20, 100, "completed"), ("small", 50, 100, "completed")]
    curves = pq.read_table(tmp_path / "sweep" / "curves.parquet").to_pylist()
    assert sorted((c["cases"], c["tasks"], c["meta_step"]) for c in curves) == [
        ("nesterov", 50, 10, ), ("nesterov", 100, 20), ("small", 50, 25), ("small", 100, 50)]
    for c in curves:  # the reports as Tune received them, finished trials' last ones in the results
        assert c["eval_loss"] > 0 and c["eval_loss_ci95"] > 0 and c["trial_id"] in {r["trial_id"] for r in rows}
    last = {c["trial_id"]: c["eval_loss"] for c in curves if c["tasks"] == 100}
    assert last == {r["trial_id"]: r["eval_loss"] for r in rows}
    assert (tmp_path / "sweep" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # four Tune trials and a training run
def test_asha_sine_sweep_stops_trials_early_and_its_best_config_trains(ray_local, tmp_path):
    from reptile_dist.sweep.runner import run_sweep

    out = tmp_path / "sweep"
    outcome = run_sweep(load_sweep(write_sweep(tmp_path)), str(out), verbose=0)

    rows = outcome["rows"]
    assert len(rows) == 4 and not [r["error"] for r in rows if r["error"]]
    assert any(r["status"] == "stopped" and r["meta_step"] < 30 for r in rows)
    assert [r["eval_loss"] for r in rows] == sorted(r["eval_loss"] for r in rows)
    assert pq.read_table(out / "results.parquet").num_rows == 4
    assert list((out / "tiny").glob("*/events.out.tfevents.*")), "no TensorBoard events in the experiment"

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["meta_step_size"] == rows[0]["meta_step_size"] and best["meta_iters"] == 20
    code = main(["train", "--config", str(out / "best.yaml"), "--backend", "local", "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 0 and (tmp_path / "run" / "final.pt").exists()

    # Stopped trials took their engine actors and placement groups with them.
    deadline = time.time() + 15
    while ray_local.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == 4
