#!/usr/bin/env python3
"""Golden logits of surgeon's heterogeneous synthetic checkpoints, computed by transformers running the
modeling code each checkpoint ships (`trust_remote_code=True`), for the runtime tests.

Usage: python scripts/goldens/hetero_goldens.py --surgeon target/debug/surgeon [--out tests/fixtures/hetero]

For every variant of `surgeon synth --preset hetero --variant V` (float32) it
- loads the checkpoint with AutoModelForCausalLM (transformers' own class when the export is native,
  modeling_decilm.py for nemotron-nas, modeling_surgeon.py for the surgeon dialect),
- writes `V_logits.bin`: little-endian f32 logits [len(TOKENS), vocab] of one forward over TOKENS,
- writes `V.json`: the variant, the config's model_type and architecture, the tokens, and the greedy
  continuation of TOKENS[:PROMPT] by `generate` with its KV cache (checked here against a greedy
  loop of full forwards without a cache).
"""
import argparse, json, pathlib, subprocess, tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM

VARIANTS = ["uniform", "mlp-widths", "odd-mlp-widths", "kv-groups", "no-op-attention", "no-op-mlp", "v-head-dim", "mixed"]
TOKENS = [1, 17, 200, 3, 45, 99, 128, 7, 250, 64, 12, 33, 5, 180, 90, 2]
PROMPT = 5
NEW_TOKENS = 12


def greedy_without_cache(model, prompt, n):
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--surgeon", required=True, help="path of the surgeon binary")
    ap.add_argument("--out", default="tests/fixtures/hetero")
    a = ap.parse_args()
    torch.set_num_threads(2)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            d = pathlib.Path(tmp) / variant
            subprocess.run(
                [a.surgeon, "synth", "--preset", "hetero", "--variant", variant, "--out", str(d)], check=True
            )
            config = json.loads((d / "config.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(torch.tensor([TOKENS]), use_cache=False).logits[0]
                cached = model.generate(
                    torch.tensor([TOKENS[:PROMPT]]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True
                )[0, PROMPT:].tolist()
                uncached = greedy_without_cache(model, TOKENS[:PROMPT], NEW_TOKENS)
            assert cached == uncached, f"{variant}: generate with cache {cached} != without {uncached}"
            logits.numpy().astype("<f4").tofile(out / f"{variant}_logits.bin")
            meta = {
                "variant": variant,
                "model_type": config["model_type"],
                "architecture": config["architectures"][0],
                "class": type(model).__name__,
                "tokens": TOKENS,
                "vocab_size": int(logits.shape[-1]),
                "prompt": TOKENS[:PROMPT],
                "greedy": cached,
            }
            (out / f"{variant}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(f"{variant}: {config['model_type']} via {type(model).__name__}, greedy {cached}")


if __name__ == "__main__":
    main()
