#!/usr/bin/env bash
# `reptile-dist adapt` on an alphabet that meta-training never saw, as a user would run it on their
# own images: the alphabet-split model, 20-way 1-shot on the 20 characters of Angelic (one of the
# Omniglot evaluation alphabets). Support: each character's first drawing, in a folder named for
# the character; query: two other drawings of each, named <character>_<drawer>.png so the answer
# can be checked. Prints the predictions table, then how many queries were right.
#
#   bash benchmarks/adapt_demo.sh [CHECKPOINT]     # default pretrained/omniglot-20w1s-alphabet.pt
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${1:-pretrained/omniglot-20w1s-alphabet.pt}
ZIP=${ZIP:-../shared/data/omniglot/images_evaluation.zip}
DEMO=${DEMO:-runs/adapt-demo}
BIN=${BIN:-.venv/bin}

rm -rf "$DEMO"
mkdir -p "$DEMO/src" "$DEMO/query"
unzip -q "$ZIP" 'images_evaluation/Angelic/*' -d "$DEMO/src"
for dir in "$DEMO"/src/images_evaluation/Angelic/character*; do
    c=$(basename "$dir")
    mkdir -p "$DEMO/support/$c"
    cp "$dir"/*_01.png "$DEMO/support/$c/"
    for d in 02 03; do cp "$dir"/*_"$d".png "$DEMO/query/${c}_$d.png"; done
done
"$BIN/reptile-dist" adapt --checkpoint "$CHECKPOINT" --support "$DEMO/support" --query "$DEMO/query" \
    --out "$DEMO/predictions.csv"
awk -F, 'NR > 1 { n++; if (index($1, $2 "_") == 1) hit++ }
         END { printf "%d of %d queries right (%.1f%%, chance %.1f%%)\n", hit, n, 100 * hit / n, 100 / 20 }' \
    "$DEMO/predictions.csv"
