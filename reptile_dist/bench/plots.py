"""The benchmark's figures (PNG, matplotlib's non-interactive backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

MODES = (("sync", "C0"), ("async", "C1"), ("async-prefetch", "C3"), ("allreduce", "C2"))
DTYPES = ("float64", "float32", "bfloat16", "float16")


def plot_scaling(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Tasks/s and scaling efficiency against workers, a line per mode (sync, async, allreduce); a
    third panel with the straggler runs when there are any."""
    plain = [r for r in rows if r["straggler_factor"] == 1]
    slowed = [r for r in rows if r["straggler_factor"] > 1]
    fig, axes = plt.subplots(1, 3 if slowed else 2, figsize=(15 if slowed else 9.5, 4.2))
    throughput, efficiency = axes[0], axes[1]
    workers = sorted({r["workers"] for r in plain})
    local = rows[0]["local_tasks_per_s"]
    throughput.plot(workers, [w * local for w in workers], ":", color="gray", label="W x local trainer")
    for mode, color in MODES:
        mine = sorted((r for r in plain if r["mode"] == mode), key=lambda r: r["workers"])
        if not mine:
            continue
        w = [r["workers"] for r in mine]
        throughput.plot(w, [r["tasks_per_s"] for r in mine], "o-", color=color, label=mode)
        efficiency.plot(w, [r["efficiency_vs_local"] for r in mine], "o-", color=color, label=f"{mode}, vs local trainer")
        efficiency.plot(w, [r["efficiency_vs_w1"] for r in mine], "s--", color=color, alpha=0.6, label=f"{mode}, vs W=1")
    throughput.set(xlabel="adapt workers W", ylabel="tasks/s", title="throughput", xticks=workers, ylim=(0, None))
    efficiency.axhline(1.0, color="gray", lw=0.8)
    top = max([1.0] + [r[k] for r in plain for k in ("efficiency_vs_local", "efficiency_vs_w1")])
    efficiency.set(xlabel="adapt workers W", ylabel="tasks/s / (W x baseline)", title="scaling efficiency",
                   xticks=workers, ylim=(0, 1.1 * top))
    throughput.legend(fontsize=8)
    efficiency.legend(fontsize=8)
    if slowed:
        ax = axes[2]
        labels, values, colors = [], [], []
        for mode, color in MODES:
            name = mode.replace("-", "\n")  # async-prefetch on two lines, as narrow as the others
            for r in slowed:
                if r["mode"] != mode:
                    continue
                base = next((b for b in plain if b["mode"] == mode and b["workers"] == r["workers"]), None)
                if base is not None:
                    labels.append(f"{name}\nW={r['workers']}")
                    values.append(base["tasks_per_s"])
                    colors.append(color)
                labels.append(f"{name}\nworker {r['straggler_worker']}\n{r['straggler_factor']:g}x slower")
                values.append(r["tasks_per_s"])
                colors.append(color)
        bars = ax.bar(range(len(values)), values, color=colors)
        for bar, label in zip(bars, labels):
            bar.set_hatch("//" if "slower" in label else "")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set(ylabel="tasks/s", title="one straggler")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_capacity(rows: list[dict[str, Any]], path: Path, marks: dict[str, int]) -> Path:
    """Deltas absorbed per second by one PS against parameters, a line per wire precision (the
    best pusher count at each point); dotted lines at the presets' model sizes."""
    fig, (ax, bw) = plt.subplots(1, 2, figsize=(10, 3.9))
    for i, dtype in enumerate(d for d in DTYPES if any(r["delta_dtype"] == d for r in rows)):
        best: dict[int, dict[str, Any]] = {}
        for r in rows:
            if r["delta_dtype"] == dtype and (r["params"] not in best or r["pushes_per_s"] > best[r["params"]]["pushes_per_s"]):
                best[r["params"]] = r
        points = [best[p] for p in sorted(best)]
        ax.plot([p["params"] for p in points], [p["pushes_per_s"] for p in points], "o-", color=f"C{i}", label=dtype)
        bw.plot([p["params"] for p in points], [p["mb_per_s"] for p in points], "o-", color=f"C{i}", label=dtype)
    for name, params in marks.items():
        ax.axvline(params, color="gray", ls=":", lw=0.8)
        ax.text(params, 0.02, f" {name}", rotation=90, fontsize=7, va="bottom", color="gray",
                transform=ax.get_xaxis_transform())
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="deltas absorbed / s", title="one parameter server")
    bw.set(xscale="log", xlabel="parameters", ylabel="MB/s (deltas pushed + theta pulled)", title="bytes moved")
    ax.legend(fontsize=8, title="delta on the wire", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
