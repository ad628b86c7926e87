"""Development-time check: surgeon's outputs load in Hugging Face transformers without custom code.

Usage: venv-with-transformers/bin/python scripts/goldens/hf_load_check.py ORIGINAL EXPANDED UPSCALED
ORIGINAL, EXPANDED, UPSCALED are HF directories written by `surgeon import-gguf`, `surgeon expand`
and `surgeon upscale` (f32). Prints the classes and the max logit difference expanded vs original
(LLaMA Pro blocks are identities, so it must be 0).
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

orig_dir, exp_dir, up_dir = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(orig_dir)
ids = tok("The quick brown fox jumps over the lazy dog. def f(x): return 3.14 * x", return_tensors="pt").input_ids
out = {}
for name, d in [("original", orig_dir), ("expanded", exp_dir), ("upscaled", up_dir)]:
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    with torch.no_grad():
        out[name] = m(ids).logits
    print(f"{name}: {type(m).__name__}, {m.config.num_hidden_layers} layers, {sum(p.numel() for p in m.parameters()):,} parameters")
print("max |logit diff| expanded vs original:", (out["expanded"] - out["original"]).abs().max().item())
print("max |logit diff| upscaled vs original:", (out["upscaled"] - out["original"]).abs().max().item())
