"""Run a sweep with Ray Tune and write what it found.

    <out>/<name>/       the Tune experiment (per-trial result.json, progress.csv, TensorBoard
                        events, checkpoints; PBT's pbt_policy_*.txt)
    <out>/results.parquet   one row per trial, sorted by the metric
    <out>/curves.parquet    one row per report of every trial (tasks, meta-step, the metric and
                        its 95% interval, training loss), and curves.png: the metric against
                        tasks adapted, a line per trial
    <out>/best.yaml     the best trial's configuration (+ the sweep's `best.set`), for
                        `reptile-dist train --config <out>/best.yaml`
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from ray import tune

from reptile_dist.engine.cluster import local_cluster_cpus, ray_session
from reptile_dist.rundir import RunDir
from reptile_dist.runview import finite_number
from reptile_dist.sweep.spec import SweepError, SweepSpec, cast
from reptile_dist.sweep.trainable import trainable


def sweep_cluster(spec: SweepSpec, address: str | None):
    """Join `address`, use a running session, or start a local cluster with room for
    `max_concurrent_trials` placement groups."""
    cpus = local_cluster_cpus(lambda cluster_has_gpus: spec.placement_cpus(cluster_has_gpus) * spec.max_concurrent_trials)
    return ray_session(address, cpus)


def run_sweep(spec: SweepSpec, out: str, address: str | None = None, resume: bool = False, verbose: int = 1,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the table rows, the best row and where things were written.
    `out` is a local or shared folder or an s3:// / gs:// URI (a multi-node cluster needs one of the latter two)."""
    folder = RunDir(out)  # pyarrow filesystems, atomic writes
    storage = folder.uri if "://" in folder.uri else folder.root
    experiment = f"{storage}/{spec.name}"
    started = time.perf_counter()
    with sweep_cluster(spec, address):
        if resume:
            if not tune.Tuner.can_restore(experiment):
                raise SweepError(f"{experiment} holds no sweep to resume")
            tuner = tune.Tuner.restore(experiment, trainable=trainable(spec))
        else:
            if folder.fs.get_file_info(folder.path(spec.name)).type != pafs.FileType.NotFound:
                raise SweepError(f"{experiment} already holds a sweep; pass --resume to continue it or choose another --out")
            tuner = tune.Tuner(trainable(spec), param_space=spec.param_space(), tune_config=tune_config(spec),
                               run_config=tune.RunConfig(
                                   name=spec.name, storage_path=storage, verbose=verbose,
                                   # Keep every checkpoint (a few per trial): a limit forces an experiment
                                   # snapshot each time a trial reaches it, which Tune warns about.
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                   failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
    wall_s = time.perf_counter() - started
    rows = results_table(spec, grid)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    folder.write_bytes("results.parquet", buf.getvalue().to_pybytes())
    say(summary_text(spec, rows))
    if len(rows) < spec.num_trials() or any(r["status"] == "unfinished" for r in rows):
        write_curves(spec, grid, rows, folder)
        finished = sum(r["status"] != "unfinished" for r in rows)
        say(f"sweep {spec.name} interrupted after {wall_s:.0f} s with {finished} of {spec.num_trials()} trials finished; "
            f"continue it with --resume (Tune experiment: {experiment})")
        return {"rows": rows, "best": None, "best_path": None, "experiment": experiment, "interrupted": True,
                "results": folder.path("results.parquet"), "wall_s": wall_s}
    best = next((r for r in rows if r["status"] != "error" and math.isfinite(r[spec.metric])), None)
    if best is not None:
        folder.write_bytes("best.yaml", best_yaml(spec, best, folder.path("best.yaml")).encode())
        say(f"best: {spec.metric}={best[spec.metric]:.4g} at meta-step {best['meta_step']} "
            f"({_params_text(spec, best)}) -> {folder.path('best.yaml')}")
    else:
        say("no trial reported a result; see the errors above")
    write_curves(spec, grid, rows, folder)
    say(f"sweep {spec.name}: {len(rows)} trials in {wall_s:.0f} s; Tune experiment (TensorBoard): {experiment}")
    return {"rows": rows, "best": best, "best_path": folder.path("best.yaml") if best else None,
            "experiment": experiment, "interrupted": False, "results": folder.path("results.parquet"), "wall_s": wall_s}


def tune_config(spec: SweepSpec) -> tune.TuneConfig:
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr=spec.time_attr, max_t=spec.meta_iters,
                                  grace_period=spec.scheduler_options["grace_period"],
                                  reduction_factor=spec.scheduler_options["reduction_factor"])
    else:
        from ray.tune.schedulers import PopulationBasedTraining

        scheduler = PopulationBasedTraining(
            time_attr=spec.time_attr, perturbation_interval=spec.scheduler_options["perturbation_interval"],
            hyperparam_mutations=spec.mutations(),
            quantile_fraction=spec.scheduler_options["quantile_fraction"],
            resample_probability=spec.scheduler_options["resample_probability"])
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=spec.seed), spec.max_concurrent_trials
    else:  # random and grid; Tune ignores max_concurrent_trials for this generator, it takes its own
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg, limit = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials), None
    # PBT restarts trials at every exploit: reusing the trial actor (and its placement group) saves a
    # process start; the engine inside is started afresh from the checkpoint either way.
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=spec.num_samples, max_concurrent_trials=limit,
                           reuse_actors=spec.scheduler == "pbt")


def results_table(spec: SweepSpec, grid) -> list[dict[str, Any]]:
    """One row per trial: searched values, last reported metric and meta-step, status, error."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        step = metrics.get("meta_step")
        value = metrics.get(spec.metric)
        if result.error is not None:
            status = "error"
        elif not metrics.get("done"):
            status = "unfinished"  # the sweep was interrupted; --resume continues it
        elif step is not None and result.config and step >= spec.trial_config(result.config).meta_iters:
            status = "completed"
        else:
            status = "stopped"  # by the scheduler, before the budget's meta_iters
        rows.append({
            "trial_id": _trial_id(result.path, metrics.get("trial_id")),
            **{d.field: cast(d.field, (result.config or {}).get(d.field)) for d in spec.space},  # None: never started
            spec.metric: float(value) if value is not None else math.nan,
            "meta_step": int(step) if step is not None else 0,
            "tasks": int(metrics.get("tasks", 0)),
            "train_loss": float(metrics.get("train_loss", math.nan)),
            "status": status,
            "error": _error_line(result.error) if result.error is not None else "",
            "path": result.path,
        })
    sign = 1 if spec.mode == "min" else -1

    def key(row):  # errors and trials without a report last, then by the metric
        value = row[spec.metric]
        return (row["status"] == "error" or math.isnan(value), sign * value if not math.isnan(value) else 0.0)

    return sorted(rows, key=key)


def write_curves(spec: SweepSpec, grid, rows: list[dict[str, Any]], folder: RunDir) -> None:
    """curves.parquet and curves.png, written after the results and best.yaml."""
    curves = curves_table(spec, grid, rows)
    if curves:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(curves), buf)
        folder.write_bytes("curves.parquet", buf.getvalue().to_pybytes())
        folder.write_bytes("curves.png", plot_curves(spec, curves))


def curves_table(spec: SweepSpec, grid, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every report of every trial, by trial and meta-step (a step reported again after a resume
    counts once, as last reported): the learning curves of the sweep."""
    by_path = {r["path"]: r for r in rows}
    names = [d.field for d in spec.space]
    ci = f"{spec.metric}_ci95"
    curves = {}
    for result in grid:
        frame = result.metrics_dataframe
        row = by_path.get(result.path)
        if frame is None or row is None or spec.metric not in frame:
            continue
        for report in frame.to_dict("records"):
            step, tasks, value = (finite_number(report.get(k)) for k in ("meta_step", "tasks", spec.metric))
            if step is None or tasks is None or value is None:
                continue
            ci95, train = finite_number(report.get(ci)), finite_number(report.get("train_loss"))
            curves[row["trial_id"], int(step)] = {
                "trial_id": row["trial_id"], **{n: row[n] for n in names}, "tasks": int(tasks), "meta_step": int(step),
                spec.metric: value, ci: math.nan if ci95 is None else ci95, "train_loss": math.nan if train is None else train}
    return [curves[key] for key in sorted(curves)]


def plot_curves(spec: SweepSpec, curves: list[dict[str, Any]]) -> bytes:
    """PNG: the metric (with its 95% interval where reported) against tasks adapted, a line per trial."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ci = f"{spec.metric}_ci95"
    for trial in dict.fromkeys(c["trial_id"] for c in curves):
        points = sorted((c for c in curves if c["trial_id"] == trial), key=lambda c: c["tasks"])
        xs, ys = [c["tasks"] for c in points], [c[spec.metric] for c in points]
        line = ax.plot(xs, ys, "o-", ms=3, label=f"{trial}: {_params_text(spec, points[0])}")[0]
        if all(math.isfinite(c[ci]) for c in points):
            ax.fill_between(xs, [y - c[ci] for y, c in zip(ys, points)], [y + c[ci] for y, c in zip(ys, points)],
                            color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xlabel="meta-training tasks adapted", ylabel=spec.metric, title=f"sweep {spec.name}: {spec.metric} on validation tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def summary_text(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    names = [d.field for d in spec.space]
    header = ["trial_id", *names, spec.metric, "meta_step", "status"]
    lines = [header] + [[_cell(r.get(c)) for c in header] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        if r["error"]:
            text.append(f"{r['trial_id']} failed: {r['error']}")
    return "\n".join(text)


def best_yaml(spec: SweepSpec, best: dict[str, Any], path: str) -> str:
    cfg = spec.best_config({d.field: best[d.field] for d in spec.space})
    return (f"# Best of sweep '{spec.name}': {spec.metric}={best[spec.metric]:.6g} at meta-step {best['meta_step']} "
            f"(trial {best['trial_id']}).\n# Train it: reptile-dist train --config {path} --out runs/<name>\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _trial_id(path: str, reported: str | None) -> str:
    """The id in the trial directory's name, `run_trial_<id>_<index>_...` (the metrics of a trial
    PBT cloned another into carry the donor's id)."""
    name = Path(path).name
    if reported and f"_{reported}_" in name:
        return reported
    match = re.match(r"run_trial_([0-9a-f]+(?:_\d+)?)_\d+_", name)
    return match.group(1) if match else name


def _params_text(spec: SweepSpec, row: dict[str, Any]) -> str:
    return ", ".join(f"{d.field}={_cell(row[d.field])}" for d in spec.space)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _error_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()
