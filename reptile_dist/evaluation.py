"""Few-shot evaluation on held-out tasks, as openai/supervised-reptile defines it.

Each task: adapt theta on the support set (eval_inner_steps of the inner optimizer, starting from
the carried second-moment estimate training left when there is one, else fresh), then predict the
queries
- transductively: all queries in one batch (batch norm sees the query batch's statistics);
- non-transductively: each query in a batch of the whole support set plus that one query,
  so no two queries ever share a batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from reptile_dist.config import Config, ConfigError
from reptile_dist.reptile import InnerMoment, Learner
from reptile_dist.tasks.base import EVAL_STREAMS, Task, TaskFamily, task_rng


def non_transductive_outputs(model: torch.nn.Module, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """Outputs for each query predicted in a batch of (support set + that query)."""
    rows = [model(torch.cat([support_x, query_x[j : j + 1]]))[-1] for j in range(len(query_x))]
    return torch.stack(rows)


@dataclass
class TaskScores:
    """Per-task scores: accuracies for classification, query MSE for regression."""

    accuracy: list[float]
    transductive_accuracy: list[float]
    loss: list[float]

    def __add__(self, other: "TaskScores") -> "TaskScores":
        return TaskScores(self.accuracy + other.accuracy, self.transductive_accuracy + other.transductive_accuracy,
                          self.loss + other.loss)


def combine_scores(parts: Iterable[TaskScores | None]) -> TaskScores:
    """The scores of an evaluation sharded over processes, in shard order."""
    total = TaskScores([], [], [])
    for part in parts:
        if part is not None:
            total = total + part
    return total


SCORE_NAMES = {f.name for f in fields(TaskScores)}


def shard_bounds(tasks: int, shards: int) -> list[tuple[int, int]]:
    """Tasks 0..tasks-1 cut into up to `shards` contiguous, non-empty [lo, hi) ranges of near-equal
    size (tasks are seeded by index, so the shards' scores, combined in order, equal one process's)."""
    bounds = np.linspace(0, tasks, shards + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


TaskRange = tuple[int, int]  # tasks lo..hi-1
SCORES_BLOCK = 50  # tasks per process between two appends to a scores file: the most an interruption loses


BlockSize = int | None | Callable[[], int]  # tasks a block; a callable is asked before each block


def task_blocks(ranges: Iterable[TaskRange], size: BlockSize) -> Iterator[TaskRange]:
    """`ranges` cut into consecutive [lo, hi) blocks of at most `size` tasks (None: each range whole;
    a callable: asked before each block, as the actors that score them may change)."""
    for lo, hi in ranges:
        start = lo
        while start < hi:
            step = max((size() if callable(size) else size) or hi - start, 1)
            yield start, min(start + step, hi)
            start += step


def score_blocks(ranges: Iterable[TaskRange], size: BlockSize, score: Callable[[int, int], "TaskScores"],
                 on_block: Callable[[int, "TaskScores"], None] | None = None) -> "TaskScores":
    """The scores of the tasks in `ranges`, scored block by block (`task_blocks`) by `score(lo, hi)`
    in order, `on_block(lo, scores)` told of each block as it completes (a scores file keeps them)."""
    parts = []
    for lo, hi in task_blocks(ranges, size):
        parts.append(score(lo, hi))
        if on_block:
            on_block(lo, parts[-1])
    return combine_scores(parts)


def evaluation_identity(theta: torch.Tensor, moment: InnerMoment | None, cfg: Config, split: str,
                        transductive: bool | None) -> dict:
    """What makes two evaluations score a task alike: the weights and carried estimate (hashed),
    the config but for how many tasks, the split, the ways it scores, the kind of device."""
    digest = hashlib.sha256(theta.detach().cpu().float().numpy().tobytes())
    if moment is not None:
        digest.update(moment.sq.detach().cpu().float().numpy().tobytes())
        digest.update(repr(float(moment.steps)).encode())
    config = {k: v for k, v in cfg.to_dict().items() if k != "eval_tasks"}
    return json.loads(json.dumps({"weights_sha256": digest.hexdigest(), "split": split, "transductive": transductive,
                                  "device": theta.device.type, "config": config}, default=str))


class _NotThisEvaluation(Exception):
    """A scores file that is not of the evaluation asked for (ScoresFile decides: refuse or replace)."""


class ScoresFile:
    """The per-task scores of one evaluation, appended (and synced) block by block as they are
    scored, so an evaluation stopped part way and started again with the same file scores only the
    tasks still missing; its result is the uninterrupted one's (tasks are seeded by index).

    JSON lines: a header {"evaluation": evaluation_identity(...)}, then {"task": i, "accuracy": ...,
    "transductive_accuracy": ..., "loss": ...} per task (the scores the evaluation computes). A
    file of another evaluation (other weights, config, split or ways of scoring) is refused; a last
    line cut off by the interruption is dropped."""

    def __init__(self, path: str | Path, identity: dict, replace_other: bool = False):
        """`replace_other`: a file that is not this evaluation's (another's, or not a scores file) is
        started anew, the reason kept in `replaced`, instead of refused (a run directory's own file)."""
        self.path = Path(path)
        self.done: dict[int, dict[str, float]] = {}
        self.replaced: str | None = None
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"{self.path} is not a regular file; name a file for the scores")
        if self.path.is_file() and self.path.stat().st_size:
            try:
                self._read(identity)
                return
            except _NotThisEvaluation as exc:
                if not replace_other:
                    raise ConfigError(f"{exc}; name a new file") from None
                self.done, self.replaced = {}, str(exc)
                self.path.unlink()
        self._append([{"evaluation": identity}])

    def _read(self, identity: dict) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        whole = text[: text.rfind("\n") + 1]  # past the last newline: a line the interruption cut off
        lines = whole.splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
            records = [json.loads(line) for line in lines[1:]]
            if not (isinstance(header, dict) and isinstance(header.get("evaluation"), dict)
                    and isinstance(header["evaluation"].get("config"), dict)):
                raise ValueError("no header naming the evaluation")
            names = None
            for rec in records:
                task = rec.pop("task")
                if not isinstance(task, int) or task < 0:
                    raise ValueError(f"task {task!r} is not a task index")
                # every task has the same scores: those the evaluation computes, the loss always
                if names is None:
                    names = set(rec)
                if set(rec) != names or "loss" not in names or not names <= SCORE_NAMES:
                    raise ValueError(f"task {task} has the scores {sorted(rec)}")
                self.done[task] = {k: float(v) for k, v in rec.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise _NotThisEvaluation(f"{self.path} is not a scores file of `reptile-dist eval --scores` ({e})") from None
        if header["evaluation"] != identity:
            theirs, ours = header["evaluation"], identity
            differs = sorted(k for k in set(theirs) | set(ours) if k != "config" and theirs.get(k) != ours.get(k))
            differs += sorted(f"config.{k}" for k in set(theirs["config"]) | set(ours["config"])
                              if theirs["config"].get(k) != ours["config"].get(k))
            raise _NotThisEvaluation(f"{self.path} holds the scores of another evaluation (it differs in "
                                     f"{', '.join(differs)})")
        if len(whole) < len(text):
            with open(self.path, "r+b") as sink:
                sink.truncate(len(whole.encode("utf-8")))

    def _append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as sink:
            sink.write("".join(json.dumps(row) + "\n" for row in rows))
            sink.flush()
            os.fsync(sink.fileno())

    def missing(self, tasks: int) -> list[TaskRange]:
        """The tasks among 0..tasks-1 not scored yet, as contiguous ranges."""
        ranges: list[TaskRange] = []
        for i in range(tasks):
            if i in self.done:
                continue
            if ranges and ranges[-1][1] == i:
                ranges[-1] = (ranges[-1][0], i + 1)
            else:
                ranges.append((i, i + 1))
        return ranges

    def add(self, lo: int, scores: "TaskScores") -> None:
        """Record the scores of tasks lo, lo+1, ... (one entry per task in each non-empty list)."""
        columns = {f.name: getattr(scores, f.name) for f in fields(scores) if getattr(scores, f.name)}
        rows = [{"task": lo + i, **{name: values[i] for name, values in columns.items()}}
                for i in range(len(scores.loss))]
        self._append(rows)
        for row in rows:
            task = row.pop("task")
            self.done[task] = row

    def scored(self, tasks: int) -> int:
        """How many of tasks 0..tasks-1 are kept."""
        return tasks - sum(hi - lo for lo, hi in self.missing(tasks))

    def complete(self, tasks: int, size: BlockSize, score: Callable[[int, int], "TaskScores"]) -> "TaskScores":
        """Tasks 0..tasks-1: those missing scored by `score(lo, hi)` in blocks (score_blocks), each
        kept as it completes, then all of them in order."""
        score_blocks(self.missing(tasks), size, score, self.add)
        return self.scores(tasks)

    def scores(self, tasks: int) -> "TaskScores":
        """The scores of tasks 0..tasks-1, in order."""
        out = TaskScores([], [], [])
        for i in range(tasks):
            for name, value in self.done[i].items():
                getattr(out, name).append(value)
        return out


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0 or np.isnan(a).all():
        return float("nan"), float("nan")
    half = 1.96 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return float(a.mean()), float(half)


def score_tasks(learner: Learner, family: TaskFamily, theta: torch.Tensor, cfg: Config, split: str,
                task_indices: Iterable[int], moment: InnerMoment | None = None,
                transductive: bool | None = None) -> TaskScores:
    """Adapt to and score evaluation tasks `task_indices` of `split` (seeded by cfg.seed, split, i).
    Classification is scored both ways (`transductive` None), or only one way (True: all queries
    in one batch; False: each query beside the support set, the slower); the loss is that of the
    non-transductive outputs when they are computed."""
    scores = TaskScores([], [], [])
    for i in task_indices:
        rng = task_rng(cfg.seed, EVAL_STREAMS[split], 0, i)
        task: Task = family.eval_task(rng, split)
        score_task(learner, family.kind, theta, cfg, task, rng, moment, transductive, scores)
    learner.load(theta)
    return scores


def score_task(learner: Learner, kind: str, theta: torch.Tensor, cfg: Config, task: Task, rng: np.random.Generator,
               moment: InnerMoment | None, transductive: bool | None, scores: TaskScores) -> None:
    """Adapt theta to `task` with the evaluation's inner loop and add its scores to `scores`."""
    learner.adapt(theta, task.support_x, task.support_y, cfg.eval_inner_steps, cfg.eval_batch_size,
                  cfg.inner_replacement, rng, moment=moment)
    sx, qx, qy = (t.to(learner.device) for t in (task.support_x, task.query_x, task.query_y))
    with torch.no_grad():
        together = learner.model(qx) if transductive is not False or kind != "classification" else None
        if kind != "classification":
            scores.loss.append(learner.loss(together, qy).item())
            return
        if together is not None:
            scores.transductive_accuracy.append((together.argmax(1) == qy).float().mean().item())
        if transductive is not True:
            separate = non_transductive_outputs(learner.model, sx, qx)
            scores.accuracy.append((separate.argmax(1) == qy).float().mean().item())
        scores.loss.append(learner.loss(separate if transductive is not True else together, qy).item())


def summarize(scores: TaskScores, prefix: str = "") -> dict[str, float]:
    """Means and 95% CIs, keyed `accuracy`, `accuracy_ci95`, `transductive_accuracy`, ..."""
    out: dict[str, float] = {}
    for name, values in asdict(scores).items():
        if values:
            mean, ci = mean_ci95(values)
            out[f"{prefix}{name}"] = mean
            out[f"{prefix}{name}_ci95"] = ci
    out[f"{prefix}tasks"] = len(scores.loss)
    return out


def evaluate(learner: Learner, family: TaskFamily, theta: torch.Tensor, cfg: Config, split: str, num_tasks: int,
             moment: InnerMoment | None = None) -> dict[str, float]:
    return summarize(score_tasks(learner, family, theta, cfg, split, range(num_tasks), moment))


def headline(result: dict[str, float], kind: str) -> str:
    """One line for the terminal."""
    if kind == "classification":
        return (f"accuracy {100 * result['accuracy']:.2f}% ± {100 * result['accuracy_ci95']:.2f} "
                f"(transductive {100 * result['transductive_accuracy']:.2f}% ± {100 * result['transductive_accuracy_ci95']:.2f}) "
                f"over {result['tasks']} tasks")
    return f"query MSE {result['loss']:.4f} ± {result['loss_ci95']:.4f} over {result['tasks']} tasks"
