#!/usr/bin/env bash
# One prepared check of surgeon on a GPU against PyTorch, printing one table (issue 13).
# Needs no network and no build on the GPU machine: a surgeon binary built elsewhere with
# `cargo build --release --features cuda` (then `strip`), this script and scripts/gpu_check.py, and a
# Python with torch (CUDA), transformers and numpy. Finishes in under 8 minutes (every command has a
# time limit inside the budget; what does not finish shows as missing in the table, with the reason).
#
# For the SmolLM2-135M shape and a 1.1B Llama shape, on synthetic weights (`surgeon synth`, f32):
#   logits        surgeon --backend cuda vs transformers CUDA f32, max |diff| (goal <= 1e-3)
#   eval tok/s    `surgeon eval` vs a transformers f32 no-grad loop over the same windows
#   KD heal tok/s `surgeon heal --loss kd --precision bf16` (student from a teacher of the same
#                 shape) vs an eager PyTorch loop of the same loss and optimizer under bf16 autocast
#   peak memory   GPU memory used while each healing run runs (nvidia-smi, whole device, minus what
#                 was in use before it), the same measure for both
#
# usage: scripts/gpu-check.sh SURGEON_BINARY [--cpu]
#   --cpu (or GPU_CHECK_CPU=1): tiny shapes on the CPU backend and torch on CPU, with peak RSS as
#   the memory: checks the script's flow on a machine without a GPU (numbers mean nothing there).
# Env: PYTHON (default python3), GPU_CHECK_BUDGET seconds (default 460), GPU_CHECK_KEEP=1 keeps
#      the work folder, GPU_CHECK_DEVICE (CUDA device index, default 0).
set -uo pipefail

BIN=${1:?usage: scripts/gpu-check.sh SURGEON_BINARY [--cpu]}
CPU=${GPU_CHECK_CPU:-0}
[ "${2:-}" = "--cpu" ] && CPU=1
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPER="$HERE/gpu_check.py"
BUDGET=${GPU_CHECK_BUDGET:-460}
GPU=${GPU_CHECK_DEVICE:-0}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
RESULTS="$WORK/results.jsonl"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
[ -x "$BIN" ] || { echo "error: $BIN is not an executable surgeon binary" >&2; exit 2; }

if [ "$CPU" = 1 ]; then
    BACKEND=cpu; DEVICE=cpu
    # shape preset layers | eval window batch tokens | heal seq batch steps
    SHAPES=("tiny tiny 2 32 2 256 32 2 3" "tiny4 hetero 4 32 2 256 32 2 3")
else
    # surgeon and torch both see the chosen GPU as device 0.
    BACKEND=cuda; DEVICE=cuda
    export CUDA_VISIBLE_DEVICES=$GPU
    SHAPES=("smollm2-135m smollm2-135m 30 1024 4 16384 1024 8 8"
        "llama-1b llama-1b 22 2048 2 16384 2048 2 6")
    # cubecl loads NVRTC at run time: use the one that came with torch when the system has none.
    NV=$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/*.so*")})))
except Exception:
    pass
PY
)
    [ -n "$NV" ] && export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

left() { echo $((BUDGET - (SECONDS - START))); }
# Each shape gets an equal share of what is left when it starts (SHAPE_END, in $SECONDS).
SHAPE_END=$BUDGET
# limit CAP: seconds a command may take, at most CAP and what is left of the shape's share (minus
# 10 s for the table).
limit() {
    local l=$((SHAPE_END - SECONDS - 10)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"
}
record() { # shape key value-json
    echo "{\"shape\": \"$1\", \"$2\": $3}" >>"$RESULTS"
}
record_error() { # shape what message
    local msg
    msg=$(printf '%s' "$3" | tail -c 300 | tr '\n"\\' "  /")
    echo "{\"shape\": \"$1\", \"$2_error\": \"$msg\"}" >>"$RESULTS"
}
json_field() { # json key
    "$PYTHON" -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("null" if v is None else v)' "$1" "$2"
}

# Peak memory of a command, in GiB: nvidia-smi polled on the GPU (device total minus the use before
# it), peak RSS on the CPU. run_measured OUTFILE MEMFILE TIMEOUT cmd...
run_measured() {
    local out=$1 mem=$2 t=$3; shift 3
    if [ "$CPU" = 1 ]; then
        timeout "$t" /usr/bin/time -f "%M" -o "$mem.rss" "$@" >"$out" 2>&1
        local rc=$?
        [ -s "$mem.rss" ] && awk '{v=$1} END {printf "%.3f\n", v / 1048576}' "$mem.rss" >"$mem"
        return $rc
    fi
    local q="nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i $GPU"
    local base; base=$($q 2>/dev/null | head -1)
    ( peak=0; while :; do v=$($q 2>/dev/null | head -1); [ "${v:-0}" -gt "$peak" ] && peak=$v
        echo "$peak" >"$mem.peak"; sleep 0.2; done ) &
    local poller=$!
    timeout "$t" "$@" >"$out" 2>&1
    local rc=$?
    kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null
    [ -s "$mem.peak" ] && awk -v b="${base:-0}" '{printf "%.3f\n", ($1 - b) / 1024}' "$mem.peak" >"$mem"
    return $rc
}

check_shape() { # name preset layers ewin ebatch etokens hseq hbatch hsteps
    local name=$1 preset=$2 layers=$3 ewin=$4 ebatch=$5 etok=$6 hseq=$7 hbatch=$8 hsteps=$9
    local d="$WORK/$name" out
    mkdir -p "$d"
    echo "== $name ($(left) s left)" >&2
    for m in student teacher; do
        local seed=1; [ $m = teacher ] && seed=2
        if ! out=$(timeout "$(limit 120)" "$BIN" synth --preset "$preset" --layers "$layers" \
            --dtype f32 --seed $seed --out "$d/$m" 2>&1); then
            record_error "$name" synth "$out"; return
        fi
    done
    local ntok=$((hsteps * hbatch * (hseq + 1) + etok + 2 * (hseq + 1) + 16))
    "$PYTHON" "$HELPER" prepare "$d/student" "$d/train.txt" --tokens "$ntok" --seed 1 &&
        "$PYTHON" "$HELPER" prepare "$d/teacher" "$d/unused.txt" --tokens 1 &&
        "$PYTHON" "$HELPER" prepare "$d/student" "$d/heldout.txt" --tokens $((2 * (hseq + 1) + 8)) --seed 2 ||
        { record_error "$name" prepare "could not write tokenizer and text"; return; }

    # 1. logits and eval speed.
    if out=$(timeout "$(limit 100)" "$BIN" eval "$d/student" --data "$d/train.txt" --backend $BACKEND \
        --window "$ewin" --batch-size "$ebatch" --max-tokens "$etok" --json \
        --logits-out "$d/logits.f32" 2>"$d/eval.err"); then
        record "$name" surgeon_eval_tps "$(json_field "$out" tokens_per_s)"
    else
        record_error "$name" surgeon_eval "$(cat "$d/eval.err")"
    fi
    if [ -s "$d/logits.f32" ]; then
        if out=$(timeout "$(limit 90)" "$PYTHON" "$HELPER" logits "$d/student" "$d/train.txt" \
            "$d/logits.f32" --window "$ewin" --device $DEVICE 2>&1); then
            record "$name" max_abs_diff "$(json_field "$(echo "$out" | tail -1)" max_abs_diff)"
        else
            record_error "$name" logits "$out"
        fi
    fi
    if out=$(timeout "$(limit 90)" "$PYTHON" "$HELPER" eval "$d/student" "$d/train.txt" \
        --window "$ewin" --batch-size "$ebatch" --max-tokens "$etok" --device $DEVICE 2>&1); then
        record "$name" torch_eval_tps "$(json_field "$(echo "$out" | tail -1)" tokens_per_s)"
    else
        record_error "$name" torch_eval "$out"
    fi

    # 2. KD healing, bf16 mixed precision, and its peak memory.
    if run_measured "$d/heal.log" "$d/heal.mem" "$(limit 150)" "$BIN" heal "$d/student" \
        --teacher "$d/teacher" --loss kd --data "$d/train.txt" --eval-data "$d/heldout.txt" \
        --out "$d/healed" --steps "$hsteps" --seq-len "$hseq" --batch "$hbatch" --lr 1e-5 \
        --precision bf16 --backend $BACKEND; then
        local tps
        tps=$(grep -o 'at [0-9.]* tokens/s' "$d/heal.log" | tail -1 | tr -dc '0-9.')
        record "$name" surgeon_heal_tps "${tps:-null}"
        [ -s "$d/heal.mem" ] && record "$name" surgeon_heal_mem_gib "$(cat "$d/heal.mem")"
    else
        record_error "$name" surgeon_heal "$(tail -3 "$d/heal.log")"
    fi
    if run_measured "$d/torch-heal.log" "$d/torch-heal.mem" "$(limit 120)" "$PYTHON" "$HELPER" \
        heal "$d/student" "$d/teacher" "$d/train.txt" --seq-len "$hseq" --batch "$hbatch" \
        --steps "$hsteps" --device $DEVICE; then
        record "$name" torch_heal_tps "$(json_field "$(tail -1 "$d/torch-heal.log")" tokens_per_s)"
        [ -s "$d/torch-heal.mem" ] && record "$name" torch_heal_mem_gib "$(cat "$d/torch-heal.mem")"
    else
        record_error "$name" torch_heal "$(tail -3 "$d/torch-heal.log")"
    fi
    rm -rf "$d/student" "$d/teacher" "$d/healed"
}

echo "surgeon $("$BIN" --version 2>/dev/null) ($(($(stat -c %s "$BIN") / 1048576)) MiB) on $BACKEND; $("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')" >&2
[ "$CPU" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader -i "$GPU" >&2
n_left=${#SHAPES[@]}
for s in "${SHAPES[@]}"; do
    SHAPE_END=$((SECONDS + $(left) / n_left)); n_left=$((n_left - 1))
    if [ "$(left)" -lt 60 ]; then
        # shellcheck disable=SC2086
        set -- $s; record_error "$1" budget "skipped: the time budget is spent"; continue
    fi
    # shellcheck disable=SC2086
    check_shape $s
done
echo
echo "gpu-check $(date -u +%Y-%m-%d) backend=$BACKEND, $((SECONDS - START)) s"
"$PYTHON" "$HELPER" table "$RESULTS"
