#!/usr/bin/env bash
# Does async training with fewer pushes of half the bytes (tasks_per_push: 5, delta_dtype: float32,
# the async defaults for two workers since 2026-12-03) learn as well as the earlier defaults (3, float64)? Short omniglot-5w1s trainings on the engine, two workers at one thread each,
# the step size annealed to 0 over ITERS meta-steps; each setting once per seed, the order of the
# settings reversed from one seed to the next so that drift in the machine's speed falls on each;
# then a table from the summary.json of every run in OUT, whatever NAMES and SEEDS say (test
# accuracy on EVAL_TASKS test tasks with its 95% interval, training tasks/s, pushes by staleness)
# and each setting's mean over the seeds it has. Run it alone on the machine:
# async staleness depends on timing. The settings (NAMES):
#   tpp3-float64   async with prefetch, tasks_per_push: 3 and delta_dtype: float64 (the defaults for
#                  two workers before 2026-12-03; the runs of that date named "defaults" ran them)
#   tpp5-float32   the same with tasks_per_push: 5 and delta_dtype: float32 (what the defaults are now)
#   sync           sync mode: the synchronous update, the local trainer's bit for bit
#
#   bash benchmarks/push_settings_quality.sh                      # train what is missing, then the table
#   NAMES=sync SEEDS="0 1" bash benchmarks/push_settings_quality.sh
#   bash benchmarks/push_settings_quality.sh table                # the table only
#
# NAMES ("tpp3-float64 tpp5-float32"), SEEDS ("0 1 2"), ITERS (3000), EVAL_TASKS (1000), OUT
# (runs/push-quality), BIN (.venv/bin). A run with a summary.json is not run again; a stopped one is
# resumed (from meta-step 0 when it stopped before its first checkpoint), its log appended to.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/push-quality}
NAMES=${NAMES:-tpp3-float64 tpp5-float32}
SEEDS=${SEEDS:-0 1 2}
ITERS=${ITERS:-3000}
EVAL_TASKS=${EVAL_TASKS:-1000}

setting() {  # name -> its train options
    case $1 in
    tpp3-float64) echo "--mode async --set prefetch=true --set tasks_per_push=3 --set delta_dtype=float64" ;;
    tpp5-float32) echo "--mode async --set prefetch=true --set tasks_per_push=5 --set delta_dtype=float32" ;;
    sync) echo "--mode sync" ;;
    *) echo "NAMES: unknown setting '$1' (known: tpp3-float64 tpp5-float32 sync)" >&2; return 2 ;;
    esac
}

train_one() {  # name seed
    local name=$1 seed=$2 dir="$OUT/$1-seed$2" options
    options=$(setting "$name")
    [ -f "$dir/summary.json" ] && return 0
    local resume=""
    [ -f "$dir/config.yaml" ] && resume="--resume"
    # shellcheck disable=SC2086  # options holds several words on purpose
    "$BIN/reptile-dist" train --config omniglot-5w1s --backend ray --workers 2 --out "$dir" --no-progress $resume \
        $options --set torch_threads=1 --set seed="$seed" --set meta_iters="$ITERS" --set eval_tasks="$EVAL_TASKS" \
        --set eval_every=0 --set eval_tasks_periodic=1 --set checkpoint_every=500 >> "$dir.log" 2>&1
}

if [ "${1:-}" != table ]; then
    for name in $NAMES; do setting "$name" > /dev/null; done  # an unknown name fails before any run
    mkdir -p "$OUT"
    # shellcheck disable=SC2206  # NAMES is a list of words
    names=($NAMES)
    for seed in $SEEDS; do
        for name in "${names[@]}"; do
            echo "$(date -u +%H:%M:%S) $name seed $seed"
            train_one "$name" "$seed"
        done
        names=($(printf '%s\n' "${names[@]}" | tac))  # the other order for the next seed
    done
fi

"$BIN/python" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

def setting_and_seed(name):  # "tpp5-float32-seed2" -> ("tpp5-float32", 2)
    setting, _, seed = name.rpartition("-seed")
    return setting, int(seed) if seed.isdigit() else -1


runs = {path.parent.name: json.loads(path.read_text())
        for path in sorted(Path(sys.argv[1]).glob("*/summary.json"), key=lambda path: setting_and_seed(path.parent.name))}
print("| run | test accuracy (95% interval) | transductive | tasks | tasks/s | wall s | pushes by staleness |")
print("|---|---|---|---|---|---|---|")
for name, s in runs.items():
    spread = ", ".join(f"{k}: {v}" for k, v in sorted((s.get("staleness_histogram") or {}).items(), key=lambda kv: int(kv[0])))
    print(f"| {name} | {100 * s['test_accuracy']:.2f}% ± {100 * s['test_ci95']:.2f} | "
          f"{100 * s['test_transductive_accuracy']:.2f}% ± {100 * s['test_transductive_ci95']:.2f} | {s['eval_tasks']} | "
          f"{s['tasks_per_s']:.1f} | {s['wall_s']:.0f} | {spread or '-'} |")
for setting in sorted({setting_and_seed(name)[0] for name in runs}):
    mine = [s for name, s in runs.items() if setting_and_seed(name)[0] == setting]
    print(f"{setting}: mean over {len(mine)} seeds {100 * statistics.mean(s['test_accuracy'] for s in mine):.2f}% "
          f"(transductive {100 * statistics.mean(s['test_transductive_accuracy'] for s in mine):.2f}%), "
          f"{statistics.mean(s['tasks_per_s'] for s in mine):.1f} tasks/s")
EOF
