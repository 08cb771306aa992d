"""What every engine does around the meta-training loop: build the family, the model and theta,
claim the run directory, log, checkpoint, and finish with the held-out evaluation.

The loop itself lives with each engine (`local.py`, `engine/`), so each reads top to bottom.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reptile_dist.config import Config
from reptile_dist.evaluation import evaluate, headline
from reptile_dist.models import build_model
from reptile_dist.reptile import InnerMoment, Learner, OuterOptimizer
from reptile_dist.rundir import RunDir
from reptile_dist.tasks import TaskFamily, build_family, image_size

CHECKPOINT_FORMAT = "reptile-dist-checkpoint-v1"
FINAL_FORMAT = "reptile-dist-final-v1"


def make_learner(cfg: Config, family: TaskFamily, device: str = "cpu") -> Learner:
    """The model workspace, initialised from cfg.seed so every process builds the same theta_0."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.ways, image_size(family), cfg.init)
    return Learner(model, family.kind, cfg.inner_optimizer, cfg.inner_lr, device)


def periodic_split(family: TaskFamily) -> str:
    """Validation classes when there are any, else the test split (as the reference logs).
    Regression tasks come from a continuous family: its validation stream never meets the test tasks."""
    if family.kind == "regression":
        return "val"
    classes = getattr(family, "classes", None)
    return "val" if classes is not None and classes.splits.get("val") else "test"


def checkpoint_state(cfg: Config, step: int, outer_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Everything a resume needs: tasks are seeded by (seed, step, index), so the step counter
    is the whole of the task-sampling RNG state."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(), "outer": outer_state, **extra}


def final_state(cfg: Config, step: int, learner: Learner, theta: torch.Tensor,
                moment: InnerMoment | None = None) -> dict[str, Any]:
    """The trained model: weights, config and, with carried inner state, the second-moment estimate
    adaptations to new tasks start from."""
    learner.load(theta)
    return {
        "format": FINAL_FORMAT,
        "model_state": {k: v.detach().cpu().clone() for k, v in learner.model.state_dict().items()},
        "config": cfg.to_dict(),
        "step": step,
        "split": cfg.split if cfg.family == "omniglot" else cfg.family,
        "family": cfg.family,
        "inner_moment": moment.state_dict() if moment is not None else None,
    }


@dataclass
class Throughput:
    """Tasks per second over training time only (evaluations and checkpoints excluded)."""

    tasks: int = 0
    seconds: float = 0.0
    _started: float = field(default_factory=time.perf_counter)

    def resume(self) -> None:
        self._started = time.perf_counter()

    def pause(self, tasks: int) -> None:
        self.seconds += time.perf_counter() - self._started
        self.tasks += tasks

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class RunSetup:
    cfg: Config
    family: TaskFamily
    learner: Learner
    outer: OuterOptimizer
    run: RunDir
    start_step: int
    restored: dict[str, Any] | None


def setup_run(cfg: Config, out: str, resume: bool = False, say: Callable[[str], None] = print) -> RunSetup:
    """Load data, build theta_0 and the outer optimizer, claim `out`; restore the newest
    readable checkpoint when resuming."""
    family = build_family(cfg)
    run = RunDir(out)
    run.start(cfg, resume=resume)
    learner = make_learner(cfg, family)
    outer = OuterOptimizer(learner.initial_theta(), cfg.outer_optimizer, cfg.carries_inner_moment)
    start, restored = 0, None
    if resume:
        restored = run.latest_checkpoint(warn=say)
        if restored is not None:
            outer.load_state_dict(restored["outer"])
            start = int(restored["step"])
            run.truncate_metrics(start)
            say(f"resuming {out} from meta-step {start}")
    return RunSetup(cfg, family, learner, outer, run, start, restored)


def evaluate_before(s: RunSetup, say: Callable[[str], None] = print) -> dict[str, float]:
    split = periodic_split(s.family)
    result = evaluate(s.learner, s.family, s.outer.theta, s.cfg, split, s.cfg.eval_tasks_periodic,
                      s.outer.inner_moment)
    say(f"before meta-training ({split}): {headline(result, s.family.kind)}")
    return result


def finish_run(s: RunSetup, theta: torch.Tensor, step: int, throughput: Throughput, wall_s: float,
               before: dict[str, float] | None, extra: dict[str, Any] | None = None,
               say: Callable[[str], None] = print, test: dict[str, float] | None = None,
               moment: InnerMoment | None = None) -> dict[str, Any]:
    """Final evaluation on the test split (unless the engine already ran it, sharded), final.pt,
    metrics and summary.json. `moment`: the carried inner estimate training ended with."""
    s.run.write_final(final_state(s.cfg, step, s.learner, theta, moment))
    s.run.flush_metrics()
    if test is None:
        test = evaluate(s.learner, s.family, theta, s.cfg, "test", s.cfg.eval_tasks, moment)
    say(f"after meta-training (test): {headline(test, s.family.kind)}")
    summary: dict[str, Any] = {
        "test_accuracy": test.get("accuracy"),
        "test_ci95": test.get("accuracy_ci95", test.get("loss_ci95")),
        "test_transductive_accuracy": test.get("transductive_accuracy"),
        "test_transductive_ci95": test.get("transductive_accuracy_ci95"),
        "test_loss": test["loss"],
        "test_loss_ci95": test["loss_ci95"],
        "eval_tasks": test["tasks"],
        "meta_iters": step,
        "tasks_per_s": throughput.tasks_per_s,
        "wall_s": wall_s,
        "family": s.cfg.family,
        "split": s.cfg.split if s.cfg.family == "omniglot" else None,
        "backend": s.cfg.backend,
        "mode": s.cfg.mode if s.cfg.backend == "ray" else None,
        "workers": s.cfg.workers if s.cfg.backend == "ray" else 1,
    }
    if before:
        summary.update({f"before_{k}": v for k, v in before.items()})
    summary.update(extra or {})
    s.run.write_summary(summary)
    return summary
