"""Configuration of NVIDIA's nemotron-nas layout (`DeciLMForCausalLM`), as surgeon writes and reads it.

Written by surgeon beside config.json (formats/python/configuration_decilm.py in the surgeon
repository). `block_configs[i]` describes decoder layer i:

    {"attention": {"n_heads_in_group": 8, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 2.625, "no_op": false, "replace_with_linear": false}}

KV heads = num_attention_heads / n_heads_in_group; MLP width = int(2 * ffn_mult * hidden_size / 3)
rounded up to a multiple of 256 (or `ffn.intermediate_size`); `no_op` skips the attention (or MLP)
together with its norm. Sections are exposed as attribute objects (`config.block_configs[i].ffn.ffn_mult`)
the way vLLM's nemotron_nas loader reads them.
"""
from transformers import PretrainedConfig


class BlockSection:
    """One `attention` or `ffn` section of a block config: its JSON keys as attributes."""

    def __init__(self, values):
        self.__dict__.update(values)

    def to_dict(self):
        return dict(self.__dict__)


class BlockConfig:
    def __init__(self, values):
        if isinstance(values, BlockConfig):
            values = values.to_dict()
        self.attention = BlockSection(values.get("attention", {}))
        self.ffn = BlockSection(values.get("ffn", {}))

    def to_dict(self):
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


def ffn_mult_to_intermediate_size(ffn_mult, hidden_size):
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=1,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        block_configs=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.sliding_window = None
        self.block_configs = [BlockConfig(b) for b in block_configs or []]
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out

    def layer_specs(self):
        """The per-layer shapes in surgeon's form (see configuration_surgeon.py)."""
        heads = self.num_attention_heads
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // heads
        specs = []
        for block in self.block_configs:
            att, ffn = block.attention, block.ffn
            if getattr(att, "no_op", False):
                attention = {"kind": "no_op"}
            else:
                attention = {
                    "kind": "softmax",
                    "num_heads": heads,
                    "num_kv_heads": heads // att.n_heads_in_group,
                    "head_dim": head_dim,
                    "v_head_dim": head_dim,
                    "qkv_bias": False,
                }
            if getattr(ffn, "no_op", False):
                mlp = {"kind": "no_op"}
            elif getattr(ffn, "ffn_mult", None) is not None:
                mlp = {"kind": "dense", "intermediate_size": ffn_mult_to_intermediate_size(ffn.ffn_mult, self.hidden_size)}
            else:
                mlp = {"kind": "dense", "intermediate_size": ffn.intermediate_size}
            specs.append({"attention": attention, "mlp": mlp})
        return specs
