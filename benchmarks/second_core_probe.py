"""How much a busy second core slows the local trainer on the first: the local trainer pinned to
one core, one thread, in turns with a process spinning on the other core and without it.

    PYTHONPATH=. python benchmarks/second_core_probe.py [--config omniglot-5w1s] [--rounds 10] [--seconds 4]
                                                       [--neighbour spin|trainer]

An engine with one adapt worker on a 2-core machine has the parameter server, the driver and
Ray's daemons on the other core while the worker adapts; the local trainer has that core nearly
to itself. On a virtual machine whose two cores are threads of one physical core (or share its
caches), work on one slows the other. This measures that effect alone, with nothing of the
engine: each round a window with the other core idle, then one with a Python process spinning
on it (stopped and continued with SIGSTOP / SIGCONT), their ratio per round. Needs 2 cores and
Linux (sched_setaffinity).

`--neighbour trainer`: the other core runs a second local trainer (its own process, one thread,
the same config) instead of the spinner. Then the two trainers' tasks/s together against the lone
one's is what two perfectly independent workers could make on this machine: the ceiling for an
engine with two adapt workers, before anything of Ray or the parameter server. The neighbour's
tasks are counted per meta-step, so one round's figure for it is good to about one meta-step
over the window (a pair above 2.0 is that); the median over rounds is the figure to read.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

from local_profile import one_thread_trainer  # benchmarks/, this script's folder
from reptile_dist.reptile import meta_step

SPIN = "import os\nos.sched_setaffinity(0, {%d})\nwhile True:\n    pass\n"


def _trainer(config: str, overrides: list[str], core: int):
    """The local trainer pinned to `core` at one thread: its config, learner, family and outer step."""
    os.sched_setaffinity(0, {core})
    return one_thread_trainer(config, overrides)


def _neighbour(config: str, overrides: list[str], core: int, tasks) -> None:
    """`--neighbour trainer`: meta-steps without end, counting its tasks in the shared `tasks`."""
    cfg, family, learner, outer = _trainer(config, overrides, core)
    step = 0
    while True:
        done = meta_step(learner, family, outer, cfg, step, range(cfg.meta_batch_size)).tasks
        with tasks.get_lock():
            tasks.value += done
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--neighbour", choices=("spin", "trainer"), default="spin",
                        help="what runs on the other core in the busy windows (default: a spinning process)")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("second_core_probe: needs two cores")
    trainer_core, other_core = cores[-1], cores[0]
    cfg, family, learner, outer = _trainer(args.config, args.overrides, trainer_core)
    step = 0

    def window(seconds: float) -> float:
        nonlocal step
        start, tasks = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tasks += meta_step(learner, family, outer, cfg, step, range(cfg.meta_batch_size)).tasks
            step += 1
        return tasks / (time.perf_counter() - start)

    neighbour_tasks = None
    if args.neighbour == "trainer":
        spawn = multiprocessing.get_context("spawn")
        neighbour_tasks = spawn.Value("q", 0)
        neighbour = spawn.Process(target=_neighbour, args=(args.config, args.overrides, other_core, neighbour_tasks),
                                  daemon=True)
        neighbour.start()
        pid = neighbour.pid
        while neighbour_tasks.value < 3 * cfg.meta_batch_size:  # its imports and first steps, while this one waits
            if not neighbour.is_alive():
                sys.exit("second_core_probe: the neighbouring trainer ended before its first steps")
            time.sleep(0.2)
    else:
        neighbour = subprocess.Popen([sys.executable, "-c", SPIN % other_core])
        pid = neighbour.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        window(3.0)  # torch's lazy first steps
        ratios, pairs = [], []
        for r in range(args.rounds):
            quiet = window(args.seconds)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.3)
            before = neighbour_tasks.value if neighbour_tasks is not None else 0
            t0 = time.perf_counter()
            busy = window(args.seconds)
            other = (neighbour_tasks.value - before) / (time.perf_counter() - t0) if neighbour_tasks is not None else 0.0
            os.kill(pid, signal.SIGSTOP)
            ratios.append(busy / quiet)
            line = (f"round {r + 1}: other core idle {quiet:.1f} tasks/s, {args.neighbour} beside {busy:.1f} tasks/s, "
                    f"ratio {busy / quiet:.3f}")
            if neighbour_tasks is not None:
                pairs.append((busy + other) / quiet)
                line += f"; the neighbour {other:.1f} tasks/s, the pair {pairs[-1]:.3f}x the lone trainer"
            print(line, flush=True)
    finally:
        neighbour.kill()
    print(f"{args.config}, core {trainer_core} (other core {other_core}): with the other core busy ({args.neighbour}) "
          f"the local trainer runs {statistics.median(ratios):.3f}x its speed beside an idle one (median of "
          f"{len(ratios)} rounds; {min(ratios):.3f}-{max(ratios):.3f})")
    if pairs:
        print(f"two local trainers, one per core, make {statistics.median(pairs):.3f}x the tasks/s of one alone "
              f"(median of {len(pairs)} rounds; {min(pairs):.3f}-{max(pairs):.3f}): the ceiling for two adapt workers here")


if __name__ == "__main__":
    main()
