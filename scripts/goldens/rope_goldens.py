#!/usr/bin/env python3
"""Q/K un-permutation golden: loads SmolLM2 GGUF with transformers' GGUF loader (which dequantises with gguf-py
and undoes llama.cpp's RoPE row permutation) and records, for q_proj/k_proj of layers 0 and 29, the HF shape,
sha256 of the little-endian f32 data and the first 16 values; writes tests/fixtures/gguf/smollm2_rope.json.

Run with a Python that has torch + transformers (e.g. $SURGEON_PYTHON, see scripts/env.sh).
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "gguf")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("SURGEON_CACHE", os.path.expanduser("~/.cache/surgeon")), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32)
    sd = model.state_dict()
    out = []
    for layer in (0, 29):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            a = sd[name].detach().cpu().numpy().astype("<f4")
            out.append({"name": name, "shape": list(a.shape),
                        "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
                        "first": [float(x) for x in a.reshape(-1)[:16]]})
    with open(os.path.join(FIX, "smollm2_rope.json"), "w") as fh:
        json.dump({"reference": f"transformers {transformers.__version__} GGUF loader", "tensors": out}, fh, indent=1)
        fh.write("\n")
    print(out[0]["name"], out[0]["shape"], out[0]["sha256"])


if __name__ == "__main__":
    main()
