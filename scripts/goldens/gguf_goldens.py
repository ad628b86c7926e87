#!/usr/bin/env python3
"""Dequantisation goldens for surgeon's GGUF reader, computed with gguf-py (`gguf.quants.dequantize`).

Writes two fixtures into tests/fixtures/gguf/:
  smollm2_dequant.json  -- for every tensor of SmolLM2-135M-Instruct.Q4_1.gguf: name, ggml type, GGUF dims
                           (ne0 first), sha256 of the little-endian f32 dequantised data, first 16 values.
  synthetic_quants.json -- for every supported ggml type: random raw block bytes (with small, finite f16/f32
                           scale fields) in hex, element count, sha256 of the dequantised f32 data, first 16 values.

Usage: python3 scripts/goldens/gguf_goldens.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import hashlib
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def first(a, n=16):
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)[:n]]


def smollm2(path):
    r = GGUFReader(path)
    out = []
    for t in r.tensors:
        raw = np.asarray(t.data)
        if t.tensor_type in (T.F32, T.F16, T.BF16):
            raw = raw.view(np.uint8)
        f = dequantize(raw.reshape(-1) if t.tensor_type not in (T.F32, T.F16) else raw.reshape(-1), t.tensor_type)
        f = np.asarray(f, dtype=np.float32).reshape(-1)
        assert f.size == int(np.prod(t.shape)), t.name
        out.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "sha256": sha(f),
            "first": first(f),
        })
    return {"source": os.path.basename(path), "gguf_py_version": "0.19.0", "tensors": out}


# (byte offset, kind) of the scale fields of each block type, where kind is "f16" or "f32".
SCALES = {
    T.Q4_0: [(0, "f16")],
    T.Q4_1: [(0, "f16"), (2, "f16")],
    T.Q5_0: [(0, "f16")],
    T.Q5_1: [(0, "f16"), (2, "f16")],
    T.Q8_0: [(0, "f16")],
    T.Q2_K: [(80, "f16"), (82, "f16")],
    T.Q3_K: [(108, "f16")],
    T.Q4_K: [(0, "f16"), (2, "f16")],
    T.Q5_K: [(0, "f16"), (2, "f16")],
    T.Q6_K: [(208, "f16")],
}


def synthetic():
    rng = np.random.default_rng(20261126)
    out = []
    # Plain float types.
    for qt in (T.F32, T.F16, T.BF16):
        n = 96
        vals = rng.standard_normal(n).astype(np.float32) * 3.0
        if qt == T.F32:
            raw = vals.astype("<f4").tobytes()
        elif qt == T.F16:
            raw = vals.astype("<f2").tobytes()
        else:
            raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
        f = np.asarray(dequantize(np.frombuffer(raw, dtype=np.uint8), qt), dtype=np.float32).reshape(-1)
        out.append({"type": qt.name, "n_elements": n, "hex": raw.hex(), "sha256": sha(f), "first": first(f)})
    for qt, fields in SCALES.items():
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nb = 6
        raw = bytearray(rng.integers(0, 256, size=nb * size, dtype=np.uint8).tobytes())
        for b in range(nb):
            for off, kind in fields:
                v = np.float16(rng.uniform(-0.5, 0.5))
                raw[b * size + off: b * size + off + 2] = np.array([v], dtype="<f2").tobytes()
        raw = bytes(raw)
        f = np.asarray(dequantize(np.frombuffer(raw, dtype=np.uint8), qt), dtype=np.float32).reshape(-1)
        assert f.size == nb * block
        out.append({"type": qt.name, "n_elements": nb * block, "hex": raw.hex(), "sha256": sha(f), "first": first(f)})
    return {"gguf_py_version": "0.19.0", "cases": out}


def main():
    os.makedirs(OUT, exist_ok=True)
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("SURGEON_CACHE", os.path.expanduser("~/.cache/surgeon")), "SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(os.path.join(OUT, "synthetic_quants.json"), "w") as fh:
        json.dump(synthetic(), fh, indent=1)
    with open(os.path.join(OUT, "smollm2_dequant.json"), "w") as fh:
        json.dump(smollm2(path), fh, indent=1)


if __name__ == "__main__":
    main()
