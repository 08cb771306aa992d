"""One parameter server's capacity (deltas/s) at a few sizes, for comparing two checkouts, or Ray's
inline-object limit on and off, side by side in one session: run it in each checkout, one after
the other, with nothing else on the machine, and compare the ratios.

    PYTHONPATH=. python benchmarks/ps_capacity_probe.py new
    (cd ../old-checkout && PYTHONPATH=. python /path/to/benchmarks/ps_capacity_probe.py old)
    PYTHONPATH=. python benchmarks/ps_capacity_probe.py new --inline default --params 100000 --pushers 1 2
    PYTHONPATH=. python benchmarks/ps_capacity_probe.py --bare --params 100000 --pushers 1 2 4
    PYTHONPATH=. python benchmarks/ps_capacity_probe.py --bare --threads 16 --params 100000 --pushers 2

(`--bare` and `--threads` need a checkout that has them: from f98ba2e on.)

It starts its own local Ray cluster with `--inline` as Ray's `max_direct_call_object_size` (objects
up to that size travel inside a call's message; "default" leaves Ray's 100 KiB; the engine's own
local clusters use `engine/cluster.py` INLINE_OBJECT_BYTES, 4 MiB), so that a checkout from before
that setting can be measured with it and this one without.
"""
import argparse

import ray

from reptile_dist.bench.ps_capacity import measure_capacity

ENGINE_INLINE_BYTES = 4 * 1024 * 1024

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", nargs="?", default="this checkout")
    parser.add_argument("--inline", default=str(ENGINE_INLINE_BYTES),
                        help="max_direct_call_object_size in bytes, or 'default' for Ray's own (100 KiB)")
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 10_000_000])
    parser.add_argument("--pushers", type=int, nargs="+", default=[2])
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="the servers' max_concurrency (Ray's thread pool) instead of the engine's (1 for an async PS)")
    parser.add_argument("--bare", action="store_true",
                        help="after each figure, the same pushers against a bare actor (bench/ps_capacity.py BareServer)")
    args = parser.parse_args()
    if args.inline != "default" and not args.inline.isdigit():
        parser.error(f"--inline takes a byte count or 'default', not {args.inline!r}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads takes a count >= 1")
    # a checkout from before --threads existed (an `old` side) takes no such argument
    threads = {"threads": args.threads} if args.threads else {}
    system = None if args.inline == "default" else {"max_direct_call_object_size": int(args.inline)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=system)
    try:
        for params in args.params:
            for pushers in args.pushers:
                row = measure_capacity(params, args.dtype, pushers, args.seconds, 1.0, **threads)
                print(f"{args.label} inline={args.inline} threads={args.threads or 'engine'} {params} params {args.dtype} {pushers} pushers: "
                      f"{row['pushes_per_s']:.1f} pushes/s, handler {row['handler_pushes_per_s']:.1f}/s, "
                      f"median {row['push_latency_median_ms']:.1f} ms, load {row['load_1m']:.1f}", flush=True)
                if args.bare:
                    floor = measure_capacity(params, args.dtype, pushers, args.seconds, 1.0, bare=True, **threads)
                    print(f"{'':>{len(args.label)}} bare actor, same pushers: {floor['pushes_per_s']:.1f} pushes/s, "
                          f"median {floor['push_latency_median_ms']:.1f} ms", flush=True)
    finally:
        ray.shutdown()
