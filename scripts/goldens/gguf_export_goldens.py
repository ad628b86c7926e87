#!/usr/bin/env python3
"""Goldens for `surgeon export-gguf`, read back with the PyPI `gguf` package (llama.cpp's own reader).

1. Writes the tiny test tokenizer (byte-level BPE: 248 byte tokens, 6 merges, 2 special tokens; 256
   ids, the synthetic model's vocabulary) as tests/fixtures/gguf/tiny_tokenizer.json and
   tiny_tokenizer_config.json (with a chat template).
2. Makes the synthetic model (`surgeon synth --preset tiny --dtype D`) with that tokenizer and exports it
   with every `--type`; reads each file with `gguf.GGUFReader`, dequantises every tensor with
   `gguf.quants.dequantize` and records per file: the sha256 of the file, the metadata that llama.cpp
   needs, and per tensor its type, shape (numpy order), and sum, sum of squares and first values of the
   dequantised data -> tests/fixtures/gguf/export_tiny.json.

tests/export_gguf.rs exports the same model and checks the file hash and its own reading against this.
Usage: python scripts/goldens/gguf_export_goldens.py [SURGEON_BINARY]   (needs: pip install gguf numpy)
"""
import hashlib, json, pathlib, shutil, subprocess, sys, tempfile

import numpy as np
import gguf

FX = pathlib.Path("tests/fixtures/gguf")
TYPES = [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("q8_0", "f32"), ("q4_0", "f32"), ("q4_1", "f32")]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer():
    chars = bytes_to_unicode()[:248]
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["i", "n"], ["e", "r"], ["a", "n"]]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>"]
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    cfg = {"add_bos_token": False, "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>",
           "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}",
           "tokenizer_class": "GPT2Tokenizer"}
    return tok, cfg


def scalar(field):
    v = field.contents()
    return v if not isinstance(v, list) or len(v) < 8 else f"<{len(v)} items>"


def read(path):
    r = gguf.GGUFReader(path)
    keep = ["general.architecture", "general.file_type", "llama.block_count", "llama.embedding_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
            "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]
    meta = {k: scalar(r.fields[k]) for k in keep if k in r.fields}
    meta["tokenizer.ggml.tokens.len"] = len(r.fields["tokenizer.ggml.tokens"].contents())
    meta["tokenizer.ggml.merges"] = r.fields["tokenizer.ggml.merges"].contents()
    tensors = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors[t.name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape)],
            "sum": float(x.sum()),
            "sumsq": float((x * x).sum()),
            "first": [float(v) for v in x[:4]],
        }
    return meta, tensors


def main():
    surgeon = sys.argv[1] if len(sys.argv) > 1 else "target/release/surgeon"
    tok, cfg = tokenizer()
    FX.mkdir(parents=True, exist_ok=True)
    (FX / "tiny_tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n")
    (FX / "tiny_tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    out = {"gguf_py": gguf.__name__ + " " + __import__("importlib.metadata").metadata.version("gguf"), "files": {}}
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        for ty, dtype in TYPES:
            m = d / f"tiny-{dtype}"
            if not m.exists():
                subprocess.run([surgeon, "synth", "--preset", "tiny", "--dtype", dtype, "--out", str(m)], check=True)
                shutil.copy(FX / "tiny_tokenizer.json", m / "tokenizer.json")
                shutil.copy(FX / "tiny_tokenizer_config.json", m / "tokenizer_config.json")
            f = d / f"tiny.{ty}.gguf"
            subprocess.run([surgeon, "export-gguf", str(m), "--type", ty, "--name", "tiny", "--out", str(f)], check=True)
            meta, tensors = read(str(f))
            out["files"][ty] = {"source_dtype": dtype, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                "metadata": meta, "tensors": tensors}
    (FX / "export_tiny.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {FX / 'export_tiny.json'}: {len(out['files'])} files")


if __name__ == "__main__":
    main()
