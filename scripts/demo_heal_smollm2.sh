#!/usr/bin/env bash
# End-to-end healing demo on SmolLM2-135M-Instruct (HF copy), CPU (burn Flex), 2 threads.
# Data: Python's pydoc_data/topics.py; first 64 topics (sorted by key) train, the next topics held out.
set -euo pipefail
SRC=${SRC:-/work/cache/smollm2-hf}
SURGEON=${SURGEON:-${CARGO_TARGET_DIR:-target}/debug/surgeon}
D=${D:-/tmp/heal-demo}; DATA=${DATA:-/tmp/healdata}
PY=${PY:-/work/cache/venv-ref/bin/python}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$D" "$DATA"
python3 - "$DATA" "${EVAL_CHARS:-9000}" <<'PYEOF'
import json, sys, pydoc_data.topics as t
d = sys.argv[1]; keys = sorted(t.topics)
with open(f"{d}/train.jsonl", "w") as f:
    for k in keys[:64]:
        f.write(json.dumps({"text": t.topics[k]}) + "\n")
open(f"{d}/eval_small.txt", "w").write("\n\n".join(t.topics[k] for k in keys[64:])[:int(sys.argv[2])])
PYEOF
# Stand-ins for `surgeon expand` / `surgeon upscale` until the surgery branch lands.
[ -d "$D/smollm2-expand6" ] || "$PY" "$(dirname "$0")/make_upscaled.py" "$SRC" "$D/smollm2-expand6" expand 6
[ -d "$D/smollm2-dus12" ] || "$PY" "$(dirname "$0")/make_upscaled.py" "$SRC" "$D/smollm2-dus12" dus 12
COMMON=(--data "$DATA/train.jsonl" --eval-data "$DATA/eval_small.txt" --seq-len ${L:-128} --batch ${B:-2} --warmup 2 --force)
echo "== 1. LLaMA Pro expansion (30 -> 36 layers), train only the 6 new blocks, LM loss"
"$SURGEON" heal "$D/smollm2-expand6" "${COMMON[@]}" --out "$D/expand6-healed" \
  --train new-blocks --steps ${STEPS1:-20} --lr 3e-4 --eval-every 10
echo "== 2. depth up-scaling 0..18 ++ 12..30 (36 layers), KD from the original (T=2), all weights"
"$SURGEON" heal "$D/smollm2-dus12" "${COMMON[@]}" --out "$D/dus12-healed" \
  --teacher "$SRC" --loss kd --temperature 2 --steps ${STEPS2:-15} --lr 1e-4 --eval-every 15
echo "== cross-check with the runtime's own evaluator (surgeon eval, windows of 128)"
for m in "$SRC" "$D/smollm2-expand6" "$D/expand6-healed" "$D/smollm2-dus12" "$D/dus12-healed"; do
  echo "$m: $("$SURGEON" eval "$m" --data "$DATA/eval_small.txt" --window ${L:-128} --json 2>/dev/null)"
done
