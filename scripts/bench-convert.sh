#!/usr/bin/env bash
# Benchmark: `surgeon convert` (re-shard, bf16 -> bf16) of a synthetic 1.1B Llama against `cp -r`
# of the same files, in the same run. Reports wall times, the ratio and peak RSS.
# Usage: scripts/bench-convert.sh [WORKDIR]   (needs ~7 GB free; a release build is made first)
set -euo pipefail
work=${1:-${TMPDIR:-/tmp}/surgeon-bench-convert}
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin surgeon
bin=${CARGO_TARGET_DIR:-$root/target}/release/surgeon
mkdir -p "$work"
src=$work/llama-1b
[ -f "$src/config.json" ] || "$bin" synth --preset llama-1b --dtype bf16 --shard-size 2GB --out "$src"
rm -rf "$work/cp-out" "$work/convert-out"
cat "$src"/*.safetensors > /dev/null   # same warm page cache for both
measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" 2> "$work/$label.log" > /dev/null
  read -r secs kb < "$work/time.txt"
  echo "$label $secs $kb"
}
read -r _ cp_s cp_kb < <(measure cp cp -r "$src" "$work/cp-out")
sync
read -r _ cv_s cv_kb < <(measure convert "$bin" convert "$src" --out "$work/convert-out" --shard-size 1GB)
sync
size=$(du -sb "$src" | cut -f1)
printf 'model: %s (%s bytes)\n' "$src" "$size"
printf '%-10s %8s s  peak RSS %6d MB\n' cp "$cp_s" $((cp_kb / 1024)) convert "$cv_s" $((cv_kb / 1024))
awk -v a="$cv_s" -v b="$cp_s" 'BEGIN { printf "ratio convert/cp: %.2fx\n", a / b }'
rm -rf "$work/cp-out" "$work/convert-out"
