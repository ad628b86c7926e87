#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 30 s each; FUZZ_SECONDS overrides).
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Without them it says so and exits 2;
# the deterministic mutation smoke test (`cargo test -p surgeon-formats gguf::tests::mutation_smoke`) still
# runs on stable.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${FUZZ_SECONDS:-30}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz-smoke: no nightly toolchain (cargo-fuzz needs one): rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

# Seed the GGUF corpus with the real model's header when it is available (first 64 KiB is plenty).
mkdir -p corpus/gguf_header corpus/safetensors_header
GGUF="${SURGEON_SMOLLM2_GGUF:-${SURGEON_CACHE:-$HOME/.cache/surgeon}/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ -f "$GGUF" ] && [ ! -f corpus/gguf_header/smollm2-head ]; then
    head -c 65536 "$GGUF" > corpus/gguf_header/smollm2-head
fi

for target in gguf_header safetensors_header; do
    echo "fuzz-smoke: $target for ${SECS}s" >&2
    cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$SECS" -rss_limit_mb=2048
done
echo "fuzz-smoke: all targets ran ${SECS}s without crashes" >&2
