"""Where a local meta-step's time goes: the local trainer's meta-steps under cProfile, split into
the parts of a task's adaptation (drawing the task and its images, loading theta into the model,
forward, backward, the optimizer step, setting up the carried estimate and reading it back, the
float64 sums) and what is left (the per-step Python around them).

    PYTHONPATH=. python benchmarks/local_profile.py [--config omniglot-5w1s] [--steps 60] [--set inner_state=fresh]

One thread, in this process. The shares are of the profiled time, which cProfile inflates for
Python-heavy parts; compare the shares of two configurations, not their seconds with an
unprofiled run.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

from reptile_dist.config import load_config, parse_overrides
from reptile_dist.errors import UserError
from reptile_dist.plugins import build_family
from reptile_dist.reptile import OuterOptimizer, meta_step
from reptile_dist.training import make_learner

# (what, how cProfile names it: file suffix, function name)
PARTS = [
    ("drawing tasks (sampling, image decoding and conversion)", ("reptile.py", "draw_tasks")),
    ("loading theta into the model", ("reptile.py", "load")),
    ("forward (network and loss)", ("module.py", "_wrapped_call_impl")),
    ("backward", ("_tensor.py", "backward")),
    ("optimizer step", ("optimizer.py", "wrapper")),
    ("carried estimate into the optimizer", ("reptile.py", "_optimizer")),
    ("carried estimate read back", ("reptile.py", "_moment")),
    ("theta_i - theta (parameters_to_vector)", ("reptile.py", "theta")),
    ("zero_grad", ("optimizer.py", "zero_grad")),
    ("mini-batch indices", ("reptile.py", "mini_batches")),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (filename, _, function), (_, _, _, cum, _) in stats.stats.items():
        if function == name and filename.endswith(suffix):
            total += cum
    return total


def one_thread_trainer(config: str, overrides: list[str]):
    """(cfg, family, learner, outer optimizer) of the local trainer for `config` with `--set`
    overrides, in this process at one thread (inner_optimizer_probe.py and second_core_probe.py too).
    A bad config, setting or data file: one line and exit 2, as the CLI gives."""
    try:
        cfg = load_config(config, {"torch_threads": 1, **parse_overrides(overrides)})
        torch.set_num_threads(1)
        family = build_family(cfg)
        learner = make_learner(cfg, family)
    except UserError as exc:
        print(f"{os.path.basename(sys.argv[0])}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, family, learner, OuterOptimizer.for_config(cfg, learner.initial_theta())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg, family, learner, outer = one_thread_trainer(args.config, args.set)
    tasks = range(cfg.meta_batch_size)
    for step in range(3):  # torch's lazy initialisation outside the profile
        meta_step(learner, family, outer, cfg, step, tasks)
    start = time.perf_counter()
    for step in range(3, 3 + args.steps):
        meta_step(learner, family, outer, cfg, step, tasks)
    plain_s = time.perf_counter() - start
    profile = cProfile.Profile()
    profile.enable()
    for step in range(3 + args.steps, 3 + 2 * args.steps):
        meta_step(learner, family, outer, cfg, step, tasks)
    profile.disable()
    stats = pstats.Stats(profile)
    whole = cumulative(stats, "reptile.py", "meta_step")
    adapted = args.steps * cfg.meta_batch_size
    print(f"{args.config} ({cfg.inner_state} inner state), {args.steps} meta-steps x {cfg.meta_batch_size} tasks, "
          f"one thread: {adapted / plain_s:.1f} tasks/s unprofiled, {1e3 * plain_s / adapted:.1f} ms per task")
    print(f"{'part':58} {'share':>6}  {'ms/task (profiled)':>18}")
    accounted = 0.0
    for what, (suffix, name) in PARTS:
        seconds = cumulative(stats, suffix, name)
        accounted += seconds
        print(f"{what:58} {seconds / whole:6.1%}  {1e3 * seconds / adapted:18.2f}")
    print(f"{'the rest (per-task and per-step Python, sums, outer step)':58} {(whole - accounted) / whole:6.1%}  "
          f"{1e3 * (whole - accounted) / adapted:18.2f}")


if __name__ == "__main__":
    main()
