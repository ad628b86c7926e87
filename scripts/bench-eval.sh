#!/usr/bin/env bash
# Benchmark: `surgeon eval` / `surgeon generate` against the equivalent PyTorch (transformers) loops on
# the same machine, threads, windows and tokens. Not a test: prints tokens/s of each and the ratio.
#
#   scripts/bench-eval.sh [MODEL] [DATA]
#
# MODEL: an HF directory or a .gguf file, which is imported first (`surgeon import-gguf`) so that both
#        sides read the same weights and tokenizer.json (default: SmolLM2 as an HF directory)
# DATA:  text or .jsonl (default: Python's pydoc_data/topics.py)
# Env:   PYTHON (with torch + transformers + tokenizers; default $SURGEON_PYTHON, see scripts/env.sh),
#        THREADS (2), WINDOW (512), MAX_TOKENS (8192), PROMPT_TOKENS (512: the generation prompt is
#        the first PROMPT_TOKENS tokens of DATA), NEW_TOKENS (256), PROFILE (release),
#        BATCH (windows per forward pass on both sides; default surgeon's own, 4096 / WINDOW),
#        SURGEON (a prebuilt binary; otherwise cargo builds one with PROFILE).
# Each side runs under /usr/bin/time, which reports its peak RSS. Both tokenise with tokenizer.json through
# the `tokenizers` library (transformers 5 rebuilds some tokenizers without their pre-tokenizer, e.g.
# SmolLM2's digit splitting, and would score other token ids).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
PYTHON=${PYTHON:-$(reference_python torch transformers tokenizers)}
THREADS=${THREADS:-2}
WINDOW=${WINDOW:-512}
MAX_TOKENS=${MAX_TOKENS:-8192}
NEW_TOKENS=${NEW_TOKENS:-256}
PROMPT_TOKENS=${PROMPT_TOKENS:-512}
PROFILE=${PROFILE:-release}
# surgeon eval's default batch (eval::AUTO_BATCH_POSITIONS positions), given to both sides.
BATCH=${BATCH:-$(( 4096 / WINDOW > 1 ? 4096 / WINDOW : 1 ))}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
SURGEON=$(surgeon_bin "$PROFILE")
MODEL=${1:-$(smollm2_hf)}
DATA=${2:-$($PYTHON -c "import pydoc_data.topics as t; print(t.__file__)")}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ $MODEL == *.gguf ]]; then
  "$SURGEON" import-gguf "$MODEL" --out "$WORK/model" >&2
  MODEL=$WORK/model
fi

echo "== eval: window $WINDOW, first $MAX_TOKENS tokens, $BATCH windows per batch, $THREADS threads" >&2
RSS=$WORK/rss
# peak RSS in MiB of the last command run under `timed`
timed() { /usr/bin/time -f %M -o "$RSS" "$@"; }
peak() { echo "$(( $(tail -1 "$RSS") / 1024 )) MiB"; }
rust_eval=$(timed "$SURGEON" eval "$MODEL" --data "$DATA" --window "$WINDOW" --max-tokens "$MAX_TOKENS" --batch-size "$BATCH" --json)
rust_eval_rss=$(peak)
echo "surgeon: $rust_eval, peak RSS $rust_eval_rss"

torch_eval=$(timed "$PYTHON" - "$MODEL" "$DATA" "$WINDOW" "$MAX_TOKENS" "$THREADS" "$BATCH" <<'PY'
import json, math, os, sys, time
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
model_path, data, window, max_tokens, threads, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(threads)
tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
raw = open(data, encoding="utf-8").read()
if data.endswith(".jsonl"):
    raw = "\n\n".join(json.loads(l)["text"] for l in raw.splitlines() if l.strip())
ids = tok.encode(raw, add_special_tokens=False).ids[:max_tokens]
wins = [ids[i:i + window + 1] for i in range(0, len(ids), window + 1)]
wins = [w for w in wins if len(w) >= 2]
total, count = 0.0, 0
start = time.perf_counter()
# Batches as surgeon's: up to `batch` consecutive windows of equal length.
batches = []
for w in wins:
    if batches and len(batches[-1]) < batch and len(batches[-1][0]) == len(w):
        batches[-1].append(w)
    else:
        batches.append([w])
with torch.inference_mode():
    for b in batches:
        x = torch.tensor(b)
        logits = model(x[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += nll.item(); count += x[:, 1:].numel()
secs = time.perf_counter() - start
print(json.dumps({"tokens": count, "nll": total / count, "ppl": math.exp(total / count), "tokens_per_s": count / secs}))
PY
)
torch_eval_rss=$(peak)
echo "pytorch: $torch_eval, peak RSS $torch_eval_rss"
"$PYTHON" - "$rust_eval" "$torch_eval" <<'PY'
import json, sys
r, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"eval tokens/s: surgeon {r['tokens_per_s']:.1f}  pytorch {t['tokens_per_s']:.1f}  ratio {r['tokens_per_s'] / t['tokens_per_s']:.2f}"
      f"  (ppl {r['ppl']:.4f} vs {t['ppl']:.4f}, tokens {r['tokens']} vs {t['tokens']})")
PY
echo "eval peak RSS: surgeon $rust_eval_rss  pytorch $torch_eval_rss"

echo "== generate: $PROMPT_TOKENS-token prompt, $NEW_TOKENS new tokens, greedy" >&2
PROMPT=$("$PYTHON" - "$MODEL" "$DATA" "$PROMPT_TOKENS" <<'PY'
import json, os, sys
from tokenizers import Tokenizer
model_path, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
raw = open(data, encoding="utf-8").read()
if data.endswith(".jsonl"):
    raw = "\n\n".join(json.loads(l)["text"] for l in raw.splitlines() if l.strip())
print(tok.decode(tok.encode(raw[:20 * n], add_special_tokens=False).ids[:n]), end="")
PY
)
rust_gen=$(timed "$SURGEON" generate "$MODEL" --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS" --stats 2>&1 >/dev/null | grep -o '[0-9.]* tokens/s' | head -1 | cut -d' ' -f1)
rust_gen_rss=$(peak)
torch_gen=$(timed "$PYTHON" - "$MODEL" "$PROMPT" "$NEW_TOKENS" "$THREADS" <<'PY'
import os, sys, time
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, GenerationConfig
model_path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
try:
    eos = GenerationConfig.from_pretrained(model_path).eos_token_id
except OSError:
    eos = model.config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos])
ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
print(f"prompt tokens {ids.shape[1]}", file=sys.stderr)
# Same loop as surgeon: prefill, then one token at a time with the KV cache, greedy, stopping at EOS
# (decode speed counts the tokens after the first).
with torch.inference_mode():
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter(); made = 1
    while made < n:
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        made += 1
        if nxt.item() in eos: break
    secs = time.perf_counter() - start
print((made - 1) / secs)
PY
)
torch_gen_rss=$(peak)
echo "generate tokens/s: surgeon ${rust_gen}  pytorch ${torch_gen}  ratio $(python3 -c "print(f'{$rust_gen / $torch_gen:.2f}')")"
echo "generate peak RSS: surgeon $rust_gen_rss  pytorch $torch_gen_rss"
