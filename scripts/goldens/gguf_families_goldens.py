#!/usr/bin/env python3
"""GGUF fixtures of the Gemma and Qwen3-MoE family fixtures, laid out as llama.cpp's convert_hf_to_gguf.py lays them out,
with the logits transformers gives for the model llama.cpp reads from them, for tests/gguf_families.rs.

Usage: python scripts/goldens/gguf_families_goldens.py [--fixtures tests/fixtures/families]

For `gemma2` and `gemma3` (made by families_goldens.py) it writes
- `<name>.gguf`: float32 tensors under llama.cpp's names (`post_attention_norm`, `ffn_norm` for the
  pre-feedforward norm, `post_ffw_norm`), every `*norm.weight` stored as `1 + w` as llama.cpp's
  converter does, and the metadata keys its Gemma2Model / Gemma3Model write (no tokenizer);
- `<name>_gguf_logits.bin`: little-endian f32 logits [len(tokens), vocab] of transformers over the
  fixture's tokens, with the config changed to what llama.cpp hard-codes and a GGUF cannot say:
  query_pre_attn_scalar = head_dim (27B models aside) and the layer pattern (Gemma 2: every 2nd
  layer global, Gemma 3: every 6th, so the 3-layer Gemma 3 fixture has only sliding layers).
For `qwen3_moe` it writes `qwen3_moe.gguf` (architecture `qwen3moe`): experts stacked into
`ffn_{gate,up,down}_exps` [experts, rows, cols], the router as `ffn_gate_inp`, q/k rows not permuted.
llama.cpp renormalises its top-k weights (norm_topk_prob true), as the fixture does, so the fixture's
own `qwen3_moe_logits.bin` is the golden.
For `phi3` it writes `phi3.gguf`: fused `attn_qkv` and `ffn_up` (gate rows then up rows) as stored,
with the fixture's sliding window; its golden is the fixture's own `phi3_logits.bin`.
"""
import argparse, json, pathlib

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
PATTERN = {"gemma2": 2, "gemma3": 6}


def gguf_name(name):
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(src, dst, arch):
    c = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(dst), arch)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_sliding_window(c["sliding_window"])
    w.add_vocab_size(c["vocab_size"])
    if arch == "gemma2":
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    else:
        full = c["rope_parameters"]["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        assert full["rope_type"] == "linear"
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    for name, t in sorted(load_file(str(src / "model.safetensors")).items()):
        t = t.astype("float32")
        if name.endswith("norm.weight"):
            t = (torch.from_numpy(t) + 1).numpy()  # llama.cpp's converter, in f32
        w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_qwen3moe_gguf(src, dst):
    c = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(dst), "qwen3moe")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_count(c["num_local_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    tensors = load_file(str(src / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for name, t in sorted(tensors.items()):
        if ".mlp.experts." in name:
            continue
        if name in names:
            w.add_tensor(names[name], t)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        stem = {"mlp.gate.weight": "ffn_gate_inp", "post_attention_layernorm.weight": "ffn_norm"}.get(rest)
        w.add_tensor(f"blk.{layer}.{stem or LAYER_NAMES[rest.removesuffix('.weight')]}.weight", t)
    for layer in range(c["num_hidden_layers"]):
        for hf, gg in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")]:
            stacked = np.stack([tensors[f"model.layers.{layer}.mlp.experts.{e}.{hf}.weight"]
                                for e in range(c["num_local_experts"])])
            w.add_tensor(f"blk.{layer}.{gg}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_phi3_gguf(src, dst):
    c = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(dst), "phi3")
    w.add_context_length(c["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_sliding_window(c["sliding_window"])
    w.add_vocab_size(c["vocab_size"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    stems = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up", "self_attn.o_proj": "attn_output",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in sorted(load_file(str(src / "model.safetensors")).items()):
        if name not in names:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            names[name] = f"blk.{layer}.{stems[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(names[name], t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp_logits(src, arch, tokens):
    config = AutoConfig.from_pretrained(src)
    config.query_pre_attn_scalar = config.head_dim
    n, p = config.num_hidden_layers, PATTERN[arch]
    config.layer_types = ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures/families")
    out = pathlib.Path(ap.parse_args().fixtures)
    for name in ["gemma2", "gemma3"]:
        tokens = json.loads((out / f"{name}.json").read_text())["tokens"]
        write_gguf(out / name, out / f"{name}.gguf", name)
        logits = llamacpp_logits(out / name, name, tokens)
        logits.numpy().astype("<f4").tofile(out / f"{name}_gguf_logits.bin")
        fixture = np.fromfile(out / f"{name}_logits.bin", dtype="<f4").reshape(logits.shape)
        moved = np.abs(fixture - logits.numpy()).max()
        print(f"{name}.gguf: {(out / f'{name}.gguf').stat().st_size} bytes; logits moved {moved:.3g} from the fixture's")
    write_qwen3moe_gguf(out / "qwen3_moe", out / "qwen3_moe.gguf")
    print(f"qwen3_moe.gguf: {(out / 'qwen3_moe.gguf').stat().st_size} bytes")
    write_phi3_gguf(out / "phi3", out / "phi3.gguf")
    print(f"phi3.gguf: {(out / 'phi3.gguf').stat().st_size} bytes")


if __name__ == "__main__":
    main()
