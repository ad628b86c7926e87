#!/usr/bin/env bash
# extend-vocab on SmolLM2-135M-Instruct, checked with HF tokenizers + transformers.
# usage: scripts/goldens/vocab_smollm.sh [MODEL_DIR] [SURGEON_BIN] [PYTHON]
# Defaults: SmolLM2 imported into $SURGEON_CACHE/smollm2-hf, a cargo-built surgeon, $SURGEON_PYTHON
# (see scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
surgeon=${2:-$(surgeon_bin dev)}
SURGEON=$surgeon
model=${1:-$(smollm2_hf)}
py=${3:-$(reference_python torch transformers tokenizers)}
fx=tests/fixtures/vocab
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. Learned merges on Ukrainian text (zip-tie init), padded to a multiple of 64.
"$surgeon" extend-vocab "$model" --train-corpus $fx/uk_train.txt --add 1000 --pad-to-multiple 64 \
  --out "$out/merges"
"$py" scripts/goldens/vocab_hf_check.py "$model" "$out/merges" $fx/uk_heldout.txt

# 2. A token list (duplicates are reported and skipped), mean init.
"$surgeon" extend-vocab "$model" --tokens $fx/uk_tokens.txt --init mean --out "$out/tokens"
"$py" scripts/goldens/vocab_hf_check.py "$model" "$out/tokens"

# 3. Errors: one line each, exit status 1.
for args in "--tokens /dev/null" "--train-corpus $fx/uk_train.txt --add 0" \
            "--train-corpus $fx/uk_tokens.txt --add 500"; do
  if "$surgeon" extend-vocab "$model" $args --out "$out/bad" 2>"$out/err"; then
    echo "expected an error for: $args"; exit 1
  fi
  cat "$out/err"
done
