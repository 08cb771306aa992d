"""`reptile-dist bench`: what runs, in which order, and what it writes.

    local trainer, per-task loop and batched   -> tasks/s baseline
    each mode x each W (W=1 always), then each mode at the largest W with one straggler; before
      each and after each, the local trainer again for half a window (the mean of the two: its
      paired baseline, which brackets the row: speeds drift)
      sync, async: the PS and adapt-worker actors (runner.py); allreduce: Ray Train (allreduce.py)
                                               -> bench.parquet, bench.md, scaling.png
    optionally: PS capacity against model size and wire precision, each preset's worker tasks/s
                                               -> capacity.parquet, capacity.png, the model in bench.md
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reptile_dist.bench import model
from reptile_dist.bench.allreduce import measure_allreduce
from reptile_dist.bench.hooks import Interleaved, Straggler
from reptile_dist.bench.plots import plot_capacity, plot_scaling
from reptile_dist.bench.ps_capacity import capacity_sweep
from reptile_dist.bench.baselines import local_baselines
from reptile_dist.bench.report import (CAPACITY_COLUMNS, INTERLEAVED_COLUMNS, LOCAL_COLUMNS, MODEL_COLUMNS, engine_section,
                                       interleaved_section, markdown_table, write_markdown, write_parquet)
from reptile_dist.bench.runner import measure_engine, measure_interleaved, measure_local
from reptile_dist.config import Config, ConfigError, load_config
from reptile_dist.engine.cluster import cluster_address, ray_cluster
from reptile_dist.plugins import Plugins, build_family
from reptile_dist.training import make_learner

MODES = ("sync", "async", "async-prefetch", "allreduce")  # async-prefetch: async with `prefetch: true`
OMNIGLOT_PRESETS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s")
WIRE_DTYPES = ("float64", "float32", "bfloat16", "float16")
STRAGGLER_WORKER = 0  # the worker --straggler slows down


@dataclass(frozen=True)
class BenchPlan:
    config: str = "omniglot-5w1s"
    overrides: dict[str, Any] = field(default_factory=dict)
    workers: tuple[int, ...] = (1, 2)
    modes: tuple[str, ...] = ("sync", "async")
    seconds: float = 20.0
    warmup: float = 5.0
    straggler_factor: float = 1.0  # > 1: also each mode at the largest W with one worker this much slower
    address: str | None = None
    capacity_params: tuple[int, ...] = ()  # model sizes for the PS capacity sweep; empty: no sweep
    capacity_dtypes: tuple[str, ...] = WIRE_DTYPES
    capacity_pushers: tuple[int, ...] = (2,)
    capacity_seconds: float = 5.0
    model_presets: tuple[str, ...] = OMNIGLOT_PRESETS
    baselines: bool = True  # the local trainer against the plain loop, and its threads beside a busy process
    interleave: float = 0.0  # > 0: also each parameter-server mode x W in turns with the local trainer, phases this long
    rounds: int = 8  # pairs of interleaved phases per combination

    @property
    def cluster(self) -> str:
        """The cluster the bench runs on, as its rows and plot name it: the address it joins
        (`--address`, else RAY_ADDRESS), or "local"."""
        return cluster_address(self.address)[0] or "local"

    def __post_init__(self):
        if not self.workers or min(self.workers) < 1:
            raise ConfigError(f"--workers must be whole numbers >= 1, got {self.workers}")
        if set(self.modes) - set(MODES):
            raise ConfigError(f"--modes takes {', '.join(MODES)}, got {','.join(self.modes)}")
        if self.seconds <= 0 or self.warmup < 0 or self.capacity_seconds <= 0:
            raise ConfigError("--seconds and --capacity-seconds must be > 0, --warmup >= 0")
        if self.straggler_factor < 1:
            raise ConfigError(f"--straggler is a slow-down factor >= 1, got {self.straggler_factor}")
        if self.interleave and (self.interleave <= 2 * Interleaved.GUARD_S or self.rounds < 1):
            raise ConfigError(f"--interleave is a phase length > {2 * Interleaved.GUARD_S:g} s and --rounds >= 1, "
                              f"got {self.interleave:g} and {self.rounds}")
        if self.straggler_factor > 1 and max(self.workers) < 2:
            raise ConfigError("--straggler needs a worker count of at least 2 in --workers")
        if set(self.capacity_dtypes) - set(WIRE_DTYPES) or not self.capacity_dtypes:
            raise ConfigError(f"--capacity-dtypes takes {', '.join(WIRE_DTYPES)}")
        if self.capacity_params and (min(self.capacity_params) < 1 or min(self.capacity_pushers, default=0) < 1):
            raise ConfigError("--capacity-params and --capacity-pushers must be >= 1")


def run_bench(plan: BenchPlan, out: str | Path, command: str = "", say: Callable[[str], None] = print) -> dict[str, Path]:
    cfg = _with_absolute_data(load_config(plan.config, plan.overrides))
    for mode in plan.modes:  # a mode the configuration cannot run fails now, not after the rows before it
        engine_config(cfg, mode, 1)
    workers = sorted(set(plan.workers) | {1})  # W=1 is the baseline of every efficiency
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family = build_family(cfg)
    theta = make_learner(cfg, family).initial_theta().numpy()
    engine_rows: list[dict[str, Any]] = []
    local_rows: list[dict[str, Any]] = []
    capacity_rows: list[dict[str, Any]] = []
    interleaved_rows: list[dict[str, Any]] = []
    rates: dict[str, float] = {}
    if plan.modes and plan.baselines:
        # before Ray starts: its daemons would share the cores with the rows that use them all
        local_rows = local_baselines(cfg, family, plan.seconds, plan.warmup)
        for r in local_rows:
            say(f"{r['what']}, {r['threads']} thread(s){', busy process beside' if r['busy_process_beside'] else ''}: "
                f"{r['tasks_per_s']:.1f} tasks/s")
    cluster_mode = "allreduce" if "allreduce" in plan.modes else cfg.mode
    with ray_cluster(cfg.replace(backend="ray", workers=max(workers), mode=cluster_mode), plan.address):
        if plan.modes:
            local = measure_local(cfg, family, plan.seconds, plan.warmup)
            batched = measure_local(cfg.replace(batched_adaptation=True), family, plan.seconds, plan.warmup)
            rates[plan.config] = local
            say(f"local trainer: {local:.1f} tasks/s (per-task loop), {batched:.1f} tasks/s (batched, vmap)")
            combos = [(mode, w, 1.0) for mode in plan.modes for w in workers]
            if plan.straggler_factor > 1:
                combos += [(mode, max(workers), plan.straggler_factor) for mode in plan.modes]
            for mode, w, factor in combos:
                c = engine_config(cfg, mode, w)
                straggler = Straggler(STRAGGLER_WORKER, factor) if factor > 1 else None
                before = measure_local(cfg, family, plan.seconds / 2, min(plan.warmup, 1.0))
                measured = (measure_allreduce(c, plan.seconds, plan.warmup, straggler) if mode == "allreduce"
                            else measure_engine(c, theta, plan.seconds, plan.warmup, straggler))
                after = measure_local(cfg, family, plan.seconds / 2, min(plan.warmup, 1.0))
                row = {**describe(plan, c, theta.size, local, batched, factor), "mode": mode,
                       "paired_local_tasks_per_s": (before + after) / 2, "paired_local_before": before,
                       "paired_local_after": after, **measured}
                engine_rows.append(row)
                say(progress_line(row))
            add_efficiencies(engine_rows)
            if plan.interleave:
                for mode, w in [(m, w) for m in plan.modes if m != "allreduce" for w in workers]:
                    row = {"config": plan.config, "mode": mode, "workers": w,
                           **measure_interleaved(engine_config(cfg, mode, w), theta, plan.interleave, plan.rounds,
                                                 plan.warmup)}
                    interleaved_rows.append(row)
                    say(f"interleaved {mode:9} W={w}: engine {row['engine_tasks_per_s']:.1f} tasks/s, local trainer "
                        f"{row['local_tasks_per_s']:.1f}, eff. vs local {row['efficiency_vs_local']:.2f} (median of "
                        f"{row['rounds']} rounds; {row['efficiency_min']:.2f}-{row['efficiency_max']:.2f})")
        if plan.capacity_params:
            capacity_rows = capacity_sweep(list(plan.capacity_params), list(plan.capacity_dtypes),
                                           list(plan.capacity_pushers), plan.capacity_seconds, 1.0, say)
            for preset in plan.model_presets:
                if preset not in rates:
                    pcfg = _with_absolute_data(load_config(preset, {k: v for k, v in plan.overrides.items() if k == "data"}))
                    rates[preset] = measure_local(pcfg, build_family(pcfg), plan.capacity_seconds, 2.0)
                    say(f"{preset}: one worker adapts {rates[preset]:.1f} tasks/s")
    return write_outputs(plan, out, command, engine_rows, capacity_rows, scaling_model(plan, capacity_rows, rates),
                         local_rows, interleaved_rows)


def engine_config(cfg: Config, mode: str, workers: int) -> Config:
    """The run configuration a bench mode stands for."""
    if mode == "async-prefetch":
        return cfg.replace(mode="async", prefetch=True, workers=workers)
    return cfg.replace(mode=mode, workers=workers)


def describe(plan: BenchPlan, cfg: Config, params: int, local: float, batched: float,
             straggler_factor: float = 1.0) -> dict[str, Any]:
    return {
        "config": plan.config, "family": cfg.family, "params": params, "meta_batch_size": cfg.meta_batch_size,
        "delta_dtype": cfg.wire_dtype, "mode": cfg.mode, "workers": cfg.workers,
        "straggler_factor": straggler_factor, "straggler_worker": STRAGGLER_WORKER,
        "straggler": f"worker {STRAGGLER_WORKER} x{straggler_factor:g}" if straggler_factor > 1 else "none",
        "tasks_per_push": model.tasks_per_push(cfg.mode, cfg.workers, cfg.meta_batch_size, cfg.tasks_per_push),
        "batched_adaptation": cfg.batched_adaptation,
        "address": plan.cluster, "cpu_count": os.cpu_count() or 0, "warmup_s": plan.warmup,
        "local_tasks_per_s": local, "local_batched_tasks_per_s": batched,
    }


def progress_line(row: dict[str, Any]) -> str:
    if row["mode"] == "allreduce":
        detail = f"all-reduce {row['push_latency_median_ms']:.1f} ms, {row['allreduce_fraction']:.0%} of the time"
    else:
        detail = (f"PS busy {row['ps_busy_fraction']:.2f}, push {row['push_latency_median_ms']:.1f} ms, "
                  f"staleness {row['staleness_mean']:.2f}, dropped {row['dropped_deltas']}")
    return (f"{row['mode']:9} W={row['workers']} {row['straggler']:>14}: {row['tasks_per_s']:7.1f} tasks/s, {detail}, "
            f"load {row['load_1m']:.1f}")


def add_efficiencies(rows: list[dict[str, Any]]) -> None:
    """tasks/s over W times the baseline: the same mode at W=1, and the local trainer measured just
    before and just after the row (its paired windows' mean)."""
    single = {r["mode"]: r["tasks_per_s"] for r in rows if r["workers"] == 1 and r["straggler_factor"] == 1}
    for r in rows:
        r["efficiency_vs_w1"] = r["tasks_per_s"] / (r["workers"] * single[r["mode"]]) if single.get(r["mode"]) else math.nan
        r["efficiency_vs_local"] = r["tasks_per_s"] / (r["workers"] * r["paired_local_tasks_per_s"])


def scaling_model(plan: BenchPlan, capacity_rows: list[dict[str, Any]], rates: dict[str, float]) -> list[dict[str, Any]]:
    """Each preset's worker limit for one PS, from the capacity measured at its model size (twice
    it with carried inner state). Every preset takes the data the user named (`--set data=...`)."""
    overrides = {k: v for k, v in plan.overrides.items() if k == "data"}
    rows = []
    for preset in plan.model_presets if capacity_rows else ():
        cfg = load_config(preset, overrides)
        params = sum(p.numel() for p in Plugins.of(cfg).build_model(cfg, None).parameters())
        # With carried inner state a push holds the estimates' sum beside the delta, and a pull the
        # estimate beside theta: the PS moves twice the vector, as a model twice the size would.
        wire_params = params * (2 if cfg.carries_inner_moment else 1)
        rate, batch = rates[preset], cfg.meta_batch_size
        for dtype in plan.capacity_dtypes:
            best: dict[int, float] = {}
            for r in capacity_rows:
                if r["delta_dtype"] == dtype:
                    best[r["params"]] = max(best.get(r["params"], 0.0), r["pushes_per_s"])
            capacity = model.capacity_at(wire_params, list(best), list(best.values()))
            rows.append({
                "preset": preset, "params": params, "inner_state": cfg.inner_state, "worker_tasks_per_s": rate, "meta_batch_size": batch,
                "delta_dtype": dtype, "capacity_pushes_per_s": capacity,
                "sync_max_workers": model.max_workers(capacity, rate, "sync", batch),
                "async_max_workers": model.max_workers(capacity, rate, "async", batch),
                "async_per_task_max_workers": model.max_workers(capacity, rate, "async", batch, configured=1),
            })
    return rows


def write_outputs(plan: BenchPlan, out: Path, command: str, engine_rows, capacity_rows, model_rows,
                  local_rows=(), interleaved_rows=()) -> dict[str, Path]:
    written: dict[str, Path] = {}
    sections = []
    if command:
        sections.append(("Command", f"    {command}"))
    if local_rows:
        written["local.parquet"] = write_parquet(list(local_rows), out / "local.parquet")
        sections.append(("Local trainer against a plain loop, and its threads under load",
                         "Plain loop: a deepcopy of the model and a fresh Adam per task, as the reference code and "
                         "learn2learn's example adapt; the same tasks and mini-batches; measured before the bench starts Ray "
                         "(whose daemons would share the cores). At each thread count the three "
                         "rows took turns, in rounds (the order rotated each round); tasks/s is the mean of a row's "
                         "rounds, vs plain loop the median of its ratios to the plain loop's window of the same round, "
                         "least and greatest the spread of those ratios. Rows with a busy process beside them share the "
                         "machine with one process spinning on a core.\n\n" + markdown_table(list(local_rows), LOCAL_COLUMNS)))
    if engine_rows:
        written["bench.parquet"] = write_parquet(engine_rows, out / "bench.parquet")
        written["scaling.png"] = plot_scaling(engine_rows, out / "scaling.png",
                                              f"{plan.config}, cluster {plan.cluster}")
        sections.append((f"Scaling: {plan.config}", engine_section(engine_rows) + "\n\n![scaling](scaling.png)"))
    if interleaved_rows:
        written["interleaved.parquet"] = write_parquet(list(interleaved_rows), out / "interleaved.parquet")
        sections.append(("The engine and the local trainer in turns, in the workers' own processes",
                         interleaved_section(list(interleaved_rows))))
    if capacity_rows:
        written["capacity.parquet"] = write_parquet(capacity_rows, out / "capacity.parquet")
        marks = {r["preset"]: r["params"] for r in model_rows}
        written["capacity.png"] = plot_capacity(capacity_rows, out / "capacity.png", marks)
        sections.append(("Parameter-server capacity", markdown_table(capacity_rows, CAPACITY_COLUMNS)
                         + "\n\n![capacity](capacity.png)"))
    if model_rows:
        written["model.parquet"] = write_parquet(model_rows, out / "model.parquet")
        sections.append(("Scaling model: adapt workers one parameter server can feed",
                         "Worker tasks/s: one process, one thread, as an adapt worker runs here. max W: the largest "
                         "worker count whose pushes/s one PS absorbs (reptile_dist/bench/model.py). PS deltas/s: the "
                         "capacity at the size a push moves (twice the parameters with carried inner state).\n\n"
                         + markdown_table(model_rows, MODEL_COLUMNS)))
    write_markdown(sections, out / "bench.md")
    written["bench.md"] = out / "bench.md"
    return written


def csv(text: str, convert: Callable[[str], Any], flag: str) -> tuple:
    """A comma-separated command-line list."""
    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise ConfigError(f"{flag} expects a comma-separated list, got '{text}'") from None


def count(text: str) -> int:
    """100000, 100k, 1M, 1e6."""
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def _with_absolute_data(cfg: Config) -> Config:
    """Actors on other nodes start in other directories: pass the table's absolute path (it has
    to be at that path on every node, as cluster/README.md says)."""
    if cfg.family == "omniglot" and not os.path.isabs(cfg.data) and os.path.exists(cfg.data):
        return cfg.replace(data=os.path.abspath(cfg.data))
    return cfg
