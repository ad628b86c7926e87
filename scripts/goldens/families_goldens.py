#!/usr/bin/env python3
"""Small random checkpoints of the model families surgeon reads beyond Llama (Qwen3, Qwen3-MoE, Phi-3, Gemma 2,
Gemma 3), made
by transformers, with transformers' logits, for tests/families.rs.

Usage: python scripts/goldens/families_goldens.py [--out tests/fixtures/families] [--surgeon target/debug/surgeon]
                                                 [--only gemma2,gemma3]

For every entry of FAMILIES it
- builds the transformers model from a small config with seeded random weights (norm weights too,
  so that q/k norms and routing matter), saves it in float32 to `<name>/` (config.json + safetensors),
- writes `<name>_logits.bin`: little-endian f32 logits [len(TOKENS), vocab] of one forward over TOKENS,
- writes `<name>.json`: the class, the tokens and the greedy continuation of TOKENS[:PROMPT] by
  `generate` with its KV cache.
It also writes `qwen3.gguf`: the `qwen3` fixture in llama.cpp's layout for Qwen3 (float32, no tokenizer),
which must give the same logits as the fixture itself.
With `--surgeon`, it also writes goldens of models surgeon derives from the fixtures that no standard
class describes (DERIVED: the Qwen3 fixture split into experts with scaled routing, exported in the
surgeon dialect), computed by transformers running the shipped modeling code, and it runs `surgeon upscale` and `surgeon expand` on each fixture and checks that
transformers loads the outputs as the same class, with the logits of `expand` unchanged.
"""
import argparse, json, pathlib, subprocess, tempfile

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config,
                          Qwen3MoeConfig)

TOKENS = [1, 17, 100, 3, 45, 99, 120, 7, 25, 64, 12, 33, 5, 80, 90, 2]
PROMPT = 5
NEW_TOKENS = 10
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
PHI3 = {k: v for k, v in COMMON.items() if k != "head_dim"}
FAMILIES = {
    # head_dim 32 differs from hidden / heads = 16: the explicit head_dim must be honoured.
    "qwen3": Qwen3Config(intermediate_size=96, rope_theta=1e6, **COMMON),
    "qwen3-tied": Qwen3Config(intermediate_size=96, **{**COMMON, "tie_word_embeddings": True}),
    "qwen3_moe": Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, **COMMON),
    "qwen3_moe-unnormalized": Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                             num_experts_per_tok=2, norm_topk_prob=False, **COMMON),
    # Phi-3: fused qkv_proj / gate_up_proj; a sliding window shorter than TOKENS.
    "phi3": Phi3Config(intermediate_size=96, sliding_window=6, pad_token_id=0, **PHI3),
    # LongRoPE: TOKENS (16) run past original_max_position_embeddings (8), so the full forward uses
    # long_factor, and generation switches from short_factor to long_factor at position 8.
    "phi3-longrope": Phi3Config(intermediate_size=96, pad_token_id=0, original_max_position_embeddings=8,
                                rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                              "long_factor": [1.5 + 0.5 * i for i in range(8)]},
                                **{**PHI3, "max_position_embeddings": 64}),
    # Gemma 2: sliding window 6 (< len(TOKENS)) on layers 0 and 2, global layers 1 and 3; soft-capping
    # small enough to bend the scores and logits of random weights; a query scalar unlike head_dim.
    "gemma2": Gemma2Config(intermediate_size=96, sliding_window=6, query_pre_attn_scalar=24,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0,
                           **{**COMMON, "num_hidden_layers": 4, "tie_word_embeddings": True}),
    # Gemma 3: (1 + w) q/k norms, local RoPE base 1e4 on sliding layers, linear-scaled global base.
    "gemma3": Gemma3TextConfig(intermediate_size=96, sliding_window=6, query_pre_attn_scalar=24, pad_token_id=0,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               rope_parameters={
                                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                               **{**COMMON, "num_hidden_layers": 3, "tie_word_embeddings": True}),
}

# Derived models: name -> (fixture, surgeon arguments).
DERIVED = {
    "qwen3-split": ("qwen3", ["moe", "--method", "split-random", "--experts", "4", "--top-k", "2", "--seed", "0"]),
}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    # Gemma's norms multiply by 1 + w: its stored weights are centred on 0.
    centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights: around 1, not exactly 1
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def logits_of(d):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(torch.tensor([TOKENS]), use_cache=False).logits[0]


def check_surgeon_outputs(surgeon, src, name, want_class, logits):
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    add = 2 if layers % 2 == 0 else layers  # `expand --add` must divide the layers
    with tempfile.TemporaryDirectory() as tmp:
        for op, args in [("upscale", ["--slices", "0..2,1..2"]), ("expand", ["--add", str(add)])]:
            out = pathlib.Path(tmp) / op
            subprocess.run([surgeon, op, str(src), *args, "--out", str(out)], check=True, capture_output=True)
            model, got = logits_of(out)
            assert type(model).__name__ == want_class, f"{name} {op}: loaded as {type(model).__name__}"
            if op == "expand":
                diff = (got - logits).abs().max().item()
                assert diff < 1e-4, f"{name} expand changed the logits by {diff}"
            print(f"  surgeon {op}: transformers loads {type(model).__name__}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/families")
    ap.add_argument("--surgeon", help="also check surgeon's upscale/expand outputs in transformers")
    ap.add_argument("--only", help="comma-separated fixture names to (re)make, leaving the others as they are")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else set(FAMILIES) | set(DERIVED)
    torch.set_num_threads(2)
    out = pathlib.Path(a.out)
    for seed, (name, config) in enumerate(FAMILIES.items()):
        if name not in only:
            continue
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomise(model, seed)
        model.save_pretrained(out / name)
        model, logits = logits_of(out / name)
        with torch.no_grad():
            greedy = model.generate(torch.tensor([TOKENS[:PROMPT]]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    use_cache=True)[0, PROMPT:].tolist()
        logits.numpy().astype("<f4").tofile(out / f"{name}_logits.bin")
        meta = {"name": name, "class": type(model).__name__, "tokens": TOKENS, "vocab_size": int(logits.shape[-1]),
                "prompt": TOKENS[:PROMPT], "greedy": greedy}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {type(model).__name__}, greedy {greedy}")
        if a.surgeon:
            check_surgeon_outputs(a.surgeon, out / name, name, type(model).__name__, logits)
    if "qwen3" in only:
        write_qwen3_gguf(out / "qwen3", out / "qwen3.gguf")
    if a.surgeon:
        for name, (fixture, args) in DERIVED.items():
            if name in only:
                derived_golden(a.surgeon, out, name, fixture, args)


# HF tensor name (after model.layers.N.) -> llama.cpp's, for Qwen3 (its converter does not permute q/k rows).
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_qwen3_gguf(src, dst):
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(dst), "qwen3")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    for name, t in sorted(load_file(str(src / "model.safetensors")).items()):
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(gguf_name, t.astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{dst.name}: llama.cpp qwen3 layout")


def derived_golden(surgeon, out, name, fixture, args):
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp) / name
        subprocess.run([surgeon, args[0], str(out / fixture), *args[1:], "--out", str(d)], check=True,
                       capture_output=True)
        config = json.loads((d / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([TOKENS]), use_cache=False).logits[0]
        logits.numpy().astype("<f4").tofile(out / f"{name}_logits.bin")
        meta = {"name": name, "fixture": fixture, "surgeon": args, "model_type": config["model_type"],
                "class": type(model).__name__, "tokens": TOKENS}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {config['model_type']} via {type(model).__name__}")


if __name__ == "__main__":
    main()
