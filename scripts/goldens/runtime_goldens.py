#!/usr/bin/env python3
"""Golden logits of SmolLM2-135M-Instruct (transformers, float32) for the runtime tests.

Usage: python scripts/goldens/runtime_goldens.py [--gguf PATH (default: $SURGEON_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf)]
         [--out tests/fixtures/runtime]

transformers dequantises the GGUF to float32 (the same weights surgeon's GGUF importer produces).
For each prompt it writes `<name>.json` (text, token ids, which positions/columns were kept) and
little-endian f32 files: `<name>_full.bin` ([len(full_positions), vocab] full logit rows) and
`<name>_cols.bin` ([tokens, len(columns)], a fixed subset of vocabulary columns at every position).
It also records the greedy chat answer to "What is the capital of France?".
"""
import argparse, json, os, pathlib

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def topics_text():
    import pydoc_data.topics as t
    return pathlib.Path(t.__file__).read_text(encoding="utf-8")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join(
        os.environ.get("SURGEON_CACHE") or os.path.expanduser("~/.cache/surgeon"),
        "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default="tests/fixtures/runtime")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    columns = list(range(0, vocab, vocab // 64))[:64]
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    # 512 tokens of Python's own documentation (present on every machine).
    long_ids = tok(topics_text(), add_special_tokens=False)["input_ids"][1000:1512]
    prompts = {
        "short": tok("The capital of France is", add_special_tokens=False)["input_ids"],
        "chat": tok(chat, add_special_tokens=False)["input_ids"],
        "long": long_ids,
    }
    texts = {"short": "The capital of France is", "chat": chat, "long": tok.decode(long_ids)}
    for name, ids in prompts.items():
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        t = len(ids)
        # Full rows: three positions of the long prompt, the last of the others (keeps fixtures < 2 MB).
        full_positions = sorted({0, t // 2, t - 1}) if name == "long" else [t - 1]
        meta = {
            "name": name, "text": texts[name], "ids": ids, "vocab_size": vocab,
            "full_positions": full_positions, "columns": columns,
            "full_file": f"{name}_full.bin", "cols_file": f"{name}_cols.bin",
            "transformers_argmax": [int(x) for x in logits.argmax(-1)],
        }
        if name == "chat":
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
            meta["greedy_new_ids"] = gen[0, t:].tolist()
            meta["greedy_text"] = tok.decode(gen[0, t:], skip_special_tokens=True)
            print("greedy:", meta["greedy_text"])
        logits[full_positions].astype("<f4").tofile(out / meta["full_file"])
        logits[:, columns].astype("<f4").tofile(out / meta["cols_file"])
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(name, t, "tokens")


if __name__ == "__main__":
    main()
