#!/usr/bin/env python3
"""Golden logits of Hedgehog-converted synthetic checkpoints, computed by transformers running the
modeling code the export ships (modeling_surgeon.py, `trust_remote_code=True`), for tests/hedgehog.rs.

Usage: python scripts/goldens/hedgehog_goldens.py --surgeon target/debug/surgeon [--out tests/fixtures/hedgehog]

For each case it runs `surgeon synth --preset hetero --variant uniform` (float32), then
`surgeon convert-attention ... --to hedgehog` with the case's flags, loads the result with
AutoModelForCausalLM and writes
- `CASE_logits.bin`: little-endian f32 logits [len(TOKENS), vocab] of one forward over TOKENS,
- `CASE.json`: the flags, model_type, the tokens, and the greedy continuation of TOKENS[:PROMPT] by
  `generate` with its cache (checked here against a greedy loop of full forwards without a cache).
"""
import argparse, json, pathlib, subprocess, tempfile

import torch
from transformers import AutoModelForCausalLM

CASES = {
    # LoLCATs hybrid in two of four layers: window 4 < 16 tokens, so both terms count.
    "hybrid": ["--feature-dim", "8", "--window", "4", "--layers", "0,2"],
    # Pure Hedgehog linear attention everywhere.
    "linear": ["--feature-dim", "8", "--window", "0", "--layers", "all"],
}
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
    ap.add_argument("--out", default="tests/fixtures/hedgehog")
    a = ap.parse_args()
    torch.set_num_threads(2)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "base"
        subprocess.run([a.surgeon, "synth", "--preset", "hetero", "--variant", "uniform", "--out", str(base)], check=True)
        for case, flags in CASES.items():
            d = pathlib.Path(tmp) / case
            cmd = [a.surgeon, "convert-attention", str(base), "--to", "hedgehog", *flags, "--out", str(d)]
            subprocess.run(cmd, check=True)
            config = json.loads((d / "config.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(torch.tensor([TOKENS]), use_cache=False).logits[0]
                cached = model.generate(
                    torch.tensor([TOKENS[:PROMPT]]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True
                )[0, PROMPT:].tolist()
                uncached = greedy_without_cache(model, TOKENS[:PROMPT], NEW_TOKENS)
            assert cached == uncached, f"{case}: generate with cache {cached} != without {uncached}"
            logits.numpy().astype("<f4").tofile(out / f"{case}_logits.bin")
            meta = {
                "case": case,
                "flags": flags,
                "model_type": config["model_type"],
                "class": type(model).__name__,
                "tokens": TOKENS,
                "vocab_size": int(logits.shape[-1]),
                "prompt": TOKENS[:PROMPT],
                "greedy": cached,
            }
            (out / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(f"{case}: {config['model_type']} via {type(model).__name__}, greedy {cached}")


if __name__ == "__main__":
    main()
