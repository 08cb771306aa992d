"""The inner optimizer's kernels, side by side: the local trainer's meta-steps with torch's
multi-tensor (`foreach`) kernels, as `reptile.inner_optimizer` asks for them, against torch's
CPU default of one parameter at a time, in alternating rounds in this one process (this
machine's drift between minutes stays out of the ratio), and whether both end at the same theta (and carried inner estimate).

    PYTHONPATH=. python benchmarks/inner_optimizer_probe.py [--config omniglot-5w1s] [--rounds 8] [--steps 30]

One thread. Each round runs `--steps` meta-steps with each kernel from the same theta (the
trainer's own steps after a warm-up), the same tasks; prints each round's tasks/s, the medians
and the median of the rounds' ratios.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import reptile_dist.reptile as reptile
from local_profile import one_thread_trainer  # benchmarks/, this script's folder
from reptile_dist.reptile import OuterOptimizer, meta_step

MULTI_TENSOR = reptile.inner_optimizer
# torch's CPU default, the for-loop kernels, against the multi-tensor ones inner_optimizer asks for
KERNELS = {"foreach": MULTI_TENSOR, "one at a time": functools.partial(MULTI_TENSOR, foreach=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="meta-steps per kernel per round")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg, family, learner, outer = one_thread_trainer(args.config, args.set)
    tasks = range(cfg.meta_batch_size)
    for step in range(3):  # torch's lazy initialisation outside the rounds, each kernel's too
        reptile.inner_optimizer = KERNELS["one at a time" if step == 0 else "foreach"]
        try:
            meta_step(learner, family, outer, cfg, step, tasks)
        finally:
            reptile.inner_optimizer = MULTI_TENSOR
    start_step = 3
    speeds: dict[str, list[float]] = {name: [] for name in KERNELS}
    ratios, same = [], True
    print(f"{args.config} ({cfg.inner_optimizer}, {cfg.inner_state} inner state), one thread, "
          f"{args.steps} meta-steps x {cfg.meta_batch_size} tasks per kernel per round")
    for r in range(args.rounds):
        ends = {}
        order = list(KERNELS) if r % 2 == 0 else list(reversed(KERNELS))  # each kernel first in half the rounds
        for name in order:
            run = OuterOptimizer.for_config(cfg, outer.theta.clone())
            run.load_state_dict(outer.state_dict())
            reptile.inner_optimizer = KERNELS[name]
            try:
                t0 = time.perf_counter()
                for step in range(start_step, start_step + args.steps):
                    meta_step(learner, family, run, cfg, step, tasks)
                seconds = time.perf_counter() - t0
            finally:
                reptile.inner_optimizer = MULTI_TENSOR
            speeds[name].append(args.steps * cfg.meta_batch_size / seconds)
            ends[name] = run
        a, b = ends["foreach"], ends["one at a time"]
        same = same and torch.equal(a.theta, b.theta) and (
            a.inner_moment is b.inner_moment is None or torch.equal(a.inner_moment.sq, b.inner_moment.sq))
        ratios.append(speeds["foreach"][-1] / speeds["one at a time"][-1])
        print(f"round {r + 1}: foreach {speeds['foreach'][-1]:.1f} tasks/s, one at a time "
              f"{speeds['one at a time'][-1]:.1f}, ratio {ratios[-1]:.3f}")
        outer, start_step = ends["foreach"], start_step + args.steps
    print(f"median: foreach {statistics.median(speeds['foreach']):.1f} tasks/s, one at a time "
          f"{statistics.median(speeds['one at a time']):.1f}; ratio {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); same theta after every round: {same}")


if __name__ == "__main__":
    main()
