"""Configuration of surgeon's decoder-only model (`model_type: "surgeon"`).

Written into every checkpoint that surgeon exports with `model_type: "surgeon"`; kept in the surgeon
repository as formats/python/configuration_surgeon.py. Per-layer shapes live in `surgeon["layers"]`:
one entry per decoder layer, exactly as surgeon's plan holds them, e.g.

    {"attention": {"kind": "softmax", "num_heads": 4, "num_kv_heads": 1, "head_dim": 16,
                   "v_head_dim": 8, "qkv_bias": false},
     "mlp": {"kind": "dense", "intermediate_size": 96}}

`attention.kind` is "softmax", "hedgehog" (linear attention with `feature_dim` and, when non-zero,
a softmax `window`; see modeling_surgeon.py) or "no_op" (no attention and no input norm); `mlp.kind` is "dense"
(SwiGLU), "moe" (routed SwiGLU experts, Mixtral layout) or "no_op" (no MLP and no post-attention norm).
"""
from transformers import PretrainedConfig


class SurgeonConfig(PretrainedConfig):
    model_type = "surgeon"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=1,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        sliding_window=None,
        tie_word_embeddings=False,
        surgeon=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.sliding_window = sliding_window
        self.surgeon = surgeon or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_specs(self):
        """One dict per decoder layer (see the module docstring)."""
        return self.surgeon["layers"]
