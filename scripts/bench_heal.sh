#!/usr/bin/env bash
# Training throughput of `surgeon heal` (burn Flex, CPU, f32) vs an equivalent PyTorch loop
# (same model, seq len, batch, steps, AdamW on all parameters, grad clipping, 2 threads), in one run.
# usage: scripts/bench_heal.sh [MODEL_DIR] [TEXT] [SEQ_LEN] [BATCH] [STEPS]
# MODEL_DIR defaults to SmolLM2 imported into $SURGEON_CACHE/smollm2-hf, TEXT to Python's pydoc topics;
# the PyTorch side needs $SURGEON_PYTHON (see scripts/env.sh); SURGEON names a prebuilt binary.
set -euo pipefail
. "$(dirname "$0")/env.sh"
PY=$(reference_python torch transformers)
SURGEON=$(surgeon_bin release)
MODEL=${1:-$(smollm2_hf)}
TEXT=${2:-$SURGEON_CACHE/bench-heal/topics.txt}
L=${3:-128}; B=${4:-2}; N=${5:-4}
if [ ! -f "$TEXT" ]; then
  mkdir -p "$(dirname "$TEXT")"
  python3 -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics[k] for k in sorted(t.topics)))" > "$TEXT"
fi
OUT=$(mktemp -d)
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
echo "== surgeon heal (burn Flex, RAYON_NUM_THREADS=2)"
S=$("$SURGEON" heal "$MODEL" --data "$TEXT" --out "$OUT/healed" --steps "$N" --seq-len "$L" \
     --batch "$B" --lr 1e-5 --clip 1.0 2>&1 | tee /dev/stderr | grep -o '[0-9.]* tokens/s' | awk '{print $1}')
echo "== PyTorch (torch.set_num_threads(2))"
T=$("$PY" "$(dirname "$0")/bench_heal_torch.py" "$MODEL" "$TEXT" --seq-len "$L" --batch "$B" \
     --steps "$N" --threads 2 | tee /dev/stderr | grep -o 'torch tokens/s [0-9.]*' | awk '{print $3}')
rm -rf "$OUT"
python3 -c "print(f'surgeon {float(\"$S\"):.1f} tok/s, torch {float(\"$T\"):.1f} tok/s, ratio surgeon/torch = {float(\"$S\")/float(\"$T\"):.3f}')"
