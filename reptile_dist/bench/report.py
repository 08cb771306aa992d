"""The benchmark's tables: Parquet for analysis, Markdown for people."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ENGINE_COLUMNS = [
    ("mode", "mode"), ("workers", "W"), ("delta_dtype", "delta on the wire"), ("tasks_per_push", "tasks per push"),
    ("straggler", "straggler"), ("tasks_per_s", "tasks/s"),
    ("meta_steps_per_s", "meta-steps/s"), ("efficiency_vs_w1", "eff. vs W=1"),
    ("paired_local_tasks_per_s", "local tasks/s (paired)"),
    ("paired_local_before", "before"), ("paired_local_after", "after"), ("efficiency_vs_local", "eff. vs local"),
    ("ps_busy_fraction", "PS busy"), ("allreduce_fraction", "all-reduce share"),
    ("push_latency_median_ms", "push / all-reduce ms (median)"), ("push_latency_p95_ms", "push / all-reduce ms (p95)"),
    ("staleness_mean", "staleness mean"), ("staleness_max", "staleness max"), ("dropped_deltas", "dropped"),
    ("mb_per_s", "MB/s"), ("nodes", "nodes"), ("load_1m", "load"),
]
CAPACITY_COLUMNS = [
    ("params", "params"), ("delta_dtype", "delta on the wire"), ("delta_mb", "delta MB"), ("pushers", "pushers"),
    ("pushes_per_s", "deltas absorbed/s"), ("bare_actor_pushes_per_s", "bare actor/s"),
    ("of_bare_actor", "of bare actor"), ("handler_pushes_per_s", "handler alone/s"), ("ps_busy_fraction", "PS busy"),
    ("push_latency_median_ms", "push ms (median)"), ("mb_per_s", "MB/s"), ("load_1m", "load"),
]
LOCAL_COLUMNS = [
    ("what", "trainer"), ("threads", "threads"), ("busy_process_beside", "busy process beside"),
    ("tasks_per_s", "tasks/s"), ("vs_plain_loop", "vs plain loop (median of rounds)"),
    ("vs_plain_loop_min", "least"), ("vs_plain_loop_max", "greatest"), ("load_1m", "load"),
]
INTERLEAVED_COLUMNS = [
    ("mode", "mode"), ("workers", "W"), ("rounds", "rounds"), ("rounds_asked", "of"), ("engine_tasks_per_s", "engine tasks/s"),
    ("local_tasks_per_s", "local trainer tasks/s"), ("efficiency_vs_local", "eff. vs local (median of rounds)"),
    ("efficiency_min", "least"), ("efficiency_max", "greatest"), ("efficiency_pooled", "pooled"),
    ("adapting_share", "workers' time adapting"), ("adapt_speed_vs_local", "adaptation speed vs local"), ("load_1m", "load"),
]
MODEL_COLUMNS = [
    ("preset", "preset"), ("params", "params"), ("inner_state", "inner state"), ("worker_tasks_per_s", "worker tasks/s"),
    ("delta_dtype", "delta"),
    ("capacity_pushes_per_s", "PS deltas/s"), ("sync_max_workers", "sync: max W"),
    ("async_max_workers", "async: max W"), ("async_per_task_max_workers", "async, tasks_per_push=1: max W"),
]


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def engine_section(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        f"Config `{first['config']}` ({first['params']:,} parameters, meta-batch {first['meta_batch_size']}), "
        f"{first['window_s']:.0f} s measured per row after a warm-up, "
        f"cluster `{first['address']}`, {first['cpu_count']} cores.",
        f"Local single-process trainer (same threads as one worker): {first['local_tasks_per_s']:.1f} tasks/s "
        f"(per-task loop), {first['local_batched_tasks_per_s']:.1f} tasks/s (batched, vmap). Before and after every row the "
        "local trainer ran again for half a window: eff. vs local is the row's tasks/s over W times the mean of those two "
        "paired figures (before, after beside it), since this machine's speed drifts between minutes. async-prefetch: async with `prefetch: true`.",
        "",
        markdown_table(rows, ENGINE_COLUMNS),
    ]
    if any(r["mode"] == "allreduce" for r in rows):
        lines += ["", "allreduce rows: no parameter server (PS busy 0, staleness 0); the latency columns hold rank 0's "
                      "all-reduce (including waiting for the slowest worker), all-reduce share its part of the "
                      "window; MB/s is modelled for a ring all-reduce, 2(W-1) vectors per meta-step (the delta, and the "
                      "carried estimates' sum, in the wire precision, with float64 counts). "
                      "Ray Train's start-up is not in the window."]
    return "\n".join(lines)


def interleaved_section(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        f"Phases of {rows[0]['phase_s']:g} s on the wall clock, in turns: the engine as it runs, then, with every worker "
        "holding still after its adaptation, the local trainer's meta-step in worker 0's own process on its own "
        f"threads ({rows[0]['rounds_asked']} rounds asked after the warm-up; the first {rows[0]['guard_s']:g} s of every "
        "phase not measured; a round in which a worker was still adapting when the local window began, or without "
        "two adaptations of every worker, is left out: rounds measured of those asked). eff. vs local: each round's engine tasks/s over W x the local trainer's in the phase after it, "
        "the median of the rounds (least and greatest beside it); tasks/s: means of the rounds; pooled: the means' ratio. Where the rest goes: the "
        "share of the workers' loop time spent adapting (the rest is the wire, waiting for the PS, the look-ahead's "
        "own update), and the engine's adaptation speed (tasks over adapting seconds) against the local trainer's "
        "whole meta-step (medians of the rounds). Engine tasks are those the workers adapted, applied or not (the "
        "bracketed rows count the applied ones and the dropped). Both sides of a round "
        "run seconds apart in one process, so this machine's drift between minutes, and the driver process, are "
        "out of the comparison.",
        "",
        markdown_table(rows, INTERLEAVED_COLUMNS),
    ])


def write_markdown(sections: list[tuple[str, str]], path: Path) -> Path:
    path.write_text("\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n")
    return path
