"""What one gloo all_reduce costs inside a Ray Train worker group, per message size.

    python benchmarks/allreduce_cost.py --workers 2 --sizes 100000 1000000 10000000 --repeats 30

Prints one JSON line per (dtype, size): min, median and p90 milliseconds over `repeats`
all_reduces (after 3 warm-ups) as rank 0 measures them, and the cost per byte of the vector (ns/B)
from the min (the least disturbed by other load on the machine) and from the median.
`--mode allreduce` sends one float64 vector of the model's size (plus 4 counters) per meta-step.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def measure(config: dict) -> list[dict] | None:
    torch.set_num_threads(1)
    rows = []
    for dtype in config["dtypes"]:
        for size in config["sizes"]:
            buffer = torch.ones(size, dtype=getattr(torch, dtype))
            times = []
            for i in range(3 + config["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(buffer)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            ms = np.array(times) * 1e3
            nbytes = size * buffer.element_size()
            rows.append({"workers": dist.get_world_size(), "dtype": dtype, "elements": size, "mbytes": nbytes / 1e6,
                         "min_ms": round(float(ms.min()), 3), "median_ms": round(float(np.median(ms)), 3),
                         "p90_ms": round(float(np.percentile(ms, 90)), 3),
                         "ns_per_byte_min": round(float(ms.min()) * 1e6 / nbytes, 3),
                         "ns_per_byte_median": round(float(np.median(ms)) * 1e6 / nbytes, 3)})
    return rows if ray.train.get_context().get_world_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(measure, train_loop_config=vars(args), torch_config=TorchConfig(backend="gloo"),
                               scaling_config=ScalingConfig(num_workers=args.workers),
                               run_config=RunConfig(storage_path=storage))
        result = trainer.fit()
    for row in result.return_value:
        print(json.dumps(row))
    print(json.dumps({"fit_s": round(time.perf_counter() - started, 1)}))
    ray.shutdown()


if __name__ == "__main__":
    main()
