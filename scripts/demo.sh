#!/usr/bin/env bash
# The end-to-end demo: SmolLM2-135M-Instruct -> SOLAR up-scaling 30 -> 36 layers -> perplexity
# before -> short distillation heal on CPU -> perplexity after (held-out text) -> bf16 HF export.
#   scripts/demo.sh [extra `surgeon run` flags, e.g. --set heal_steps=80 or --dry-run]
# Rerunning continues where an interrupted run stopped (finished steps are skipped, healing resumes).
# Measured (2 shared cores, RAYON_NUM_THREADS=2, fetch+build cached): `surgeon run` 5 m 35 s;
# held-out perplexity 13.678 (original) -> 16.096 (36 layers) -> 15.045 (after 40 KD steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"

scripts/fetch-smollm2.sh >/dev/null

# Demo text: Python's own documentation topics (pydoc_data/topics.py, ~750 KB of English).
# Topics sorted by key: the first 80% train, the rest is held out (never trained on).
mkdir -p work/demo-data
python3 - <<'PY'
import pydoc_data.topics as t
keys = sorted(t.topics)
cut = int(len(keys) * 0.8)
def write(path, text):  # only when changed (steps hash their inputs' content; this skips rehashing)
    try:
        if open(path).read() == text:
            return
    except FileNotFoundError:
        pass
    open(path, "w").write(text)
write("work/demo-data/train.txt", "\n\n".join(t.topics[k] for k in keys[:cut]))
heldout = "\n\n".join(t.topics[k] for k in keys[cut:])
write("work/demo-data/heldout.txt", heldout)
write("work/demo-data/heldout_small.txt", heldout[:6000])
PY

cargo build --release --bin surgeon
SURGEON="${CARGO_TARGET_DIR:-target}/release/surgeon"
time "$SURGEON" run examples/recipes/demo.yaml "$@"
