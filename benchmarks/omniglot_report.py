"""Turn the reproduction runs (benchmarks/reproduce_omniglot.sh) into what the README and
pretrained/ show: the accuracy table against the paper, learning curves, pretrained/manifest.json.

    python benchmarks/omniglot_report.py [--runs runs/repro] [--figure docs/figures/omniglot_learning_curves.png]

Reads each run's summary.json (1-shot: the run's own final evaluation), the `reptile-dist eval`
logs of the 5-shot evaluations of the same weights, and metrics.parquet (the periodic evaluations).
Only the models whose run (and 5-shot log) is in --runs are reported; their manifest entries
replace the entries of the same file, and every other entry stays as it is (a 20-way retrain
leaves the shipped 5-way models' entries alone).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# arXiv 1803.02999 v3, Table 1: (Reptile, Reptile + transduction), accuracy % and 95% interval.
PAPER = {
    "omniglot-5w1s": ((95.39, 0.09), (97.68, 0.04)),
    "omniglot-5w5s": ((98.90, 0.10), (99.48, 0.06)),
    "omniglot-20w1s": ((88.14, 0.15), (89.43, 0.14)),
    "omniglot-20w5s": ((96.65, 0.33), (97.12, 0.32)),
}
PAPER_ITERS = {5: 100_000, 20: 200_000}
# (pretrained file, run folder, 5-shot eval log or None for the run's own 1-shot evaluation)
MODELS = (
    ("omniglot-5w1s", "5w", None),
    ("omniglot-5w5s", "5w", "5w-5shot.log"),
    ("omniglot-20w1s", "20w", None),
    ("omniglot-20w5s", "20w", "20w-5shot.log"),
    ("omniglot-20w1s-alphabet", "20w-alphabet", None),
)
RUN_NAMES = ("5w", "20w", "20w-alphabet")


def result_of(runs: Path, run: str, log: str | None) -> dict:
    summary = json.loads((runs / run / "summary.json").read_text())
    inner_state = _config_value(runs / run / "config.yaml", "inner_state", "fresh")
    if log is None:
        ev = {"accuracy": summary["test_accuracy"], "accuracy_ci95": summary["test_ci95"],
              "transductive_accuracy": summary["test_transductive_accuracy"],
              "transductive_accuracy_ci95": summary["test_transductive_ci95"], "tasks": summary["eval_tasks"]}
    else:
        ev = json.loads((runs / log).read_text().strip().splitlines()[-1])  # eval prints its JSON last
    return {"summary": summary, "eval": ev, "inner_state": inner_state}


def _config_value(path: Path, key: str, default: str) -> str:
    from reptile_dist.config import ConfigError, read_yaml_mapping

    return str(read_yaml_mapping(path, ConfigError, "config keys").get(key, default))


def manifest_entry(name: str, runs: Path, run: str, log: str | None, res: dict, train_command: str) -> dict:
    s, ev = res["summary"], res["eval"]
    export = f"reptile-dist export --checkpoint {runs}/{run}/final.pt --out pretrained/{name}.pt"
    commands = [train_command]
    if log:
        export += " --set shots=5"
        commands.append(f"reptile-dist eval --checkpoint {runs}/{run}/final.pt --tasks {ev['tasks']} --set shots=5")
    return {
        "file": f"{name}.pt", "preset": name.replace("-alphabet", ""), "split": s["split"],
        "inner_state": res.get("inner_state", "fresh"), "meta_iters": s["meta_iters"], "train_wall_s": round(s["wall_s"]), "train_tasks_per_s": round(s["tasks_per_s"], 1),
        "backend": s["backend"], "workers": s["workers"],
        "test_accuracy": round(100 * ev["accuracy"], 2), "test_ci95": round(100 * ev["accuracy_ci95"], 2),
        "test_transductive_accuracy": round(100 * ev["transductive_accuracy"], 2),
        "test_transductive_ci95": round(100 * ev["transductive_accuracy_ci95"], 2), "eval_tasks": ev["tasks"],
        "commands": commands + [export],
    }


def table(entries: list[dict]) -> str:
    lines = ["| model | paper | paper + transduction | ours | ours + transduction | meta-iters (paper's) | eval tasks | train wall |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        paper = PAPER.get(e["preset"]) if e["split"] == "paper" else None
        p = (f"{paper[0][0]:.2f} ± {paper[0][1]:.2f}", f"{paper[1][0]:.2f} ± {paper[1][1]:.2f}") if paper else ("—", "—")
        ways = 20 if "20w" in e["preset"] else 5
        lines.append(f"| {e['file'][:-3]} ({e['split']} split) | {p[0]} | {p[1]} | {e['test_accuracy']:.2f} ± {e['test_ci95']:.2f} "
                     f"| {e['test_transductive_accuracy']:.2f} ± {e['test_transductive_ci95']:.2f} "
                     f"| {e['meta_iters']:,} ({PAPER_ITERS[ways]:,}) | {e['eval_tasks']:,} | {e['train_wall_s'] / 60:.0f} min |")
    return "\n".join(lines)


def present_models(runs: Path, only: tuple[str, ...] = RUN_NAMES) -> list[tuple[str, str, str | None]]:
    """The MODELS of the runs named in `only` that finished in `runs` (with their 5-shot evaluation log)."""
    return [(name, run, log) for name, run, log in MODELS
            if run in only and (runs / run / "summary.json").exists() and (log is None or (runs / log).exists())]


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each entry of the same file replaced by its `new` one, in place; new files last."""
    fresh = {e["file"]: e for e in new}
    merged = [fresh.pop(e["file"], e) for e in old]
    return merged + list(fresh.values())


def eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in pq.read_table(run_dir / "metrics.parquet").to_pylist() if r.get("eval_accuracy") is not None]


def plot_curves(runs: Path, path: Path, baseline: Path | None = None, baseline_label: str = "",
                only: tuple[str, ...] = RUN_NAMES) -> None:
    panels = [(run, title) for run, title in (("5w", "5-way 1-shot (paper split)"), ("20w", "20-way 1-shot (paper split)"),
                                              ("20w-alphabet", "20-way 1-shot (alphabet split)"))
              if run in only and (runs / run / "metrics.parquet").exists()]
    fig, axes = plt.subplots(1, len(panels), figsize=(14 * len(panels) / 3, 3.8), squeeze=False)
    for ax, (run, title) in zip(axes[0], panels):
        rows = eval_rows(runs / run)
        steps = [r["step"] for r in rows]
        if baseline is not None and (baseline / run / "metrics.parquet").exists():
            old = eval_rows(baseline / run)
            ax.plot([r["step"] for r in old], [100 * r["eval_accuracy"] for r in old], "k--", lw=1,
                    label=f"non-transductive, {baseline_label}")
        for key, label in (("eval_accuracy", "non-transductive"), ("eval_transductive_accuracy", "transductive")):
            acc = [100 * r[key] for r in rows]
            ci = [100 * r[f"{key}_ci95"] for r in rows]
            ax.errorbar(steps, acc, yerr=ci, marker="o", ms=3, capsize=2, label=label)
        ax.set(title=title, xlabel="meta-iteration", ylabel="test accuracy % (100 tasks, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/repro")
    parser.add_argument("--figure", default="docs/figures/omniglot_learning_curves.png")
    parser.add_argument("--manifest", default="pretrained/manifest.json")
    parser.add_argument("--train-command", default="bash benchmarks/reproduce_omniglot.sh train",
                        help="how the runs were made, recorded in the manifest")
    parser.add_argument("--baseline", help="runs folder of an earlier reproduction, drawn dashed for comparison")
    parser.add_argument("--baseline-label", default="earlier runs")
    parser.add_argument("--only", nargs="+", choices=RUN_NAMES, default=RUN_NAMES,
                        help="report only these runs' models; the manifest keeps every other entry")
    args = parser.parse_args()
    runs = Path(args.runs)
    models = present_models(runs, tuple(args.only))
    if not models:
        raise SystemExit(f"{runs}: no finished run of {', '.join(args.only)} (with summary.json) to report")
    entries = [manifest_entry(name, runs, run, log, result_of(runs, run, log), args.train_command)
               for name, run, log in models]
    manifest = Path(args.manifest)
    old = json.loads(manifest.read_text()) if manifest.exists() else []
    manifest.write_text(json.dumps(merge_entries(old, entries), indent=2) + "\n")
    plot_curves(runs, Path(args.figure), Path(args.baseline) if args.baseline else None, args.baseline_label,
                tuple(r for _, r, _ in models))
    print(table(entries))


if __name__ == "__main__":
    main()
