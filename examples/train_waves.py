"""Meta-train the damped-wave family of waves.py through the Python API, on the Ray engine
with 2 workers (a local Ray cluster started in-process; set `address` in the config to join
one), then adapt the trained network to a new wave from 10 points.

    python examples/train_waves.py --out runs/waves-api [--meta-iters 2000] [--mode sync|async]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import reptile_dist as rd
from waves import make_family, make_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--meta-iters", type=int, default=2000)
    parser.add_argument("--mode", default="sync", choices=("sync", "async", "allreduce"))
    parser.add_argument("--eval-tasks", type=int, default=500)
    args = parser.parse_args()

    cfg = rd.load_config("sine", {  # the sine preset's inner and outer loop, a family and a network of our own
        "backend": "ray", "mode": args.mode, "workers": 2, "cpus_per_worker": 0.5,
        "meta_iters": args.meta_iters, "train_shots": 10, "shots": 10, "queries": 20, "inner_lr": 0.01,
        "eval_tasks": args.eval_tasks, "eval_every": max(1, args.meta_iters // 4), "eval_tasks_periodic": 20,
        "log_every": max(1, args.meta_iters // 20), "checkpoint_every": max(1, args.meta_iters // 4),
    })
    # Closures work as well as module functions: Ray serializes them to its workers.
    summary = rd.train(cfg, args.out, family=lambda c: make_family(c, max_damping=0.5),
                       model=lambda c: make_model(c, hidden=40), progress=False)
    print(f"test query MSE {summary['test_loss']:.4f} over {summary['eval_tasks']} tasks")

    # The run was trained on closures, so loading it takes the network's factory again (no data needed).
    net = rd.load_model(f"{args.out}/final.pt", model=lambda c: make_model(c, hidden=40), device="cpu")
    task = make_family(cfg).eval_task(np.random.default_rng(7), "test")
    adapted = rd.adapt(net, task.support_x, task.support_y)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(net(task.query_x), task.query_y).item()
        after = torch.nn.functional.mse_loss(adapted(task.query_x), task.query_y).item()
    print(f"a new wave from 10 points: query MSE {before:.4f} before adapting, {after:.4f} after")


if __name__ == "__main__":
    main()
