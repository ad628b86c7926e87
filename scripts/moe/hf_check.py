"""Checks `surgeon moe` outputs with Hugging Face transformers.

usage: python hf_check.py DENSE_DIR UPCYCLED_DIR [SPLIT_FOLDED_DIR]

- the upcycled model loads as MixtralForCausalLM and its logits equal the dense model's (float32);
- a split model exported with --fold-scale loads as MixtralForCausalLM (standard config, no custom code)
  and gives finite logits.
Prints one JSON line per check; exits 1 on failure.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)


def load(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def main():
    dense_dir, up_dir = sys.argv[1], sys.argv[2]
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253, 1528, 30, 2, 7]])
    ok = True
    dense = load(dense_dir)
    vocab = dense.config.vocab_size
    ids = ids % vocab
    with torch.no_grad():
        want = dense(ids).logits
    up = load(up_dir)
    with torch.no_grad():
        got = up(ids).logits
    diff = (want - got).abs().max().item()
    res = {"check": "upcycled", "class": type(up).__name__, "max_abs_dlogit": diff,
           "experts": up.config.num_local_experts, "top_k": up.config.num_experts_per_tok}
    print(json.dumps(res))
    ok &= type(up).__name__ == "MixtralForCausalLM" and diff < 1e-4
    if len(sys.argv) > 3:
        sp = load(sys.argv[3])
        with torch.no_grad():
            lg = sp(ids).logits
        res = {"check": "split-folded", "class": type(sp).__name__,
               "finite": bool(torch.isfinite(lg).all()),
               "top1_agreement_with_dense": (lg.argmax(-1) == want.argmax(-1)).float().mean().item()}
        print(json.dumps(res))
        ok &= res["class"] == "MixtralForCausalLM" and res["finite"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
