"""How much a busy second core slows the local trainer on the first: the local trainer pinned to
one core, one thread, in turns with a process spinning on the other core and without it.

    PYTHONPATH=. python benchmarks/second_core_probe.py [--config omniglot-5w1s] [--rounds 10] [--seconds 4]

An engine with one adapt worker on a 2-core machine has the parameter server, the driver and
Ray's daemons on the other core while the worker adapts; the local trainer has that core nearly
to itself. On a virtual machine whose two cores are threads of one physical core (or share its
caches), work on one slows the other. This measures that effect alone, with nothing of the
engine: each round a window with the other core idle, then one with a Python process spinning
on it (stopped and continued with SIGSTOP / SIGCONT), their ratio per round. Needs 2 cores and
Linux (sched_setaffinity).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from reptile_dist.config import load_config, parse_overrides
from reptile_dist.plugins import build_family
from reptile_dist.reptile import OuterOptimizer, meta_step
from reptile_dist.training import make_learner

SPIN = "import os\nos.sched_setaffinity(0, {%d})\nwhile True:\n    pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per window")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("second_core_probe: needs two cores")
    trainer_core, other_core = cores[-1], cores[0]
    os.sched_setaffinity(0, {trainer_core})
    torch.set_num_threads(1)
    cfg = load_config(args.config, parse_overrides(args.overrides))
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    outer = OuterOptimizer.for_config(cfg, learner.initial_theta())
    step = 0

    def window(seconds: float) -> float:
        nonlocal step
        start, tasks = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tasks += meta_step(learner, family, outer, cfg, step, range(cfg.meta_batch_size)).tasks
            step += 1
        return tasks / (time.perf_counter() - start)

    spinner = subprocess.Popen([sys.executable, "-c", SPIN % other_core])
    try:
        os.kill(spinner.pid, signal.SIGSTOP)
        window(3.0)  # torch's lazy first steps
        ratios = []
        for r in range(args.rounds):
            quiet = window(args.seconds)
            os.kill(spinner.pid, signal.SIGCONT)
            time.sleep(0.3)
            busy = window(args.seconds)
            os.kill(spinner.pid, signal.SIGSTOP)
            ratios.append(busy / quiet)
            print(f"round {r + 1}: other core idle {quiet:.1f} tasks/s, spinning {busy:.1f} tasks/s, ratio {busy / quiet:.3f}",
                  flush=True)
    finally:
        spinner.kill()
    print(f"{args.config}, core {trainer_core} (other core {other_core}): with the other core busy the local trainer "
          f"runs {statistics.median(ratios):.3f}x its speed beside an idle one (median of {len(ratios)} rounds; "
          f"{min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
