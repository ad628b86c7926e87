#!/usr/bin/env python3
"""Perplexity of a GGUF file in llama.cpp (through the PyPI binding llama-cpp-python), with the same
windows as `surgeon eval` (consecutive, non-overlapping windows of WINDOW + 1 tokens over the first
MAX_TOKENS tokens; in each, token t+1 is predicted from tokens 0..t). Prints one JSON line with
tokens, nll, ppl and the token ids' sha256 (to check that both tokenised the text the same way).

Usage: python scripts/goldens/gguf_llamacpp_ppl.py FILE.gguf TEXT [WINDOW] [MAX_TOKENS]
Needs: pip install llama-cpp-python numpy (it compiles llama.cpp; see scripts/gguf-llamacpp-check.sh).
"""
import hashlib, json, math, sys

import numpy as np
from llama_cpp import Llama


def main():
    path, text = sys.argv[1], open(sys.argv[2], encoding="utf-8").read()
    window = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
    llm = Llama(model_path=path, n_ctx=window + 1, n_batch=window + 1, logits_all=True, verbose=False,
                n_threads=2)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
    total, count = 0.0, 0
    for s in range(0, len(ids), window + 1):
        w = ids[s:s + window + 1]
        if len(w) < 2:
            continue
        llm.reset()
        llm.eval(w[:-1])
        logits = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        total -= float(sum(logp[i, w[i + 1]] for i in range(len(w) - 1)))
        count += len(w) - 1
    sha = hashlib.sha256(np.array(ids, dtype=np.uint32).tobytes()).hexdigest()
    print(json.dumps({"tokens": count, "nll": total / count, "ppl": math.exp(total / count), "ids_sha256": sha}))


if __name__ == "__main__":
    main()
