"""One parameter server's capacity at 100k and 10M parameters (float64 deltas, 2 pushers, 6 s
windows), for comparing two checkouts side by side in one session: run it in each, one after the
other, with nothing else on the machine.

    PYTHONPATH=. python benchmarks/ps_capacity_probe.py new
    (cd ../old-checkout && PYTHONPATH=. python /path/to/benchmarks/ps_capacity_probe.py old)
"""
import sys

import ray

from reptile_dist.bench.ps_capacity import measure_capacity

if __name__ == "__main__":
    label = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for params in (100_000, 10_000_000):
            row = measure_capacity(params, "float64", 2, 6.0, 1.0)
            print(f"{label} {params}: {row['pushes_per_s']:.1f} pushes/s, handler {row['handler_pushes_per_s']:.1f}/s, "
                  f"load {row['load_1m']:.1f}", flush=True)
    finally:
        ray.shutdown()
