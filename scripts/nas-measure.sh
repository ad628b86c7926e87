#!/usr/bin/env bash
# NAS pruning of SmolLM2-135M at -20% and -33% parameters (issue 18), the README's table:
# importance on calibration text, then (a) uniform MLP width (Minitron), (b) depth only (block
# influence), (c) `surgeon search` under the budget; held-out perplexity unhealed, and after a few
# KD steps from the parent (`surgeon heal --teacher`).
#   scripts/nas-measure.sh [WORKDIR]   (default work/nas)
# Text: Python's pydoc_data/topics.py. Calibration = its first 400,000 characters, KD training
# text = characters 400,000..700,000, held-out = the last 8,000 (never calibrated or trained on).
# Small on purpose (CPU): importance on 4 x 256 tokens, search library on 2 x 64 tokens,
# population 24 x 20 generations, 4 KD steps of 2 x 128 tokens. Set STEPS to heal longer.
set -euo pipefail
cd "$(dirname "$0")/.."
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
work=${1:-work/nas}
steps=${STEPS:-4}
mkdir -p "$work"
gguf=$(scripts/fetch-smollm2.sh)
cargo build --release --quiet
S=target/release/surgeon
python3 - "$work" <<'PY'
import sys, pydoc_data.topics as t
s = open(t.__file__).read()
w = sys.argv[1]
open(f"{w}/calib.txt", "w").write(s[:400000])
open(f"{w}/train.txt", "w").write(s[400000:700000])
open(f"{w}/heldout.txt", "w").write(s[-8000:])
PY
cd "$work"
time $S importance "$gguf" --data calib.txt --samples 4 --window 256 --out scores.json --force
$S prune "$gguf" --scores scores.json --ffn 1024 --out u20 --force        # -19.7%
$S prune "$gguf" --scores scores.json --ffn 680 --out u33 --force         # -33.0%
$S prune "$gguf" --scores scores.json --drop-layers 8 --out d20 --force   # -21.1%
$S prune "$gguf" --scores scores.json --drop-layers 13 --out d33 --force  # -34.2%
for b in 107.6M:s20 90M:s33; do
    time $S search "$gguf" --data calib.txt --max-tokens 128 --window 64 --scores scores.json \
        --budget "params=${b%%:*}" --population 24 --generations 20 --seed 1 --pick best \
        --out "${b##*:}" --force
done
for m in "$gguf" u20 u33 d20 d33 s20/model s33/model; do
    echo "== $m"; $S eval "$m" --data heldout.txt --window 256 | grep perplexity
done
for m in u33 d33 s33/model; do
    $S heal "$m" --teacher "$gguf" --data train.txt --eval-data heldout.txt --steps "$steps" \
        --seq-len 128 --batch 2 --lr 1e-4 --seed 0 --out "heal-${m%%/*}" --force | tail -1
done
