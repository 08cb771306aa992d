"""The local trainer against a plain Reptile loop (a deepcopy of the model and a fresh Adam per
task, as the reference code and learn2learn's example adapt), in interleaved rounds: the bench's
own rows (`reptile_dist/bench/baselines.py`, which `reptile-dist bench` runs before its engine
rows), without the engine rows around them.

    PYTHONPATH=. python benchmarks/local_vs_plain.py [--config omniglot-5w1s] [--seconds 30] [--rounds 3] [--set K=V ...]

Prints one line per row: tasks/s (mean of the rounds), the median ratio to the plain loop's window
of the same round, and the least and greatest of those ratios. Run it with nothing else on the
machine.
"""
from __future__ import annotations

import argparse

from reptile_dist.bench.baselines import LOCAL_ROUNDS, local_baselines
from reptile_dist.config import load_config, parse_overrides
from reptile_dist.plugins import build_family

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--seconds", type=float, default=30.0, help="per row, split over the rounds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=LOCAL_ROUNDS)
    parser.add_argument("--set", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    cfg = load_config(args.config, parse_overrides(args.set))
    for r in local_baselines(cfg, build_family(cfg), args.seconds, args.warmup, args.rounds):
        spread = ("" if r["vs_plain_loop"] is None else
                  f"  vs plain loop {r['vs_plain_loop']:.3f} (rounds {r['vs_plain_loop_min']:.3f}-{r['vs_plain_loop_max']:.3f})")
        print(f"{r['what']}, {r['threads']} thread(s){', busy process beside' if r['busy_process_beside'] else ''}: "
              f"{r['tasks_per_s']:.1f} tasks/s{spread}", flush=True)
