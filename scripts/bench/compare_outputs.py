"""Checks that two model directories hold the same tensors, bitwise: compare_outputs.py DIR_A DIR_B"""
import glob
import sys

import torch
from safetensors import safe_open


def index(d):
    out = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = f
    return out


a, b = (index(d) for d in sys.argv[1:3])
if set(a) != set(b):
    sys.exit(f"tensor names differ: only in A {sorted(set(a) - set(b))[:5]}, only in B {sorted(set(b) - set(a))[:5]}")
for k in sorted(a):
    with safe_open(a[k], "pt") as fa, safe_open(b[k], "pt") as fb:
        ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape
        # Bitwise: compare the raw bits as integers of the same width.
        bits = {2: torch.int16, 4: torch.int32}[ta.element_size()]
        if not same or not ta.view(bits).equal(tb.view(bits)):
            sys.exit(f"tensor {k} differs")
print(f"outputs agree: {len(a)} tensors bitwise equal")
