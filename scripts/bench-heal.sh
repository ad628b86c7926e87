#!/usr/bin/env bash
# Benchmark (not a test): training throughput of `surgeon heal` against a PyTorch eager loop of the
# same model, loss and optimiser (scripts/bench-heal-torch.py: f32, AdamW on all parameters, global
# gradient-norm clipping), same threads, sequence length, batch and steps, in one run. Two modes:
#   lm  next-token loss on SmolLM2 (`surgeon heal MODEL --loss lm`)
#   kd  distillation of the SOLAR 48-layer student (`surgeon upscale MODEL --layers 48`) from the
#       30-layer original (`surgeon heal STUDENT --teacher MODEL --loss kd --temperature KD_T`)
#
#   scripts/bench-heal.sh [MODEL_DIR] [TEXT]
#
# MODEL_DIR: a Hugging Face directory (default: SmolLM2 imported into $SURGEON_CACHE/smollm2-hf)
# TEXT:      training text (default: Python's pydoc topics, written once to $SURGEON_CACHE/bench-heal)
# Env: SEQ (256), BATCH (4), STEPS (8, > 2), THREADS (2), KD_T (2), LR (1e-4), CLIP (1.0),
#      KD_LAYERS (48), MODES ("lm kd"), PROFILE (release), SURGEON (a prebuilt binary; otherwise cargo
#      builds one with PROFILE), PYTHON (with torch + transformers; default $SURGEON_PYTHON, see
#      scripts/env.sh). A quick check: SEQ=64 BATCH=1 STEPS=3 scripts/bench-heal.sh
#
# Each side runs twice, STEPS and 2 optimizer steps, each as a whole process under /usr/bin/time:
#   steady     = (STEPS - 2) * BATCH * SEQ / (wall(STEPS) - wall(2)): the steps alone, without
#                loading, heal's before/after evaluations (same in both runs) or saving
#   end-to-end = STEPS * BATCH * SEQ / wall(STEPS): what a user waits for (surgeon also evaluates
#                held-out perplexity before and after and writes the model; the PyTorch loop does not)
#   peak RSS   of the STEPS run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
SEQ=${SEQ:-256}
BATCH=${BATCH:-4}
STEPS=${STEPS:-8}
THREADS=${THREADS:-2}
KD_T=${KD_T:-2}
LR=${LR:-1e-4}
CLIP=${CLIP:-1.0}
KD_LAYERS=${KD_LAYERS:-48}
MODES=${MODES:-lm kd}
PROFILE=${PROFILE:-release}
if (( STEPS <= 2 )); then
  echo "error: STEPS must be > 2 (steady state is the difference of a STEPS and a 2-step run)" >&2
  exit 2
fi
PYTHON=${PYTHON:-$(reference_python torch transformers)}
export SURGEON=$(surgeon_bin "$PROFILE")
MODEL=${1:-$(smollm2_hf)}
TEXT=${2:-$SURGEON_CACHE/bench-heal/topics.txt}
if [[ ! -f $TEXT ]]; then
  mkdir -p "$(dirname "$TEXT")"
  "$PYTHON" -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics[k] for k in sorted(t.topics)))" > "$TEXT"
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Runs "$@" under /usr/bin/time; prints "WALL_SECONDS PEAK_RSS_KB" (the command's output goes to
# $WORK/log, shown on failure).
timed() {
  if ! /usr/bin/time -f '%e %M' -o "$WORK/time" "$@" > "$WORK/log" 2>&1; then
    cat "$WORK/log" >&2
    echo "error: failed: $*" >&2
    return 1
  fi
  tail -1 "$WORK/time"
}

surgeon_run() { # MODE STEPS
  local mode=$1 n=$2 out="$WORK/healed-$1-$2"
  local args=("$MODEL" --loss lm)
  [[ $mode == kd ]] && args=("$WORK/student" --teacher "$MODEL" --loss kd --temperature "$KD_T")
  timed "$SURGEON" heal "${args[@]}" --data "$TEXT" --out "$out" --steps "$n" --seq-len "$SEQ" \
    --batch "$BATCH" --lr "$LR" --clip "$CLIP"
  rm -rf "$out"
}

torch_run() { # MODE STEPS
  local mode=$1 n=$2
  local args=("$MODEL")
  [[ $mode == kd ]] && args=("$WORK/student" --teacher "$MODEL" --temperature "$KD_T")
  timed "$PYTHON" scripts/bench-heal-torch.py "${args[@]}" "$TEXT" --seq-len "$SEQ" \
    --batch "$BATCH" --steps "$n" --threads "$THREADS" --lr "$LR" --clip "$CLIP"
}

ROWS="$WORK/rows"
: > "$ROWS"
for mode in $MODES; do
  if [[ $mode == kd && ! -d $WORK/student ]]; then
    echo "== upscale to $KD_LAYERS layers (the KD student)" >&2
    "$SURGEON" upscale "$MODEL" --layers "$KD_LAYERS" --out "$WORK/student" >&2
  fi
  for side in surgeon torch; do
    echo "== $mode, $side: $STEPS and 2 steps (seq $SEQ, batch $BATCH, $THREADS threads)" >&2
    read -r wall_n rss_n < <("${side}_run" "$mode" "$STEPS")
    read -r wall_2 _ < <("${side}_run" "$mode" 2)
    echo "   wall ${wall_n}s / ${wall_2}s, peak RSS $((rss_n / 1024)) MiB" >&2
    echo "$mode $side $wall_n $wall_2 $rss_n" >> "$ROWS"
  done
done

# steady is n/a when the STEPS run was not slower than the 2-step one (noise on a busy machine).
awk -v steps="$STEPS" -v tok="$((BATCH * SEQ))" '
function steady(n, two) { return (n > two) ? sprintf("%.1f", (steps - 2) * tok / (n - two)) : "n/a" }
function ratio(a, b) { return (a == "n/a" || b == "n/a") ? "n/a" : sprintf("%.2fx", a / b) }
{ s[$1, $2] = steady($3, $4); e[$1, $2] = steps * tok / $3; r[$1, $2] = $5 / 1024; order[NR] = $1 }
END {
  printf "%-5s %-8s %14s %14s %14s\n", "mode", "side", "steady tok/s", "e2e tok/s", "peak RSS MiB"
  for (i = 1; i <= NR; i += 2) {
    m = order[i]
    printf "%-5s %-8s %14s %14.1f %14.0f\n", m, "surgeon", s[m, "surgeon"], e[m, "surgeon"], r[m, "surgeon"]
    printf "%-5s %-8s %14s %14.1f %14.0f\n", m, "pytorch", s[m, "torch"], e[m, "torch"], r[m, "torch"]
    printf "%-5s %-8s %14s %13.2fx %13.2fx\n", m, "ratio", ratio(s[m, "surgeon"], s[m, "torch"]), e[m, "surgeon"] / e[m, "torch"], r[m, "surgeon"] / r[m, "torch"]
  }
}' "$ROWS"
echo "(steady: difference of a $STEPS-step and a 2-step run; seq $SEQ, batch $BATCH, $THREADS threads, KD T=$KD_T, lr $LR, clip $CLIP)"
