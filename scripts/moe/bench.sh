#!/usr/bin/env bash
# Benchmark (not a test): `surgeon moe` construction time and peak RSS on a synthetic ~1.1B-parameter
# Llama (TinyLlama shape, bf16, 2 GB shards), for upcycle (E=4, K=2), split-random and split-cluster
# (E=8, K=2). Uses /usr/bin/time -v.
#
#   scripts/moe/bench.sh [WORKDIR]
#
# Env: SURGEON (a prebuilt binary; default $CARGO_TARGET_DIR/release/surgeon, built if missing),
#      METHODS (default "upcycle split-random split-cluster").
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/surgeon-moe-bench}
T=${CARGO_TARGET_DIR:-target}
SURGEON=${SURGEON:-$T/release/surgeon}
METHODS=${METHODS:-"upcycle split-random split-cluster"}
[[ -x $SURGEON ]] || cargo build --release --bin surgeon >&2
mkdir -p "$W"
if [[ ! -f $W/dense/config.json ]]; then
  echo "writing synthetic 1.1B model to $W/dense" >&2
  SURGEON_SYNTH_1B="$W/dense" cargo test --test moe_runtime -- --ignored write_synthetic_1b >&2
fi
du -sh "$W/dense"
for m in $METHODS; do
  case $m in upcycle) e=4 ;; *) e=8 ;; esac
  rm -rf "$W/out-$m"
  /usr/bin/time -v "$SURGEON" moe "$W/dense" --out "$W/out-$m" --experts $e --top-k 2 --method $m \
    --shard-size 2GB 2> "$W/time-$m.txt" >/dev/null || { cat "$W/time-$m.txt"; exit 1; }
  wall=$(grep "Elapsed (wall clock)" "$W/time-$m.txt" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$W/time-$m.txt" | awk '{print $NF}')
  size=$(du -sh "$W/out-$m" | cut -f1)
  echo "$m E=$e K=2: wall $wall, peak RSS $((rss / 1024)) MiB, output $size"
  rm -rf "$W/out-$m"
done
