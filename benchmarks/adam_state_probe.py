"""How much of the gap to the paper is the inner Adam's state? A measurement on one checkpoint.

openai/supervised-reptile keeps one Adam (beta1 = 0) for the whole run: its second-moment
estimate carries over from task to task in training, and every evaluation task starts from the
estimate training left behind (its maintainers: "Reptile benefits from the Adam second moment
estimate", openai/supervised-reptile#28). reptile-dist's `inner_state: fresh` starts every task
from a fresh optimizer; `inner_state: carried` (the Omniglot presets) keeps the estimate beside theta,
each meta-step's tasks starting from it and their mean becoming the next one, so that any worker
can still adapt any task. This probe evaluates the same theta on the same test tasks twice: with
fresh Adam state, and starting from a second-moment estimate built the reference's way (one
optimizer carried through `--warm-tasks` training tasks adapted from theta one after another).

    python benchmarks/adam_state_probe.py --checkpoint pretrained/omniglot-5w1s.pt --tasks 1000

With `--train N` it measures the training side too: it meta-trains the checkpoint's preset from
scratch for N meta-steps, with the same tasks and step-size schedule, with a fresh optimizer per
task (`fresh`), with one Adam carried through every task in order (`sequential`, the reference),
and with the estimate averaged over each meta-step's tasks (`averaged`, reptile-dist's carried
state), and evaluates each the way it was trained (fresh state / the estimate training left).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from reptile_dist.pretrained import load_pretrained
from reptile_dist.config import parse_overrides
from reptile_dist.evaluation import evaluate, headline
from reptile_dist.reptile import InnerMoment, OuterOptimizer, adapt_tasks, inner_optimizer
from reptile_dist.plugins import build_family
from reptile_dist.tasks.base import TRAIN_STREAM, task_rng
from reptile_dist.training import make_learner


def adapt_carrying(learner, opt, family, theta, cfg, step: int, i: int) -> torch.Tensor:
    """Task (step, i) adapted from theta with the caller's optimizer, whose state carries on."""
    rng = task_rng(cfg.seed, TRAIN_STREAM, step, i)
    task = family.train_task(rng)
    return learner.adapt(theta, task.support_x, task.support_y, cfg.inner_steps, cfg.inner_batch_size,
                         cfg.inner_replacement, rng, opt=opt).delta


def second_moment(learner, opt) -> InnerMoment:
    params = list(learner.model.parameters())
    return InnerMoment(torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params]).clone(),
                       float(opt.state[params[0]]["step"]))


def carried_second_moment(learner, family, theta, cfg, tasks: int) -> InnerMoment:
    """The reference's training loop, with theta held still: one Adam through `tasks` tasks."""
    opt = inner_optimizer(cfg.inner_optimizer, learner.model.parameters(), cfg.inner_lr)
    for i in range(tasks):
        adapt_carrying(learner, opt, family, theta, cfg, cfg.meta_iters, i)  # a meta-step the run never drew
    learner.load(theta)
    return second_moment(learner, opt)


def meta_train(cfg, family, variant: str):
    """The local trainer's loop (θ += ε·mean delta, ε annealed) with the inner Adam state `variant`:
    fresh, sequential (one Adam through every task, the reference) or averaged (inner_state: carried)."""
    learner = make_learner(cfg, family)
    outer = OuterOptimizer(learner.initial_theta(), cfg.outer_optimizer, variant == "averaged")
    opt = inner_optimizer(cfg.inner_optimizer, learner.model.parameters(), cfg.inner_lr) if variant == "sequential" else None
    for step in range(cfg.meta_iters):
        if opt is not None:
            mean = sum(adapt_carrying(learner, opt, family, outer.theta, cfg, step, i)
                       for i in range(cfg.meta_batch_size)) / cfg.meta_batch_size
            outer.apply(mean.float(), cfg.meta_step_size_at(step))
        else:
            result = adapt_tasks(learner, family, outer.theta, cfg, step, range(cfg.meta_batch_size), outer.inner_moment)
            outer.apply((result.delta / result.tasks).float(), cfg.meta_step_size_at(step), result.mean_moment())
    moment = second_moment(learner, opt) if opt is not None else outer.inner_moment
    return learner, outer.theta, moment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tasks", type=int, default=1000, help="test tasks, the same ones for both")
    parser.add_argument("--warm-tasks", type=int, default=200, help="training tasks the carried estimate is built on")
    parser.add_argument("--data", help="prepared image table (default: the checkpoint config's)")
    parser.add_argument("--train", type=int, default=0, metavar="N", help="meta-train N steps each variant instead")
    parser.add_argument("--variants", default="fresh,sequential,averaged", help="with --train: which inner states")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --train: config overrides (e.g. init=glorot)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_pretrained(args.checkpoint)
    cfg = model.cfg.replace(data=args.data) if args.data else model.cfg
    if args.train:
        cfg = cfg.replace(meta_iters=args.train, **parse_overrides(args.overrides))
    family = build_family(cfg)
    if args.train:
        results = {}
        for name in args.variants.split(","):
            learner, theta, moment = meta_train(cfg, family, name)
            results[name] = evaluate(learner, family, theta, cfg, "test", args.tasks, moment)
            print(f"meta-trained {args.train} steps, {name} Adam state: {headline(results[name], family.kind)}", flush=True)
        print(json.dumps({"preset_of": args.checkpoint, "train_steps": args.train, "overrides": args.overrides, **results}))
        return
    learner, theta = model.learner, model.theta
    fresh = evaluate(learner, family, theta, cfg, "test", args.tasks)
    print(f"fresh Adam state: {headline(fresh, family.kind)}")
    moment = carried_second_moment(learner, family, theta, cfg, args.warm_tasks)
    carried = evaluate(learner, family, theta, cfg, "test", args.tasks, moment)
    print(f"carried second moment (reference): {headline(carried, family.kind)}")
    print(json.dumps({"checkpoint": args.checkpoint, "fresh": fresh, "carried": carried, "warm_tasks": args.warm_tasks}))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
