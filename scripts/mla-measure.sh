#!/usr/bin/env bash
# The README's MLA measurements on SmolLM2: KV cache bytes per token, held-out perplexity after
# `convert-attention --to mla` at two latent ranks and after STEPS KD heal steps from the original,
# and decoding speed and cache size after a 2k context against the original.
#   scripts/mla-measure.sh        (N=1024 held-out tokens, STEPS=10, CAL=1024 calibration tokens)
# Text: pydoc topics as in scripts/demo.sh (first 80% of the keys calibrate and train, the rest is
# held out and never trained on).
set -euo pipefail
cd "$(dirname "$0")/.."
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
S="${SURGEON:-target/debug/surgeon}"
G="$(scripts/fetch-smollm2.sh)"
D=work/mla-measure
N=${N:-1024}
STEPS=${STEPS:-10}
CAL=${CAL:-1024}
ROPE=${ROPE:-32}
RANKS=${RANKS:-"256 128"}
mkdir -p $D
python3 - "$D" <<'PY'
import sys, pydoc_data.topics as t
keys = sorted(t.topics); cut = int(len(keys) * 0.8)
open(f"{sys.argv[1]}/train.txt", "w").write("\n\n".join(t.topics[k] for k in keys[:cut]))
open(f"{sys.argv[1]}/heldout.txt", "w").write("\n\n".join(t.topics[k] for k in keys[cut:]))
PY
ev() { # MODEL -> "ppl P, KV B bytes/token"
  "$S" eval "$1" --data $D/heldout.txt --max-tokens "$N" --json |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print("ppl %.3f, KV cache %d bytes/token" % (j["ppl"], j["kv_cache_bytes_per_token"]))'
}
echo "original: $(ev "$G")"
for r in $RANKS; do
  rm -rf $D/m$r $D/h$r
  "$S" convert-attention "$G" --to mla --kv-rank "$r" --rope-dim "$ROPE" --calib $D/train.txt \
    --max-tokens "$CAL" --out $D/m$r > $D/m$r.log 2>&1
  echo "mla kv-rank $r rope-dim $ROPE: $(ev $D/m$r)"
  "$S" heal $D/m$r --teacher "$G" --loss kd --temperature 2 --data $D/train.txt --steps "$STEPS" \
    --seq-len 128 --batch 2 --lr 1e-4 --warmup 2 --out $D/h$r > $D/heal$r.log 2>&1
  echo "mla kv-rank $r + $STEPS KD steps: $(ev $D/h$r)"
done
first=${RANKS%% *}
rm -rf $D/lin
"$S" convert-attention "$G" --to mla --kv-rank "$first" --rope-dim "$ROPE" --latent-norm linear \
  --calib $D/train.txt --max-tokens "$CAL" --out $D/lin > $D/lin.log 2>&1
echo "mla kv-rank $first, linear latent norm (no healing): $(ev $D/lin)"
cargo run -q --example mla_generation -- "$G" $D/m$first 16 2048
/usr/bin/time -f "original: peak RSS %M KB" "$S" generate "$G" --prompt "$(head -c 6000 $D/heldout.txt)" --max-new-tokens 16 --stats > /dev/null
/usr/bin/time -f "mla kv-rank $first: peak RSS %M KB" "$S" generate $D/m$first --prompt "$(head -c 6000 $D/heldout.txt)" --max-new-tokens 16 --stats > /dev/null
