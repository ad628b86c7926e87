#!/usr/bin/env python3
"""Golden logits of small random DeepSeek-V3 models (dense, multi-head latent attention), computed by
transformers' DeepseekV3ForCausalLM, for tests/mla.rs.

Usage: python scripts/goldens/mla_goldens.py --surgeon target/debug/surgeon [--out tests/fixtures/mla]

For each case it builds a DeepseekV3ForCausalLM from a config (every layer dense:
first_k_dense_replace = num_hidden_layers), draws every weight from a seeded normal (norm weights
around 1) so that logits are far from uniform, saves it with save_pretrained (float32 safetensors)
into CASE/ and writes
- `CASE_logits.bin`: little-endian f32 logits [len(TOKENS), vocab] of one forward over TOKENS,
- `CASE.json`: the tokens and the greedy continuation of TOKENS[:PROMPT] by `generate` with its cache
  (checked here against a greedy loop of full forwards without a cache).

Then the export check: `surgeon synth` (tiny Llama, float32) plus a byte-level tokenizer written
here (tokenizer.json, 256 byte tokens, no merges), converted by `surgeon convert-attention --to mla`
with CONVERT_FLAGS on CALIB_TEXT; the converted directory is kept as `converted/` (with
`calib.txt`), loaded by transformers' DeepseekV3ForCausalLM, and its logits over TOKENS written to
`converted_logits.bin` (`converted.json` holds the flags).
"""
import argparse, json, pathlib, shutil, subprocess, tempfile

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=12,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=6,
    first_k_dense_replace=2,
    rope_interleave=True,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
CASES = {
    # q_proj, rope base 10000.
    "full_q": dict(q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # q_a_proj -> q_a_layernorm -> q_b_proj, another rope base.
    "lora_q": dict(q_lora_rank=10, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}
TOKENS = [1, 17, 90, 3, 45, 60, 28, 7, 50, 64, 12, 33, 5, 80, 91, 2]
PROMPT = 5
NEW_TOKENS = 10


def greedy_without_cache(model, prompt, n):
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


CONVERT_FLAGS = ["--kv-rank", "40", "--rope-dim", "8", "--q-rank", "48", "--rope-select", "2norm"]
# Every printable ASCII byte (95 tokens, more than the hidden size 64): layer 0's inputs depend on the
# token alone, so with fewer distinct tokens than the ranks asked for (the first version had 30) the
# fitted bases reach into the covariance's null space, which rounding decides: a CPU with other GEMM
# kernels (AVX2 instead of AVX-512) converted another model, 0.17 away in logits.
CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "Pack my box with five dozen liquor jugs. " * 4
              + "".join(chr(c) for c in range(32, 127)) * 4)


def byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def converted(surgeon, out):
    target = out / "converted"
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "base"
        subprocess.run([surgeon, "synth", "--preset", "tiny", "--out", str(base)], check=True)
        byte_tokenizer(base / "tokenizer.json")
        calib = out / "calib.txt"
        calib.write_text(CALIB_TEXT)
        if target.exists():
            shutil.rmtree(target)
        cmd = [surgeon, "convert-attention", str(base), "--to", "mla", *CONVERT_FLAGS,
               "--calib", str(calib), "--out", str(target)]
        subprocess.run(cmd, check=True)
    model = DeepseekV3ForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS]), use_cache=False).logits[0]
    logits.numpy().astype("<f4").tofile(out / "converted_logits.bin")
    meta = {"case": "converted", "flags": CONVERT_FLAGS, "tokens": TOKENS, "class": type(model).__name__}
    (out / "converted.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"converted: {type(model).__name__}, logits std {logits.std():.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--surgeon", required=True, help="path of the surgeon binary")
    ap.add_argument("--out", default="tests/fixtures/mla")
    a = ap.parse_args()
    torch.set_num_threads(2)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    converted(a.surgeon, out)
    for seed, (case, extra) in enumerate(CASES.items()):
        config = DeepseekV3Config(**BASE, **extra)
        model = DeepseekV3ForCausalLM(config).eval().to(torch.float32)
        randomise(model, seed)
        model.save_pretrained(out / case, safe_serialization=True)
        with torch.no_grad():
            logits = model(torch.tensor([TOKENS]), use_cache=False).logits[0]
            cached = model.generate(
                torch.tensor([TOKENS[:PROMPT]]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                eos_token_id=None, pad_token_id=0,
            )[0, PROMPT:].tolist()
            uncached = greedy_without_cache(model, TOKENS[:PROMPT], NEW_TOKENS)
        assert cached == uncached, f"{case}: generate with cache {cached} != without {uncached}"
        logits.numpy().astype("<f4").tofile(out / f"{case}_logits.bin")
        meta = {"case": case, "tokens": TOKENS, "vocab_size": int(logits.shape[-1]),
                "prompt": TOKENS[:PROMPT], "greedy": cached}
        (out / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{case}: logits std {logits.std():.3f}, greedy {cached}")


if __name__ == "__main__":
    main()
