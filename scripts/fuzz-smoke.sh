#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 30 s each; FUZZ_SECONDS overrides), starting
# from the committed seeds (fuzz/seeds/<target>) and a working corpus (fuzz/corpus/<target>, not
# committed). Targets: gguf_header, safetensors_header, config_json, tokenizer_json (or name some:
# scripts/fuzz-smoke.sh config_json). FUZZ_SANITIZER=none builds without AddressSanitizer (faster).
# Needs a nightly toolchain and cargo-fuzz; without them it says how to get them and exits 2. The
# deterministic mutation tests (`cargo test -p surgeon-formats mutation`) still run on stable.
# A crash stops the run with its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${FUZZ_SECONDS:-30}"
SANITIZER="${FUZZ_SANITIZER:-address}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(gguf_header safetensors_header config_json tokenizer_json)

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz-smoke: no nightly toolchain (cargo-fuzz needs one): rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target"
    echo "fuzz-smoke: $target for ${SECS}s (sanitizer: $SANITIZER)" >&2
    cargo +nightly fuzz run --sanitizer "$SANITIZER" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1
done
echo "fuzz-smoke: ${TARGETS[*]}: ${SECS}s each without crashes" >&2
