#!/usr/bin/env python3
"""Tokenizer goldens for surgeon's GGUF tokenizer rebuild.

Encodes tests/fixtures/gguf/tokenizer_text.txt with an independent reference: transformers' own GGUF
tokenizer conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), without special tokens added
by the post-processor (`add_special_tokens=False`, SmolLM2 adds none anyway), and writes
tests/fixtures/gguf/tokenizer_ids.json.

Run with a Python that has transformers (e.g. $SURGEON_PYTHON, see scripts/env.sh):
  python scripts/goldens/tokenizer_goldens.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import sys

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "gguf")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("SURGEON_CACHE", os.path.expanduser("~/.cache/surgeon")), "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with open(os.path.join(FIX, "tokenizer_text.txt"), encoding="utf-8") as fh:
        text = fh.read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids_special = tok(text)["input_ids"]
    assert tok.decode(ids) == text, "reference tokenizer does not round-trip the text"
    out = {
        "reference": f"transformers {transformers.__version__} AutoTokenizer (GGUF conversion), {type(tok).__name__}",
        "text_file": "tokenizer_text.txt",
        "ids": ids,
        "ids_with_special_tokens": ids_special,
    }
    with open(os.path.join(FIX, "tokenizer_ids.json"), "w") as fh:
        json.dump(out, fh)
        fh.write("\n")
    print(len(ids), "tokens;", type(tok).__name__)


if __name__ == "__main__":
    main()
