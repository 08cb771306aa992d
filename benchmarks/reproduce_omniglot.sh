#!/usr/bin/env bash
# Meta-train the paper's Omniglot settings and write the pretrained checkpoints.
#
#   bash benchmarks/reproduce_omniglot.sh train     # three runs side by side, one thread each
#   bash benchmarks/reproduce_omniglot.sh eval      # the 5-shot evaluations of the same weights
#   bash benchmarks/reproduce_omniglot.sh publish   # pretrained/*.pt, pretrained/manifest.json, curves, table
#
# The 1-shot and 5-shot presets of one way count meta-train identically (train_shots = 10 in
# both, as in openai/supervised-reptile's commands; `shots` only sets the evaluation tasks), so one
# run per way count serves both shot counts. ITERS_5W / ITERS_20W shorten the paper's 100k / 200k
# meta-iterations to what the machine allows; the step size still anneals linearly to 0 over them.
# An interrupted run continues with the same command (it passes --resume when a run exists).
# RUNS picks the runs (default all three: 5w 20w 20w-alphabet); `publish` exports and records only
# the models of the runs it names, and keeps every other entry of pretrained/manifest.json:
#   RUNS="20w 20w-alphabet" ITERS_20W=40000 bash benchmarks/reproduce_omniglot.sh train
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/repro}
ITERS_5W=${ITERS_5W:-100000}
ITERS_20W=${ITERS_20W:-200000}
EVAL_TASKS=${EVAL_TASKS:-10000}
BACKEND=${BACKEND:---backend local --set torch_threads=1}
RUNS=${RUNS:-5w 20w 20w-alphabet}
for run in $RUNS; do
    case $run in 5w|20w|20w-alphabet) ;; *) echo "RUNS: unknown run '$run' (known: 5w 20w 20w-alphabet)" >&2; exit 2 ;; esac
done
wanted() { [[ " $RUNS " == *" $1 "* ]]; }
wait_all() { local pid; for pid in "$@"; do wait "$pid"; done; }  # any one failing fails the script

train_one() {  # name preset iters extra-args...
    local name=$1 preset=$2 iters=$3; shift 3
    local resume=""
    [ -f "$OUT/$name/config.yaml" ] && resume="--resume"
    "$BIN/reptile-dist" train --config "$preset" --out "$OUT/$name" --no-progress $resume $BACKEND \
        --set meta_iters="$iters" --set eval_tasks="$EVAL_TASKS" --set eval_tasks_periodic=100 \
        --set checkpoint_every=500 "$@" > "$OUT/$name.log" 2>&1
}

case "${1:-}" in
train)
    mkdir -p "$OUT"
    pids=()
    if wanted 5w; then train_one 5w omniglot-5w1s "$ITERS_5W" --set eval_every=1000 & pids+=($!); fi
    if wanted 20w; then train_one 20w omniglot-20w1s "$ITERS_20W" --set eval_every=500 & pids+=($!); fi
    if wanted 20w-alphabet; then
        train_one 20w-alphabet omniglot-20w1s "$ITERS_20W" --set eval_every=500 --set split=alphabet & pids+=($!)
    fi
    wait_all ${pids[@]+"${pids[@]}"}
    ;;
eval)
    # 1-shot figures come from each run's summary.json; the 5-shot ones from the same weights.
    # Side by side, one thread each (the runs' torch_threads).
    pids=()
    for run in 5w 20w; do
        if wanted $run; then
            "$BIN/reptile-dist" eval --checkpoint "$OUT/$run/final.pt" --tasks "$EVAL_TASKS" --set shots=5 > "$OUT/$run-5shot.log" & pids+=($!)
        fi
    done
    wait_all ${pids[@]+"${pids[@]}"}
    ;;
publish)
    # Everything checked before any model is replaced: each run finished, and the 5-shot
    # evaluation (5w, 20w) is of these weights (newer than final.pt).
    for run in $RUNS; do
        for f in final.pt summary.json; do
            [ -f "$OUT/$run/$f" ] || { echo "$OUT/$run/$f missing: the run has not finished" >&2; exit 2; }
        done
        if [ "$run" != 20w-alphabet ] && ! [ "$OUT/$run-5shot.log" -nt "$OUT/$run/final.pt" ]; then
            echo "$OUT/$run-5shot.log missing or older than $OUT/$run/final.pt: run 'eval' first" >&2; exit 2
        fi
    done
    for n in 5w1s:5w 5w5s:5w 20w1s:20w 20w5s:20w 20w1s-alphabet:20w-alphabet; do
        name=omniglot-${n%%:*} run=${n##*:} shots=""
        wanted "$run" || continue
        [[ $name == *5s ]] && shots="--set shots=5"
        "$BIN/reptile-dist" export --checkpoint "$OUT/$run/final.pt" --out "pretrained/$name.pt" $shots
    done
    # BASELINE=runs/other: an earlier reproduction drawn dashed in the learning curves.
    figure=docs/figures/omniglot_learning_curves.png  # a partial publish draws its own runs beside it
    wanted 5w && wanted 20w && wanted 20w-alphabet || figure=docs/figures/omniglot_learning_curves-${RUNS// /-}.png
    "$BIN/python" benchmarks/omniglot_report.py --runs "$OUT" --only $RUNS --figure "$figure" \
        ${BASELINE:+--baseline "$BASELINE" --baseline-label "${BASELINE_LABEL:-earlier runs}"} \
        --train-command "RUNS=\"$RUNS\" OUT=$OUT ITERS_5W=$ITERS_5W ITERS_20W=$ITERS_20W EVAL_TASKS=$EVAL_TASKS bash benchmarks/reproduce_omniglot.sh train"
    ;;
*)
    echo "usage: $0 train|eval|publish" >&2; exit 2 ;;
esac
