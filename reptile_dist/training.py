"""What every engine does around the meta-training loop: build the family, the model and theta,
claim the run directory, log, checkpoint, and finish with the held-out evaluation; and the loop
itself, for the engines that run it in-process (the local trainer, each all-reduce rank).

    for each meta-step: reptile.meta_step -> a log row, a periodic evaluation and a checkpoint
                        when the Cadence says so
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from reptile_dist.config import Config, ConfigError
from reptile_dist.errors import RunFailed
from reptile_dist.evaluation import SCORES_BLOCK, ScoresFile, evaluate, evaluation_identity, headline, score_tasks, summarize
from reptile_dist.reptile import DeltaSum, InnerMoment, Learner, OuterOptimizer, meta_step
from reptile_dist.rundir import RunDir, RunDirError, config_differences, config_identity, run_defining
from reptile_dist.plugins import Plugins, check_network, family_info
from reptile_dist.tasks import TaskFamily

CHECKPOINT_FORMAT = "reptile-dist-checkpoint-v1"
FINAL_FORMAT = "reptile-dist-final-v1"
TEST_SCORES = "test-scores.jsonl"  # in a run directory: the final evaluation's every task's scores, as they come


def make_learner(cfg: Config, family: TaskFamily, device: str | torch.device = "cpu",
                 plugins: Plugins | None = None, check: bool = True) -> Learner:
    """The model workspace, initialised from cfg.seed so every process builds the same theta_0,
    and (`check`) tried on a sample task (plugins.check_network). `family` may be the FamilyInfo
    stand-in a trained model's file records (then nothing is checked: there are no tasks)."""
    plugins = plugins or Plugins.of(cfg)
    torch.manual_seed(cfg.seed)
    model = plugins.build_model(cfg, family)
    learner = Learner(model, family.kind, cfg.inner_optimizer, cfg.inner_lr, device, plugins.loss_for(family.kind))
    if check:
        check_network(learner.model, family, cfg, learner.loss, learner.device)
    learner.family_info = family_info(family)
    return learner


@dataclass
class Prepared:
    """What a run builds before it touches its run directory or Ray: the plug-ins, the family with
    its data, and the learner, checked on a sample task."""

    plugins: Plugins
    family: TaskFamily
    learner: Learner


def prepare_run(cfg: Config, plugins: Plugins | None = None, device: str | torch.device = "cpu") -> Prepared:
    plugins = plugins or Plugins.of(cfg)
    family = plugins.build_family(cfg)
    return Prepared(plugins, family, make_learner(cfg, family, device, plugins))


def resolve_device(cfg: Config) -> torch.device:
    """The device `cfg.device` names for an in-process trainer, eval or adapt: `auto` is the first
    GPU when torch sees one, else the CPU. A GPU asked for and absent is a one-line error."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device}, but torch sees no GPU here (torch.cuda.is_available() is False); "
                              f"use device=auto or device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={cfg.device}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def periodic_split(family: TaskFamily) -> str:
    """The split periodic evaluations score: `val`, which every family answers (TaskFamily's
    protocol), unless it is a table of image classes without validation classes, which fall back
    to the test split (as the reference logs)."""
    classes = getattr(family, "classes", None)
    if family.kind == "regression" or classes is None:
        return "val"
    return "val" if classes.splits.get("val") else "test"


def checkpoint_state(cfg: Config, step: int, outer_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Everything a resume needs: tasks are seeded by (seed, step, index), so the step counter
    is the whole of the task-sampling RNG state. A theta that is not finite is never checkpointed
    (the rotation would otherwise drop the last good checkpoint for it)."""
    require_finite(outer_state["theta"], step)
    return {"format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(),
            "config_identity": config_identity(cfg), "outer": outer_state, **extra}


def require_finite(theta: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(theta).all()):
        raise RunFailed(f"theta is no longer finite at meta-step {step}; stopped, the last good checkpoint kept")


class UpdateGuard:
    """The finite-update guard every loop applies before an outer update (the parameter server's
    aggregator applies the same rule per push): a sum holding NaN or Inf is skipped, and
    `max_rejected_updates` skipped in a row stop the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def admit(self, total: DeltaSum, step: int) -> bool:
        if total.tasks and total.finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RunFailed(f"every update was rejected for {self.in_a_row} meta-steps in a row (non-finite "
                            f"losses or deltas?); stopped at meta-step {step}, checkpoints kept")
        return False


def final_state(cfg: Config, step: int, learner: Learner, theta: torch.Tensor,
                moment: InnerMoment | None = None) -> dict[str, Any]:
    """The trained model: weights, config and, with carried inner state, the second-moment estimate
    adaptations to new tasks start from."""
    require_finite(theta, step)
    learner.load(theta)
    return {
        "format": FINAL_FORMAT,
        "model_state": {k: v.detach().cpu().clone() for k, v in learner.model.state_dict().items()},
        "config": cfg.to_dict(),
        "step": step,
        "split": cfg.split if cfg.family == "omniglot" else cfg.family,
        "family": cfg.family,
        "family_info": learner.family_info,
        "inner_moment": moment.state_dict() if moment is not None else None,
    }


IN_PROCESS_THREADS = 1


def set_torch_threads(cfg: Config, cpus: float | None = None) -> int:
    """Set torch's intra-op threads for this process: cfg.torch_threads when given, else the CPUs
    Ray granted it (rounded up), else IN_PROCESS_THREADS. Returns the count before, to restore.

    Not torch's own default (every core): for these networks a second thread bought the local
    trainer nothing on the machines measured, and beside one busy process OpenMP's threads spin
    waiting for a core (a run took 6x the wall time and 8x the CPU; README, "Threads")."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads or (max(1, math.ceil(cpus)) if cpus else IN_PROCESS_THREADS))
    return before


@dataclass(frozen=True)
class Cadence:
    """When a loop logs a row, runs a periodic evaluation and saves a checkpoint; the same for
    every engine. `before` and `now` are meta-steps done (fractional for async, where progress is
    applied tasks / meta_batch_size): an event is due when a multiple of its interval lies in
    (before, now]. The last meta-step is always logged and checkpointed (a failure in the final
    evaluation then redoes nothing) and, when periodic evaluation is on, evaluated."""

    meta_iters: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, cfg: Config) -> "Cadence":
        return cls(cfg.meta_iters, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)

    def _crossed(self, every: int, before: float, now: float) -> bool:
        return bool(every) and math.floor(now / every) > math.floor(before / every)

    def _last(self, before: float, now: float) -> bool:
        return before < self.meta_iters <= now

    def log(self, before: float, now: float) -> bool:
        return self._crossed(self.log_every, before, now) or self._last(before, now)

    def evaluate(self, before: float, now: float) -> bool:
        return bool(self.eval_every) and (self._crossed(self.eval_every, before, now) or self._last(before, now))

    def checkpoint(self, before: float, now: float) -> bool:
        return self._crossed(self.checkpoint_every, before, now) or self._last(before, now)


class LoopHooks:
    """Hooks a benchmark puts into a training loop (reptile-dist bench: a straggler, a timed
    window); a training run uses this base, which does nothing. Hooks travel to Ray actors and
    Ray Train workers by pickling, so a subclass keeps picklable state."""

    def after_adapt(self, worker: int, adapt_s: float) -> None:
        """Called by worker (or rank) `worker` after adapting its share, before the sum leaves it."""

    def after_step(self, combine_s: float) -> None:
        """Called after each meta-step with the seconds spent combining the shares (the all-reduce)."""

    def should_stop(self) -> bool:
        """Asked after each adaptation; True ends training after this meta-step."""
        return False

    def result(self) -> Any:
        """What the hook measured, returned to whoever started the loop."""
        return None


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
    plugins: Plugins


def log_row(step: int, step_size: float, total: DeltaSum, tasks_per_s: float, wall_s: float) -> dict[str, Any]:
    return {"step": step, "meta_step_size": step_size, "train_loss": total.loss_sum / total.tasks,
            "train_accuracy": total.accuracy_sum / total.tasks, "tasks_per_s": tasks_per_s, "wall_s": wall_s}


def meta_train(cfg: Config, learner: Learner, family: TaskFamily, outer: OuterOptimizer, start_step: int,
               task_indices: Iterable[int], evaluate_split: Callable[[str, int], dict[str, float]],
               record: Callable[[int, dict[str, Any] | None, bool], None], *,
               combine: Callable[[DeltaSum, bool], tuple[DeltaSum, bool]] | None = None, hooks: LoopHooks | None = None,
               worker: int = 0, on_step: Callable[[int], None] | None = None) -> Throughput:
    """Meta-steps start_step .. meta_iters - 1 of this process's `task_indices`.

    `combine(part, stop) -> (total, stop)`: adds this process's sum to the others' (the all-reduce),
    voting with this process's `stop`, and says whether any process voted to stop; none when this
    process adapts the whole meta-batch. `hooks`: a benchmark's (`LoopHooks`).
    `evaluate_split(split, tasks)`: a periodic evaluation. `record(step, row, checkpoint)` is
    called whenever a row is due or a checkpoint (then `checkpoint` is True), on every process
    alike (the all-reduce's report is a barrier); only one of them writes. `on_step(step)`: after
    every meta-step (a progress bar)."""
    cadence = Cadence.of(cfg)
    guard = UpdateGuard(cfg.max_rejected_updates)
    hooks = hooks or LoopHooks()
    throughput = Throughput()
    started = time.perf_counter()
    split = periodic_split(family)
    for step in range(start_step, cfg.meta_iters):
        throughput.resume()
        adapt_started = time.perf_counter()
        stop, combine_s = False, 0.0

        def combined(part: DeltaSum) -> DeltaSum:
            nonlocal stop, combine_s
            hooks.after_adapt(worker, time.perf_counter() - adapt_started)
            stop = hooks.should_stop()
            if combine is None:
                return part
            combine_started = time.perf_counter()
            total, stop = combine(part, stop)
            combine_s = time.perf_counter() - combine_started
            return total

        total = meta_step(learner, family, outer, cfg, step, task_indices, combined,
                          admit=lambda total: guard.admit(total, step))
        throughput.pause(total.tasks)
        done = step + 1
        row = None
        if cadence.log(step, done):
            row = log_row(done, cfg.meta_step_size_at(step), total, throughput.tasks_per_s,
                          time.perf_counter() - started)
            if cadence.evaluate(step, done):
                ev = evaluate_split(split, cfg.eval_tasks_periodic)
                row.update({f"eval_{k}": v for k, v in ev.items() if k != "tasks"})
        checkpoint = cadence.checkpoint(step, done)
        if row is not None or checkpoint:
            record(done, row, checkpoint)
        hooks.after_step(combine_s)
        if on_step is not None:
            on_step(done)
        if stop:
            break
    return throughput


def setup_run(cfg: Config, out: str, resume: bool = False, say: Callable[[str], None] = print,
              prepared: Prepared | None = None, device: str | torch.device = "cpu") -> RunSetup:
    """Load data, build theta_0 and the outer optimizer, claim `out`; when resuming, restore the
    newest readable checkpoint, which must belong to this configuration. A run that stopped before
    its first checkpoint starts again from meta-step 0 (nothing saved is lost); one whose every
    checkpoint is unreadable is refused, and left as it is. The family and network (`prepared`,
    else built here) are built and checked before the run directory is touched."""
    prepared = prepared or prepare_run(cfg, device=device)
    plugins, family, learner = prepared.plugins, prepared.family, prepared.learner
    run = RunDir(out)
    run.start(cfg, resume=resume)
    try:
        outer = OuterOptimizer.for_config(cfg, learner.initial_theta().cpu())
        start, restored = 0, None
        if resume:
            restored = run.latest_checkpoint(warn=say)
            if restored is not None:
                _check_restored(restored, cfg, out)
                outer.load_state_dict(restored["outer"])
                start = int(restored["step"])
                run.truncate_metrics(start)
                say(f"resuming {out} from meta-step {start}")
            elif found := len(run.checkpoints()):
                raise RunDirError(f"{out} has no readable checkpoint to resume from ({found} found, none readable); "
                                  f"start the run again in another folder")
            else:  # stopped before its first checkpoint: every row it logged is redone
                run.truncate_metrics(-1)
                say(f"{out} stopped before its first checkpoint; starting it again from meta-step 0")
    except BaseException:
        run.release()
        raise
    return RunSetup(cfg, family, learner, outer, run, start, restored, plugins)


def _check_restored(state: dict[str, Any], cfg: Config, out: str) -> None:
    """A checkpoint resumes only the configuration that wrote it (config.yaml can be edited)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"the newest checkpoint in {out} has format {state.get('format')!r}, "
                          f"not {CHECKPOINT_FORMAT!r}; it cannot be resumed by this version")
    try:
        written_by = Config().replace(**state["config"])
    except ConfigError as exc:
        raise RunDirError(f"the newest checkpoint in {out} holds a configuration this version refuses: {exc}") from None
    differs = config_differences(written_by, cfg)
    if differs:
        raise RunDirError(f"the newest checkpoint in {out} (meta-step {state['step']}) was written with another "
                          f"configuration (differs in: {', '.join(differs)}); resume with the configuration it "
                          f"was written with, or start a new run")


def finished_run(out: str, resume: bool, say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The summary of the finished run in `out` when asked to resume it (nothing is changed), else None."""
    if not resume:
        return None
    run = RunDir(out)
    if not run.is_finished():
        return None
    summary = run.read_summary()
    say(f"{out} is a finished run ({summary.get('meta_iters')} meta-steps); nothing to resume")
    return summary


def evaluate_before(s: RunSetup, say: Callable[[str], None] = print) -> dict[str, float]:
    split = periodic_split(s.family)
    result = evaluate(s.learner, s.family, s.outer.theta, s.cfg, split, s.cfg.eval_tasks_periodic,
                      s.outer.inner_moment)
    say(f"before meta-training ({split}): {headline(result, s.family.kind)}")
    return result


def kept_test_scores(s: RunSetup, theta: torch.Tensor, moment: InnerMoment | None, devices: str,
                     say: Callable[[str], None] = print) -> ScoresFile | None:
    """The final evaluation's scores file in the run directory (TEST_SCORES), so a final evaluation
    stopped part way (a kill, a crash, a lost cluster) goes on from the tasks it kept when the run
    is resumed. It names the final weights, the settings that define the run (the engine and the
    workers may change between invocations, as they may on resume: the scores do not depend on
    them) and the kinds of device that score (`devices`: "cpu", "cpu+cuda"; they do). A file that
    is not this evaluation's is replaced, with a line said. None for a run directory in an object
    store (which cannot append): the evaluation is then scored whole."""
    if not s.run.local:
        return None
    path = Path(s.run.path(TEST_SCORES))
    identity = dict(evaluation_identity(theta, moment, run_defining(s.cfg), "test", None), device=devices)
    kept = ScoresFile(path, identity, replace_other=True)
    if kept.replaced:
        say(f"{kept.replaced}: scoring the test tasks anew")
    already = kept.scored(s.cfg.eval_tasks)
    if already:
        say(f"{already} of the {s.cfg.eval_tasks} test tasks scored already ({path}); scoring the rest")
    return kept


def final_evaluation(s: RunSetup, theta: torch.Tensor, moment: InnerMoment | None,
                     say: Callable[[str], None] = print) -> dict[str, float]:
    """The test evaluation in this process, kept task by task in the run directory (kept_test_scores)."""
    kept = kept_test_scores(s, theta, moment, s.learner.device.type, say)
    if kept is None:
        return evaluate(s.learner, s.family, theta, s.cfg, "test", s.cfg.eval_tasks, moment)
    return summarize(kept.complete(s.cfg.eval_tasks, SCORES_BLOCK, lambda lo, hi: score_tasks(
        s.learner, s.family, theta, s.cfg, "test", range(lo, hi), moment)))


def finish_run(s: RunSetup, theta: torch.Tensor, step: int, throughput: Throughput, wall_s: float,
               before: dict[str, float] | None, extra: dict[str, Any] | None = None,
               say: Callable[[str], None] = print, test: dict[str, float] | None = None,
               moment: InnerMoment | None = None) -> dict[str, Any]:
    """Final evaluation on the test split (unless the engine already ran it, sharded), final.pt,
    metrics and summary.json. `moment`: the carried inner estimate training ended with."""
    s.run.write_final(final_state(s.cfg, step, s.learner, theta, moment))
    s.run.flush_metrics()
    if test is None:
        test = final_evaluation(s, theta, moment, say)
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
