#!/usr/bin/env bash
# Benchmark of structural surgery I/O (not a test): `surgeon upscale --slices` against mergekit
# passthrough with the same slices and against `cp` of the same output bytes, on a synthetic
# Llama of 1.1B parameters in bf16 (SyntheticSpec::llama_1b, 22 layers, sharded at 2 GB).
#
#   scripts/bench-surgery.sh            # SLICES=0..16,6..22 (22 -> 32 layers, 1.54B parameters)
#
# Environment: BENCH_DIR (scratch, default $SURGEON_CACHE/bench/surgery; needs ~15 GB), MERGEKIT_VENV (a
# venv with `pip install mergekit`, default $SURGEON_CACHE/venv-mergekit), SLICES, KEEP=1 to keep the files,
# CHECK=0 to skip comparing mergekit's tensors with surgeon's, SURGEON=path of a release binary to use
# instead of building one. Needs GNU time (/usr/bin/time).
# Runs are warm: the input is read once before timing, and each output is deleted before the next.
# surgeon fsyncs its shards before renaming the output into place; plain cp and mergekit do not,
# so `cp+sync` (cp, then fsync of the copied files) is the like-for-like baseline.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/env.sh"
WORK=${BENCH_DIR:-$SURGEON_CACHE/bench/surgery}
VENV=${MERGEKIT_VENV:-$SURGEON_CACHE/venv-mergekit}
SLICES=${SLICES:-0..16,6..22}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[ -x /usr/bin/time ] || { echo "needs GNU time: apt-get install time" >&2; exit 1; }
[ -x "$VENV/bin/mergekit-yaml" ] || { echo "needs mergekit in $VENV: python3 -m venv $VENV && $VENV/bin/pip install mergekit" >&2; exit 1; }

cd "$ROOT"
if [ -z "${SURGEON:-}" ]; then
  cargo build --release --bin surgeon
  SURGEON=$TARGET/release/surgeon
fi
mkdir -p "$WORK"
IN=$WORK/llama-1b
if [ ! -f "$IN/config.json" ]; then
  "$SURGEON" synth --preset llama-1b --dtype bf16 --shard-size 2GB --out "$IN"
fi
python3 scripts/bench/mergekit_recipe.py "$IN" "$SLICES" > "$WORK/recipe.yml"
rm -rf "$WORK"/out-*
cat "$IN"/*.safetensors > /dev/null # warm the page cache

run() { # name, command...
  local name=$1; shift
  sync
  /usr/bin/time -v -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1 || {
    echo "$name failed:" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
}
run surgeon "$SURGEON" upscale "$IN" --slices "$SLICES" --out "$WORK/out-surgeon" --shard-size 2GB
run cp cp -r "$WORK/out-surgeon" "$WORK/out-cp"
rm -rf "$WORK/out-cp"
run cp+sync sh -c 'cp -r "$1" "$2" && sync "$2"/*.safetensors' sh "$WORK/out-surgeon" "$WORK/out-cp"
rm -rf "$WORK/out-cp"
run mergekit "$VENV/bin/mergekit-yaml" "$WORK/recipe.yml" "$WORK/out-mergekit" \
  --out-shard-size 1B --no-copy-tokenizer --no-write-model-card --quiet
if [ "${CHECK:-1}" = 1 ]; then
  "$VENV/bin/python" scripts/bench/compare_outputs.py "$WORK/out-surgeon" "$WORK/out-mergekit"
fi
python3 scripts/bench/report.py "$WORK" surgeon cp cp+sync mergekit
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
