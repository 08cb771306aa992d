"""The public Python API, `import reptile_dist as rd` (README: "Your own tasks and networks").

    cfg = rd.load_config("sine", {"meta_iters": 1000})
    summary = rd.train(cfg, "runs/mine", family=make_family, model=make_model)
    net = rd.load_model("runs/mine/final.pt")
    adapted = rd.adapt(net, support_x, support_y)
    rd.evaluate("runs/mine/final.pt", tasks=500)

`family(cfg) -> TaskFamily` and `model(cfg) -> nn.Module` factories take the place of the
config's `family` / `model` (reptile_dist/plugins.py); they may live in a script, a notebook or a
closure, and reach Ray workers through Ray's own serialization.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from reptile_dist.pretrained import Pretrained, adapt_task, load_pretrained, predict
from reptile_dist.config import Config, ConfigError, load_config
from reptile_dist.evaluation import (SCORES_BLOCK, ScoresFile, TaskScores, evaluation_identity, score_blocks,
                                     score_task, score_tasks, summarize)
from reptile_dist.plugins import FamilyInfo, Plugins, check_task, name_of
from reptile_dist.reptile import InnerMoment, Learner
from reptile_dist.tasks.base import EVAL_STREAMS, Task, TaskFamily, task_rng
from reptile_dist.training import set_torch_threads

Factory = Callable[..., Any]


def _with_factories(cfg: Config, family: Factory | None, model: Factory | None) -> tuple[Config, Plugins]:
    """The config naming the factories (their import paths, or `object:...`) and the plug-ins."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a Config (rd.load_config), got {type(cfg).__name__}")
    changes = {}
    for key, factory in (("family", family), ("model", model)):
        if factory is not None:
            if not callable(factory):
                raise ConfigError(f"{key}= must be a factory {key}(cfg), got a {type(factory).__name__}")
            changes[key] = name_of(factory)
    cfg = cfg.replace(**changes)
    return cfg, Plugins.of(cfg, family, model)


def train(cfg: Config, out: str, *, family: Factory | None = None, model: Factory | None = None,
          resume: bool = False, on_log: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
          say: Callable[[str], None] = print) -> dict[str, Any]:
    """Meta-train with the backend the config names (local; Ray sync, async or allreduce with
    cfg.workers, joining cfg.address when set) into the run directory `out`; the summary (the
    keys of summary.json). `on_log(row)`: called with every logged row (not with allreduce)."""
    cfg, plugins = _with_factories(cfg, family, model)
    if cfg.backend == "local" and cfg.address:
        raise ConfigError(f"address={cfg.address} needs backend: ray (--backend ray)")
    if cfg.backend == "local":
        from reptile_dist.local import train_local

        return train_local(cfg, out, resume=resume, progress=progress, say=say, on_log=on_log, plugins=plugins)
    from reptile_dist.engine.driver import train_ray

    return train_ray(cfg, out, resume=resume, progress=progress, say=say, on_log=on_log, plugins=plugins)


def _load(checkpoint: str, model: Factory | None, device: str | None,
          overrides: dict[str, Any] | None = None) -> Pretrained:
    return load_pretrained(checkpoint, model, device, images=False, overrides=overrides)


class TrainedModel:
    """What `load_model` attaches to the network it returns, as `network.reptile`: the run's config,
    its meta-step, the family it was trained on (kind, input shape, image preparation) and the
    carried inner second-moment estimate (None with fresh inner state) adaptation starts from."""

    def __init__(self, pretrained: Pretrained):
        self.config = pretrained.cfg
        self.step = pretrained.step
        self.family = pretrained.info
        self.inner_moment = pretrained.moment
        self._loss = pretrained.learner.loss


def load_model(checkpoint: str, *, model: Factory | None = None, device: str | None = None) -> nn.Module:
    """The trained network of a final.pt with theta loaded, built by the run's own network plug-in
    (or the `model` factory: a run trained on a Python object needs it again), on `device` (default
    auto); `network.reptile` is its TrainedModel."""
    pretrained = _load(checkpoint, model, device)
    network = pretrained.learner.model
    network.reptile = TrainedModel(pretrained)
    return network


def _pretrained_of(trained: str | nn.Module, model: Factory | None) -> Pretrained:
    if isinstance(trained, str):
        return _load(trained, model, None)
    info = getattr(trained, "reptile", None)
    if not isinstance(trained, nn.Module) or not isinstance(info, TrainedModel):
        raise ConfigError("expected a final.pt path or a network from rd.load_model")
    network = copy.deepcopy(trained)  # adapting never changes the caller's network
    del network.reptile
    device = next(network.parameters()).device
    learner = Learner(network, info.family.kind, info.config.inner_optimizer, info.config.inner_lr, device,
                      info._loss)
    theta = parameters_to_vector(network.parameters()).detach().clone().cpu()
    return Pretrained(info.config, learner, theta, info.step, info.inner_moment, info.family)


def adapt(trained: str | nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, *, steps: int | None = None,
          seed: int = 0, model: Factory | None = None) -> nn.Module:
    """A copy of the trained network adapted to one task (support_x, support_y) with the run's
    evaluation inner loop (`steps`: default eval_inner_steps), as `reptile-dist adapt` and
    held-out evaluation adapt; from the carried second-moment estimate when the run kept one.
    `trained`: a final.pt path or a network from `load_model`."""
    pretrained = _pretrained_of(trained, model)
    if steps is not None and steps < 0:
        raise ConfigError(f"steps={steps} is out of range (must be >= 0)")
    adapted = copy.deepcopy(adapt_task(pretrained, support_x, support_y, steps, seed))
    pretrained.learner.load(pretrained.theta)
    return adapted


def evaluate(checkpoint: str, tasks: int | Iterable[Task] | None = None, *, split: str = "test",
             transductive: bool | None = None, family: Factory | None = None, model: Factory | None = None,
             overrides: dict[str, Any] | None = None, device: str | None = None, workers: int = 1,
             address: str | None = None, scores: str | None = None) -> dict[str, float]:
    """Adapt a final.pt to held-out tasks and score them, as training's final evaluation does:
    mean accuracy (classification, each query beside the support set) and transductive accuracy
    (all queries in one batch) with 95% CIs, or the query loss (regression).

    `tasks`: how many tasks of `split` the run's family draws (default the config's eval_tasks),
    or your own Task objects. `transductive`: None scores both ways; True or False only that one
    (non-transductive is the slower). `overrides`: config changes (e.g. {"data": ...}).
    `workers` > 1 or an `address`: the drawn tasks are scored in shards by that many Ray actors (a
    local cluster started for it, or the one at `address`), with the same result as one process
    (on the same kind of device; a network with dropout draws differently). `scores`: a file that
    keeps every task's scores as they are computed (ScoresFile), so an evaluation stopped part way
    and run again with it scores only the tasks still missing."""
    pretrained = _load(checkpoint, model, device, overrides)
    cfg = pretrained.cfg
    if split not in EVAL_STREAMS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(EVAL_STREAMS)}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} is out of range (must be an integer >= 1)")
    threads = set_torch_threads(cfg)
    try:
        return _evaluate(pretrained, cfg, tasks, split, transductive, family, model, workers, address, scores)
    finally:
        torch.set_num_threads(threads)


def _evaluate(pretrained: Pretrained, cfg: Config, tasks, split: str, transductive: bool | None,
              family: Factory | None, model: Factory | None, workers: int, address: str | None,
              scores: str | None) -> dict[str, float]:
    learner, theta = pretrained.learner, pretrained.theta
    moment = pretrained.moment if cfg.carries_inner_moment else None  # overrides may say inner_state=fresh
    if tasks is None or isinstance(tasks, int):
        count = cfg.eval_tasks if tasks is None else tasks
        plugins = Plugins.of(cfg, family, model)
        built = plugins.build_family(cfg)  # here first: a missing table or a bad plug-in is one line, not an actor's
        kept = ScoresFile(scores, evaluation_identity(theta, moment, cfg, split, transductive)) if scores else None
        todo = kept.missing(count) if kept else ([(0, count)] if count else [])
        already = count - sum(hi - lo for lo, hi in todo)  # (0 without a file)
        if already:
            print(f"{scores}: {already} of the {count} tasks scored already; scoring the rest", file=sys.stderr)
        on_block = kept.add if kept else None
        if todo and (workers > 1 or address):  # (all kept already: no cluster needed)
            from reptile_dist.engine.sharded_eval import score_on_ray

            scored = score_on_ray(cfg, plugins, theta.cpu().numpy(), moment, split, todo, workers, address,
                                  transductive, on_gpus=theta.device.type == "cuda",
                                  block=SCORES_BLOCK * workers if kept else None, on_block=on_block)
        else:
            scored = score_blocks(todo, SCORES_BLOCK if kept else None, on_block=on_block,
                                  score=lambda lo, hi: score_tasks(learner, built, theta, cfg, split, range(lo, hi),
                                                                   moment, transductive))
        return summarize(kept.scores(count) if kept else scored)
    if scores:
        raise ConfigError("scores keeps the tasks a family draws, by index; your own Task objects are scored "
                          "without it")
    if workers > 1 or address:
        raise ConfigError("workers and address shard the tasks a family draws; your own Task objects are scored "
                          "in this process")
    own = TaskScores([], [], [])
    for i, task in enumerate(tasks):
        check_task(task, cfg.family, f"task {i}")
        rng = task_rng(cfg.seed, EVAL_STREAMS[split], 0, i)  # as score_tasks seeds task i
        score_task(learner, pretrained.info.kind, theta, cfg, task, rng, moment, transductive, own)
    learner.load(theta)
    return summarize(own)


__all__ = ["Config", "FamilyInfo", "InnerMoment", "Task", "TaskFamily", "TrainedModel", "adapt", "evaluate",
           "load_config", "load_model", "predict", "train"]
