#!/usr/bin/env bash
# The README's CLOVER measurements on SmolLM2: held-out perplexity after value-output pruning of 25% and
# 50% of every KV head's directions (data-aware CLOVER, weights-only CLOVER, channels by magnitude, at
# random), then after STEPS KD heal steps for some of them.
#   scripts/clover-measure.sh            (N=2048 held-out tokens, STEPS=20)
# Run end to end (exit 0) as `N=64 STEPS=1 SURGEON=target/debug/surgeon scripts/clover-measure.sh`
# (~30 min on 2 loaded cores, most of it heal's own evaluation on 5% of the training text).
# Text: pydoc topics as in scripts/demo.sh (first 80% of the keys calibrate and train, the rest is held out).
set -euo pipefail
cd "$(dirname "$0")/.."
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
S="${SURGEON:-target/release/surgeon}"
G="$(scripts/fetch-smollm2.sh)"
D=work/clover-measure
N=${N:-2048}
STEPS=${STEPS:-20}
mkdir -p $D
python3 - "$D" <<'PY'
import sys, pydoc_data.topics as t
keys = sorted(t.topics); cut = int(len(keys) * 0.8)
open(f"{sys.argv[1]}/train.txt", "w").write("\n\n".join(t.topics[k] for k in keys[:cut]))
open(f"{sys.argv[1]}/heldout.txt", "w").write("\n\n".join(t.topics[k] for k in keys[cut:]))
PY
ev() { "$S" eval "$1" --data $D/heldout.txt --max-tokens "$N" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])'; }
prune() { # RATIO METHOD OUT
  case $2 in
    aware) args=(--calib $D/train.txt) ;;
    plain) args=(--weights-only) ;;
    *) args=(--baseline "$2") ;;
  esac
  rm -rf "$3"; "$S" clover "$G" --prune-vo "$1" "${args[@]}" --out "$3" > "$3.log"
}
echo "original: $(ev "$G")"
for r in 0.25 0.5; do
  for m in aware plain magnitude random; do
    prune $r $m $D/m
    echo "prune $r $m: $(ev $D/m)"
  done
done
for cfg in "0.5 aware" "0.5 random" "0.25 aware"; do
  set -- $cfg
  prune "$1" "$2" $D/m
  rm -rf $D/h
  "$S" heal $D/m --teacher "$G" --loss kd --temperature 2 --data $D/train.txt --steps "$STEPS" \
    --seq-len 128 --batch 2 --lr 1e-4 --warmup 2 --out $D/h > $D/heal.log 2>&1
  echo "prune $1 $2 + $STEPS KD steps: $(ev $D/h)"
done
rm -rf $D/m $D/h
