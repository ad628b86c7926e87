"""surgeon's decoder-only language model for transformers (`trust_remote_code=True`).

Written by surgeon into every checkpoint it exports with `model_type: "surgeon"` (and, through
modeling_decilm.py, nemotron-nas); kept in the surgeon repository as formats/python/modeling_surgeon.py.
It computes exactly what surgeon's Rust runtime computes: a pre-norm Llama-style decoder whose layers
each have their own shapes (`config.layer_specs()`):

- attention "softmax": `num_heads` query heads and `num_kv_heads` key/value heads (grouped-query),
  queries and keys of `head_dim` with rotate-half RoPE, values of `v_head_dim` (o_proj reads
  num_heads * v_head_dim), optional q/k/v biases, optional per-head RMSNorm of queries and keys
  before RoPE (`qk_norm`, Qwen3's `q_norm`/`k_norm`), causal mask (and `config.sliding_window`);
  "hedgehog": the same projections, attention linearised with Hedgehog feature maps
  phi(x) = [softmax(x W), softmax(-x W)] per query head (after RoPE and repeat_kv), and with
  `window` > 0 the LoLCATs hybrid: exact softmax over the last `window` keys weighted by
  sigmoid(window_factors), linear attention over older keys, each row normalised. This class
  computes the quadratic form over all cached keys (exact, not constant-memory; surgeon's runtime
  generates with the recurrent form);
  "no_op": no attention and no input norm;
- mlp "dense": SwiGLU `down(silu(gate(x)) * up(x))`; "moe": routed SwiGLU experts in Mixtral's
  layout (softmax over experts, top-k, renormalised except for routing "unnormalized", times
  `routing.scale` for scaled routing);
  "no_op": no MLP and no post-attention norm.

RoPE frequencies follow `rope_scaling` types default, linear and llama3.
"""
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_surgeon import SurgeonConfig

# transformers 5 renamed `past_key_values` to `cache`; accept and return whichever this version uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_parameters(config):
    """(rope_theta, rope_scaling dict or None), from either config.json dialect."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    return theta, scaling


def rope_inv_freq(theta, scaling, head_dim):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, spec):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.num_kv_heads = spec["num_heads"], spec["num_kv_heads"]
        self.head_dim, self.v_head_dim = spec["head_dim"], spec.get("v_head_dim", spec["head_dim"])
        bias = spec.get("qkv_bias", False)
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=False)
        if spec.get("qk_norm", False):
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # Frequencies are recomputed on every call (cheap): transformers 5 builds models on the meta
        # device and would leave a buffer uninitialised.
        self.rope_theta, self.rope_scaling = rope_parameters(config)
        self.sliding_window = getattr(config, "sliding_window", None)

    def forward(self, x, positions, cache, slot, key_mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.rope_theta, self.rope_scaling, self.head_dim).to(x.device)
        angles = positions[:, None].float() * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, slot)
        # Keys cover the last k.shape[2] positions up to the newest query.
        total = int(positions[-1]) + 1
        key_pos = torch.arange(total - k.shape[2], total, device=x.device)
        allowed = key_pos[None, :] <= positions[:, None]
        if self.sliding_window:
            allowed = allowed & (positions[:, None] - key_pos[None, :] < self.sliding_window)
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, -k.shape[2]:].bool()
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        y = self.attend(q, k, v, positions, key_pos, allowed)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.v_head_dim))

    def attend(self, q, k, v, positions, key_pos, allowed):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        return F.softmax(scores, dim=-1).to(v.dtype) @ v


class FeatureMap(nn.Module):
    """Hedgehog feature map: [softmax(x W), softmax(-x W)] per head, `weight` [heads, head_dim, f]."""

    def __init__(self, heads, head_dim, feature_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim, feature_dim))

    def forward(self, x):
        xw = torch.einsum("hdf,bhld->bhlf", self.weight.float(), x.float())
        return torch.cat([torch.softmax(xw, dim=-1), torch.softmax(-xw, dim=-1)], dim=-1).clamp(min=1e-12)


class HedgehogAttention(Attention):
    """Hedgehog linear attention, the LoLCATs sliding-window hybrid when `window` > 0."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        if self.sliding_window:
            raise ValueError("hedgehog attention in a model with sliding_window is not supported")
        self.window = spec.get("window", 0)
        self.feature_map_q = FeatureMap(self.num_heads, self.head_dim, spec["feature_dim"])
        self.feature_map_k = FeatureMap(self.num_heads, self.head_dim, spec["feature_dim"])
        if self.window:
            self.window_factors = nn.Parameter(torch.zeros(self.num_heads))

    def attend(self, q, k, v, positions, key_pos, allowed):
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        age = (positions[:, None] - key_pos[None, :])[None, None]
        a = (fq @ fk.transpose(-1, -2)) * (allowed & (age >= self.window))
        if self.window:
            inside = allowed & (age < self.window)
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~inside, -1e30)
            weight = torch.sigmoid(self.window_factors.float())[None, :, None, None]
            a = a + weight * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        return ((a @ v.float()) / a.sum(dim=-1, keepdim=True)).to(v.dtype)


class SwiGlu(nn.Module):
    def __init__(self, hidden, width, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(hidden, width, bias=False))
        setattr(self, names[1], nn.Linear(hidden, width, bias=False))
        setattr(self, names[2], nn.Linear(width, hidden, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class Moe(nn.Module):
    """Routed experts, Mixtral's tensor layout (`gate`, `experts.{e}.w1/w2/w3`)."""

    def __init__(self, hidden, spec):
        super().__init__()
        self.top_k = spec["top_k"]
        routing = spec.get("routing", {"kind": "mixtral"})
        self.scale = routing.get("scale", 1.0) if routing["kind"] == "scaled" else 1.0
        self.renormalise = routing["kind"] != "unnormalized"
        self.gate = nn.Linear(hidden, spec["num_experts"], bias=False)
        self.experts = nn.ModuleList(
            SwiGlu(hidden, spec["intermediate_size"], ("w1", "w3", "w2")) for _ in range(spec["num_experts"])
        )

    def forward(self, x):
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        top = top * self.scale
        weights = torch.zeros_like(probs).scatter_add(-1, idx, top).to(x.dtype)
        return sum(expert(x) * weights[..., e : e + 1] for e, expert in enumerate(self.experts))


class DecoderLayer(nn.Module):
    def __init__(self, config, spec, slot):
        super().__init__()
        att, mlp = spec["attention"], spec["mlp"]
        self.slot = slot  # index of this layer's keys/values in the cache (attention layers only)
        if att["kind"] in ("softmax", "hedgehog"):
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (Attention if att["kind"] == "softmax" else HedgehogAttention)(config, att)
        elif att["kind"] != "no_op":
            raise ValueError(f"attention kind {att['kind']!r} is not supported")
        if mlp["kind"] != "no_op":
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if mlp["kind"] == "dense":
            self.mlp = SwiGlu(config.hidden_size, mlp["intermediate_size"])
        elif mlp["kind"] == "moe":
            self.block_sparse_moe = Moe(config.hidden_size, mlp)
        elif mlp["kind"] != "no_op":
            raise ValueError(f"mlp kind {mlp['kind']!r} is not supported")

    def forward(self, x, positions, cache, key_mask):
        if hasattr(self, "self_attn"):
            x = x + self.self_attn(self.input_layernorm(x), positions, cache, self.slot, key_mask)
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        elif hasattr(self, "block_sparse_moe"):
            x = x + self.block_sparse_moe(self.post_attention_layernorm(x))
        return x


class SurgeonPreTrainedModel(PreTrainedModel):
    config_class = SurgeonConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class SurgeonModel(SurgeonPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, slot = [], 0
        for spec in config.layer_specs():
            layers.append(DecoderLayer(config, spec, slot))
            slot += spec["attention"]["kind"] != "no_op"
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, cache=None, attention_mask=None):
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, cache, attention_mask)
        return self.norm(x)


class SurgeonForCausalLM(SurgeonPreTrainedModel, GenerationMixin):
    # Used when config.tie_word_embeddings is true (transformers 5 maps names, 4 lists them).
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = SurgeonModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache()
        logits = self.lm_head(self.model(input_ids, cache, attention_mask)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
