"""Looking at runs from their folders: `status` (where a running or finished run stands) and `plot`
(learning curves of one or more runs side by side). Both read the streamed rows (metrics.jsonl),
so they work on a run that is still going, and summary.json once it has finished.
"""
from __future__ import annotations

import io
import math
import numbers
import os
import time
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from reptile_dist.config import Config
from reptile_dist.errors import UserError
from reptile_dist.files import atomic_write
from reptile_dist.rundir import LOCK_FILE, METRICS_STREAM, RunDir

X_AXES = {"step": "meta-step", "tasks": "tasks adapted", "wall": "wall-clock s (sessions joined)"}
SPEED_WINDOW = 20  # the newest rows the ETA's pace is measured over


class RunViewError(UserError):
    """A folder given to `status` or `plot` is not a run, or holds nothing to show."""


def open_run(run: str) -> tuple[RunDir, Config]:
    """The run directory `run` (local or remote) and the configuration it records."""
    folder = RunDir(run)
    try:
        cfg = folder.recorded_config()
    except OSError as exc:
        raise RunViewError(f"{run} cannot be read ({' '.join(str(exc).split())})") from None
    if cfg is None:
        raise RunViewError(f"{run} is not a run directory (no config.yaml)")
    return folder, cfg


def run_status(run: str) -> dict[str, Any]:
    """Where `run` stands: its state (running, stopped, finished; `unfinished` for a remote run,
    whose lock cannot be seen), meta-step, tasks/s, ETA, the latest evaluation, workers replaced
    and, once finished, the test result."""
    folder, cfg = open_run(run)
    rows = folder.read_metrics()
    steps = _metric_rows(rows)
    last = steps[-1] if steps else {}
    step = int(last.get("step", 0))
    finished = folder.is_finished()
    state = "finished" if finished else _activity(folder)
    status: dict[str, Any] = {
        "run": run, "state": state, "step": step, "meta_iters": cfg.meta_iters,
        "progress": step / cfg.meta_iters, "train_loss": finite_number(last.get("train_loss")),
        "tasks_per_s": finite_number(last.get("tasks_per_s")), "eta_s": None, "last_row_age_s": _age(folder),
        "latest_eval": _latest_eval(rows), "workers_replaced": None, "ps_restarts": None, "test": None,
        "checkpoints": len(folder.checkpoints()),
    }
    for key in ("workers_replaced", "ps_restarts"):
        status[key] = next((r[key] for r in reversed(steps) if key in r), None)
    if state in ("running", "unfinished"):
        pace = _seconds_per_step(steps, cfg)
        if pace is not None:
            status["eta_s"] = pace * (cfg.meta_iters - step)
    if finished:
        summary = folder.read_summary()
        status["test"] = {k: summary.get(k) for k in ("test_accuracy", "test_ci95", "test_loss", "test_loss_ci95",
                                                      "eval_tasks", "wall_s")}
        for key in ("workers_replaced", "ps_restarts"):
            if summary.get(key) is not None:
                status[key] = summary[key]
    return status


def format_status(status: dict[str, Any]) -> str:
    """`status` as a few lines for the terminal."""
    lines = [f"{status['run']}: {status['state']}, meta-step {status['step']}/{status['meta_iters']} "
             f"({100 * status['progress']:.1f}%)"]
    speed = []
    if status["tasks_per_s"] is not None:
        speed.append(f"tasks/s {status['tasks_per_s']:.3g}")
    if status["eta_s"] is not None:
        speed.append(f"ETA {_duration(status['eta_s'])}")
    if status["last_row_age_s"] is not None and status["state"] != "finished":
        speed.append(f"last row {_duration(status['last_row_age_s'])} ago")
    if speed:
        lines.append("  " + ", ".join(speed))
    if status["train_loss"] is not None:
        lines.append(f"  train loss {status['train_loss']:.4g}")
    ev = status["latest_eval"]
    lines.append(f"  latest evaluation (meta-step {ev['step']:g}): {_score(ev['metric'], ev['value'], ev['ci95'])}"
                 if ev else "  no periodic evaluation yet")
    if status["workers_replaced"] is not None:
        lines.append(f"  workers replaced {status['workers_replaced']}, parameter server restarts "
                     f"{status['ps_restarts'] or 0}")
    test = status["test"]
    if test:
        if test.get("test_accuracy") is not None:
            result = _score("accuracy", test["test_accuracy"], test.get("test_ci95"))
        else:
            result = _score("loss", test.get("test_loss"), test.get("test_loss_ci95"))
        lines.append(f"  test: {result} over {test.get('eval_tasks')} tasks, wall {_duration(test.get('wall_s'))}")
    elif status["state"] == "stopped":
        resume = f"`reptile-dist train --out {status['run']} --resume`"
        lines.append("  stopped before the end: " + (f"{resume} continues it from its last checkpoint"
                                                     if status["checkpoints"] else
                                                     f"no checkpoint yet; {resume} starts it again from meta-step 0"))
    return "\n".join(lines)


def plot_runs(runs: list[str], out: str, x: str = "step") -> str:
    """A PNG of the runs' learning curves side by side: training loss, and the periodic evaluation
    (accuracy, or loss for regression) with its 95% CI band; x: meta-step, tasks or wall-clock."""
    if x not in X_AXES:
        raise RunViewError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    curves = []
    for run in runs:
        folder, cfg = open_run(run)
        curves.append(_curves(folder.read_metrics(), cfg, x))
    if not any(c["train"] or c["eval_accuracy"] or c["eval_loss"] for c in curves):
        raise RunViewError(f"no metric rows yet in {', '.join(runs)}")
    metric = "eval_accuracy" if any(c["eval_accuracy"] for c in curves) else "eval_loss"
    names = [os.path.basename(run.rstrip("/")) or run for run in runs]
    labels = names if len(set(names)) == len(names) else list(runs)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    train_ax, eval_ax = fig.subplots(1, 2)
    for label, c in zip(labels, curves):
        line = train_ax.plot(*zip(*c["train"]), lw=1.2, label=label)[0] if c["train"] else None
        color = line.get_color() if line is not None else None
        if c[metric]:
            xs, ys, ci = (list(v) for v in zip(*c[metric]))
            drawn = eval_ax.plot(xs, ys, "o-", ms=3, color=color, label=label)[0]
            eval_ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)],
                                 color=drawn.get_color(), alpha=0.2, lw=0)
    train_ax.set(xlabel=X_AXES[x], ylabel="training loss", title="training loss (meta-batch mean)")
    what = "accuracy" if metric == "eval_accuracy" else "loss"
    eval_ax.set(xlabel=X_AXES[x], ylabel=f"evaluation {what}", title=f"periodic evaluation {what}, 95% CI")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not eval_ax.lines:
        eval_ax.text(0.5, 0.5, "no periodic evaluation yet", ha="center", va="center", transform=eval_ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(out, buf.getvalue())
    return out


def _metric_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of meta-steps as logged (they carry wall_s): not events (`worker 1 replaced`) nor
    the rows of evaluations that finished after their meta-step's row (Ray runs)."""
    return [r for r in rows if "event" not in r and finite_number(r.get("wall_s")) is not None]


def _curves(rows: list[dict[str, Any]], cfg: Config, x: str) -> dict[str, list[tuple[float, ...]]]:
    """(x, training loss) and (x, evaluation value, its CI) for eval_accuracy and eval_loss.

    Wall-clock restarts from 0 in each session of a resumed run: the sessions are joined end to end
    (the time redone after a resume is not counted twice). An evaluation takes the x of its meta-step."""
    steps = _metric_rows(rows)
    xs, offset, previous = [], 0.0, 0.0
    for row in steps:
        wall = row["wall_s"]
        if wall < previous:
            offset += previous
        previous = wall
        xs.append({"step": row["step"], "tasks": row["step"] * cfg.meta_batch_size, "wall": offset + wall}[x])
    known = sorted(zip((r["step"] for r in steps), xs))

    def x_of(step: float) -> float:
        if x != "wall":
            return step * (cfg.meta_batch_size if x == "tasks" else 1)
        return float(np.interp(step, [s for s, _ in known], [v for _, v in known])) if known else 0.0

    out: dict[str, list[tuple[float, ...]]] = {
        "train": [(v, r["train_loss"]) for v, r in zip(xs, steps) if finite_number(r.get("train_loss")) is not None]}
    for metric in ("eval_accuracy", "eval_loss"):
        out[metric] = sorted((x_of(r["step"]), r[metric], finite_number(r.get(f"{metric}_ci95")) or 0.0)
                             for r in rows if "step" in r and finite_number(r.get(metric)) is not None)
    return out


def _latest_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation of the highest meta-step (a Ray run's finish out of order)."""
    found = []
    for row in rows:
        for metric in ("accuracy", "loss"):
            value = finite_number(row.get(f"eval_{metric}"))
            if value is not None and "step" in row:
                found.append({"step": row["step"], "metric": metric, "value": value,
                              "ci95": finite_number(row.get(f"eval_{metric}_ci95"))})
                break
    return max(found, key=lambda e: e["step"]) if found else None


def _seconds_per_step(rows: list[dict[str, Any]], cfg: Config) -> float | None:
    """Wall-clock seconds a meta-step takes (evaluations and checkpoints included), over the newest
    rows of the newest session; else from tasks/s."""
    recent: list[dict[str, Any]] = []
    for row in reversed(rows):
        wall = finite_number(row.get("wall_s"))
        if wall is None or (recent and wall >= recent[-1]["wall_s"]) or len(recent) == SPEED_WINDOW:
            break
        recent.append(row)
    if len(recent) >= 2 and recent[0]["step"] > recent[-1]["step"]:
        return (recent[0]["wall_s"] - recent[-1]["wall_s"]) / (recent[0]["step"] - recent[-1]["step"])
    speed = finite_number(rows[-1].get("tasks_per_s")) if rows else None
    return cfg.meta_batch_size / speed if speed else None


def _activity(folder: RunDir) -> str:
    """running (a training holds the folder's lock), stopped, or unfinished (remote: no lock to see)."""
    if not folder.local:
        return "unfinished"
    return "running" if _lock_held(folder.path(LOCK_FILE)) else "stopped"


def _lock_held(path: str) -> bool:
    """Whether a process holds the flock on `path`, read from /proc/locks (taking the lock to
    test it could refuse a training starting at that moment); elsewhere, tested with a shared lock."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    try:
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return _lock_test(path)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted
               for fields in (line.split() for line in table.splitlines()))


def _lock_test(path: str) -> bool:
    import fcntl

    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _age(folder: RunDir) -> float | None:
    """Seconds since metrics.jsonl was last written."""
    info = folder.fs.get_file_info(folder.path(METRICS_STREAM))
    if info.type != pafs.FileType.File or info.mtime is None:
        return None
    return max(0.0, time.time() - info.mtime.timestamp())


def finite_number(value: Any) -> float | None:
    """A logged or reported number as a float; None for a missing, non-numeric or non-finite one
    (NaN is how pandas fills a column another row had). numpy scalars count as numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _score(metric: str, value: float | None, ci: float | None) -> str:
    if value is None:
        return "n/a"
    if metric == "accuracy":
        return f"accuracy {100 * value:.2f}%" + (f" ± {100 * ci:.2f}" if ci is not None else "")
    return f"loss {value:.4g}" + (f" ± {ci:.2g}" if ci is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
