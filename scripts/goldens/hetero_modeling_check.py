#!/usr/bin/env python3
"""Development check: formats/python/modeling_surgeon.py computes what transformers' own classes compute.

Usage: python scripts/goldens/hetero_modeling_check.py

Random Llama (llama3 rope; tied and untied embeddings), Mixtral and Mistral (sliding window) models
are saved by transformers, re-labelled in the surgeon dialect (`model_type: "surgeon"`, per-layer
`surgeon.layers`, the repository's modeling files), loaded with trust_remote_code, and compared:
logits (max |diff|, printed; float32 noise only) and greedy `generate` with the KV cache (must be equal).
"""
import json, pathlib, shutil, tempfile, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
PY = pathlib.Path(__file__).resolve().parents[2] / "formats" / "python"
TMP = pathlib.Path(tempfile.mkdtemp())
torch.manual_seed(0)
h, H, kv, d, I, V, L = 64, 4, 2, 16, 128, 256, 3

def llama_dir(path, tie=False):
    cfg = LlamaConfig(hidden_size=h, num_attention_heads=H, num_key_value_heads=kv, head_dim=d, intermediate_size=I,
                      vocab_size=V, num_hidden_layers=L, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.save_pretrained(path)
    return m

def surgeon_dir(src, dst, layers, tie=False):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    c = json.loads((src / "config.json").read_text())
    out = {"architectures": ["SurgeonForCausalLM"], "model_type": "surgeon",
           "auto_map": {"AutoConfig": "configuration_surgeon.SurgeonConfig", "AutoModelForCausalLM": "modeling_surgeon.SurgeonForCausalLM"},
           "hidden_size": h, "num_hidden_layers": L, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "rope_scaling": c.get("rope_scaling") or c["rope_parameters"], "rope_parameters": c.get("rope_parameters"),
           "max_position_embeddings": 2048, "tie_word_embeddings": tie, "sliding_window": None,
           "torch_dtype": "float32", "surgeon": {"family": "llama", "layers": layers}}
    (dst / "config.json").write_text(json.dumps(out))
    for f in ["configuration_surgeon.py", "modeling_surgeon.py"]:
        shutil.copy(PY / f, dst / f)

std = [{"attention": {"kind": "softmax", "num_heads": H, "num_kv_heads": kv, "head_dim": d, "v_head_dim": d, "qkv_bias": False},
        "mlp": {"kind": "dense", "intermediate_size": I}}] * L
ids = torch.tensor([[1, 17, 200, 3, 45, 99, 128, 7, 250, 64]])
for tie in [False, True]:
    root = TMP / f"t{int(tie)}"
    ref = llama_dir(root / "llama", tie)
    surgeon_dir(root / "llama", root / "surgeon", std, tie)
    m = AutoModelForCausalLM.from_pretrained(root / "surgeon", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ref(ids).logits; b = m(ids).logits
    print(type(m).__name__, "tie", tie, "max diff vs LlamaForCausalLM", (a - b).abs().max().item())
    g1 = ref.generate(ids[:, :4], max_new_tokens=10, do_sample=False)
    g2 = m.generate(ids[:, :4], max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2), f"tie {tie}"
    print("generate equal")

# Mixtral (MoE) and Mistral (sliding window) through the surgeon dialect.
from transformers import MixtralConfig, MixtralForCausalLM, MistralConfig, MistralForCausalLM
def via_surgeon(ref, layers, name, sliding=None):
    root = TMP / name
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.save_pretrained(root / "ref")
    surgeon_dir(root / "ref", root / "surgeon", layers)
    c = json.loads((root / "surgeon/config.json").read_text()); c["rope_scaling"] = None; c["rope_parameters"] = None; c["sliding_window"] = sliding
    (root / "surgeon/config.json").write_text(json.dumps(c))
    m = AutoModelForCausalLM.from_pretrained(root / "surgeon", trust_remote_code=True, dtype=torch.float32).eval()
    long = torch.randint(0, V, (1, 40))
    with torch.no_grad():
        print(name, "max diff", (ref(long).logits - m(long).logits).abs().max().item())
    g1 = ref.generate(long[:, :6], max_new_tokens=20, do_sample=False)
    g2 = m.generate(long[:, :6], max_new_tokens=20, do_sample=False)
    assert torch.equal(g1, g2), name
    print(name, "generate equal")
moe = [{"attention": std[0]["attention"], "mlp": {"kind": "moe", "num_experts": 4, "top_k": 2, "intermediate_size": I, "routing": {"kind": "mixtral"}}}] * L
mx = MixtralForCausalLM(MixtralConfig(hidden_size=h, num_attention_heads=H, num_key_value_heads=kv, head_dim=d, intermediate_size=I, vocab_size=V, num_hidden_layers=L, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None)).eval()
via_surgeon(mx, moe, "mixtral")
ms = MistralForCausalLM(MistralConfig(hidden_size=h, num_attention_heads=H, num_key_value_heads=kv, head_dim=d, intermediate_size=I, vocab_size=V, num_hidden_layers=L, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=8)).eval()
via_surgeon(ms, std, "mistral", sliding=8)
shutil.rmtree(TMP)
