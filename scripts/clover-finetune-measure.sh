#!/usr/bin/env bash
# The README's CLOVER fine-tuning comparison on SmolLM2: `heal --train clover` vs `--train lora:r=8`
# vs `--train all` at equal steps (next-token loss on the demo's training text), then held-out
# perplexity in domain (the held-out pydoc topics, never trained on) and out of domain (Python's
# LICENSE.txt), trainable parameters and training tokens/s (heal's own report).
#   scripts/clover-finetune-measure.sh      (STEPS=30, N=2048 held-out tokens per text)
#   RUNS="clover@1e-3 lora:r=8@1e-3" scripts/clover-finetune-measure.sh     (TRAIN@LR pairs)
# Text: pydoc topics as in scripts/demo.sh (first 80% of the keys train, the rest is held out).
set -euo pipefail
cd "$(dirname "$0")/.."
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
S="${SURGEON:-target/release/surgeon}"
G="$(scripts/fetch-smollm2.sh)"
D=work/clover-finetune
N=${N:-2048}
STEPS=${STEPS:-30}
RUNS=${RUNS:-"clover@1e-4 lora:r=8@1e-4 all@1e-4"}
mkdir -p $D
python3 - "$D" <<'PY'
import os, sys, sysconfig, pydoc_data.topics as t
d = sys.argv[1]
keys = sorted(t.topics); cut = int(len(keys) * 0.8)
heldout = "\n\n".join(t.topics[k] for k in keys[cut:])
open(f"{d}/train.txt", "w").write("\n\n".join(t.topics[k] for k in keys[:cut]))
open(f"{d}/heldout.txt", "w").write(heldout)
open(f"{d}/heldout_small.txt", "w").write(heldout[:2000])  # heal's own before/after evaluation
lic = os.path.join(sysconfig.get_path("stdlib"), "LICENSE.txt")
open(f"{d}/ood.txt", "w").write(open(lic).read())
PY
ev() { "$S" eval "$1" --data "$2" --max-tokens "$N" --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["ppl"], 3))'; }
echo "original: in-domain $(ev "$G" $D/heldout.txt), out-of-domain $(ev "$G" $D/ood.txt)"
for run in $RUNS; do
  train=${run%@*}; lr=${run##*@}
  rm -rf $D/h
  "$S" heal "$G" --train "$train" --loss lm --data $D/train.txt --eval-data $D/heldout_small.txt \
    --steps "$STEPS" --seq-len 128 --batch 2 --lr "$lr" --warmup 2 --out $D/h > $D/heal.log 2>&1
  echo "$train (lr $lr): $(grep '^healed' $D/heal.log)"
  echo "  in-domain $(ev $D/h $D/heldout.txt), out-of-domain $(ev $D/h $D/ood.txt)"
done
rm -rf $D/h
