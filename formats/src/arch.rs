//! The architecture half of a plan: what a model is made of, layer by layer.
//!
//! Each layer carries its own attention and MLP description so that operators can make layers differ
//! (MoE layers, pruned widths, linear attention) without a new config format for every case.
use serde::{Deserialize, Serialize};

/// Model families whose config.json we read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Mixtral,
    /// Qwen3: per-head RMSNorm of queries and keys, explicit `head_dim`, no biases.
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention with routed experts (`mlp.gate`, `mlp.experts.{e}.*_proj`).
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    /// Phi-3: Llama's computation with fused `qkv_proj` and `gate_up_proj` tensors.
    Phi3,
    /// Gemma 2: (1 + w) RMSNorms, sandwich norms around attention and MLP, GeGLU, embeddings
    /// scaled by sqrt(hidden), soft-capped attention and final logits, alternating sliding and
    /// global layers, tied embeddings.
    Gemma2,
    /// Gemma 3 (text, `Gemma3ForCausalLM`): Gemma 2 with (1 + w) q/k norms, its own RoPE base for
    /// the sliding layers and no soft-capping by default.
    #[serde(rename = "gemma3_text")]
    Gemma3,
    /// DeepSeek-V3 with every layer dense: multi-head latent attention ([`AttentionKind::Mla`]).
    #[serde(rename = "deepseek_v3")]
    DeepseekV3,
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "mixtral",
    "qwen3",
    "qwen3_moe",
    "phi3",
    "gemma2",
    "gemma3_text",
    "deepseek_v3",
];

/// Activations of the gated MLP the runtime computes: SwiGLU and tanh-approximated GeGLU.
pub const SUPPORTED_ACTIVATIONS: &[&str] = &["silu", "gelu_pytorch_tanh"];

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "mixtral" => Some(Family::Mixtral),
            "qwen3" => Some(Family::Qwen3),
            "qwen3_moe" => Some(Family::Qwen3Moe),
            "phi3" => Some(Family::Phi3),
            "gemma2" => Some(Family::Gemma2),
            "gemma3_text" => Some(Family::Gemma3),
            "deepseek_v3" => Some(Family::DeepseekV3),
            _ => None,
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Mixtral => "mixtral",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Phi3 => "phi3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::DeepseekV3 => "deepseek_v3",
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }
    /// Queries and keys pass a per-head RMSNorm (`q_norm`, `k_norm`) before the rotary embedding.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3)
    }
    /// Gemma: RMSNorms multiply by `1 + weight` (the stored weight is centred on 0), every layer
    /// has sandwich norms (`post_attention_layernorm` after attention, `pre_feedforward_layernorm`
    /// and `post_feedforward_layernorm` around the MLP), embeddings are scaled by sqrt(hidden).
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
    /// What an RMSNorm adds to its stored weight before multiplying (1 for Gemma, else 0).
    pub fn norm_offset(self) -> f32 {
        match self.is_gemma() {
            true => 1.0,
            false => 0.0,
        }
    }
    /// The family of the same attention with routed experts in every layer, as transformers
    /// names it (Mixtral for the Llama-like families).
    pub fn moe_family(self) -> Family {
        match self {
            Family::Qwen3 | Family::Qwen3Moe => Family::Qwen3Moe,
            _ => Family::Mixtral,
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How attention is computed in one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttentionKind {
    /// Standard softmax attention (optionally sliding-window, see [`ModelArch::sliding_window`]).
    Softmax,
    /// Hedgehog linear attention (arXiv 2402.04347): per query head, trainable feature maps
    /// `phi(x) = [softmax(x W), softmax(-x W)]` for queries and keys (`W`: `head_dim x feature_dim`,
    /// so `2 * feature_dim` features), applied after RoPE. With `window > 0`, the LoLCATs hybrid:
    /// exact softmax over the last `window` keys (the query's own included) plus linear attention
    /// over older ones, the softmax terms weighted by a trainable per-head `sigmoid(window_factors)`.
    Hedgehog {
        feature_dim: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        window: usize,
    },
    /// No attention at all: the layer has no input norm and no projections, and its MLP reads the
    /// layer input directly (nemotron-nas `attention.no_op`). The head counts are kept only so the
    /// model's global head count stays known; see [`Attention::no_op`].
    NoOp,
    /// DeepSeek-V3 multi-head latent attention (transformers' `DeepseekV3Attention`). Keys and values
    /// come from one latent of `kv_lora_rank` features per token (`kv_a_proj_with_mqa`, then
    /// `kv_a_layernorm`, then `kv_b_proj`), plus one rotary key of `qk_rope_head_dim` features shared
    /// by all heads. Queries come from `q_proj`, or with `q_lora_rank` from `q_a_proj`,
    /// `q_a_layernorm`, `q_b_proj`. Each query/key head is `[non-rotary | rotary]`: `head_dim` is
    /// `qk_nope_head_dim + qk_rope_head_dim`; the rotary features are stored in interleaved pairs
    /// (`rope_interleave`). `num_kv_heads` equals `num_heads`; there are no biases.
    Mla {
        kv_lora_rank: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        q_lora_rank: Option<usize>,
        qk_rope_head_dim: usize,
    },
}

/// One layer's attention: `num_heads` query heads and `num_kv_heads` key/value heads; queries and
/// keys have `head_dim` features per head, values (and the output projection's input) `v_head_dim`.
/// Serialised flat: `{"kind": "softmax", "num_heads": 4, ...}` (hedgehog adds `feature_dim` and,
/// when non-zero, `window`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AttentionRepr")]
pub struct Attention {
    #[serde(flatten)]
    pub kind: AttentionKind,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Query/key size per head (the rotary dimension).
    pub head_dim: usize,
    /// Value size per head; `o_proj` reads `num_heads * v_head_dim` features.
    pub v_head_dim: usize,
    /// q/k/v projections carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys before the rotary embedding (Qwen3 `q_norm`, `k_norm`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// Attends to every earlier position even when the model has a [`ModelArch::sliding_window`]
    /// (Gemma's `full_attention` layers among its `sliding_attention` ones); such a layer also
    /// keeps the global RoPE base when the model has a [`GemmaParams::rope_local_theta`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_attention: bool,
}

/// What [`Attention`] is read from: the flat form it is written in, or the form of configs written
/// before per-layer value head sizes existed (`"kind": {"kind": "softmax"}`, no `v_head_dim`,
/// meaning "same as head_dim").
#[derive(Deserialize)]
struct AttentionRepr {
    kind: serde_json::Value,
    feature_dim: Option<usize>,
    window: Option<usize>,
    kv_lora_rank: Option<usize>,
    q_lora_rank: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    v_head_dim: Option<usize>,
    qkv_bias: bool,
    #[serde(default)]
    qk_norm: bool,
    #[serde(default)]
    full_attention: bool,
}

impl TryFrom<AttentionRepr> for Attention {
    type Error = String;
    fn try_from(r: AttentionRepr) -> Result<Self, String> {
        let kind = match r.kind {
            serde_json::Value::String(name) => {
                let mut tagged = serde_json::json!({ "kind": name });
                if let Some(f) = r.feature_dim {
                    tagged["feature_dim"] = f.into();
                }
                for (key, v) in [
                    ("window", r.window),
                    ("kv_lora_rank", r.kv_lora_rank),
                    ("q_lora_rank", r.q_lora_rank),
                    ("qk_rope_head_dim", r.qk_rope_head_dim),
                ] {
                    if let Some(v) = v {
                        tagged[key] = v.into();
                    }
                }
                tagged
            }
            nested => nested,
        };
        Ok(Attention {
            kind: serde_json::from_value(kind).map_err(|e| format!("attention kind: {e}"))?,
            num_heads: r.num_heads,
            num_kv_heads: r.num_kv_heads,
            head_dim: r.head_dim,
            v_head_dim: r.v_head_dim.unwrap_or(r.head_dim),
            qkv_bias: r.qkv_bias,
            qk_norm: r.qk_norm,
            full_attention: r.full_attention,
        })
    }
}

impl Attention {
    /// Standard softmax attention with the same head size for queries, keys and values.
    pub fn softmax(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Attention {
            kind: AttentionKind::Softmax,
            num_heads,
            num_kv_heads,
            head_dim,
            v_head_dim: head_dim,
            qkv_bias: false,
            qk_norm: false,
            full_attention: false,
        }
    }
    /// A skipped attention in a model whose attention layers have `num_heads` heads of `head_dim`.
    pub fn no_op(num_heads: usize, head_dim: usize) -> Self {
        Attention {
            kind: AttentionKind::NoOp,
            ..Attention::softmax(num_heads, num_heads, head_dim)
        }
    }
    pub fn is_no_op(&self) -> bool {
        self.kind == AttentionKind::NoOp
    }
    /// Features per head that the rotary embedding turns: `qk_rope_head_dim` for latent attention,
    /// the whole `head_dim` otherwise.
    pub fn rope_dim(&self) -> usize {
        match self.kind {
            AttentionKind::Mla {
                qk_rope_head_dim, ..
            } => qk_rope_head_dim,
            _ => self.head_dim,
        }
    }
    /// Rows of `q_proj`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    /// Rows of `k_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Rows of `v_proj`.
    pub fn v_dim(&self) -> usize {
        self.num_kv_heads * self.v_head_dim
    }
    /// Columns of `o_proj`.
    pub fn o_dim(&self) -> usize {
        self.num_heads * self.v_head_dim
    }
}

/// How routed experts are weighted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MoeRouting {
    /// Mixtral: softmax over all experts, top-k, renormalise the k weights to sum to 1.
    Mixtral,
    /// LLaMA-MoE: like Mixtral, then every selected expert's output is multiplied by `scale` (n/k).
    Scaled { scale: f64 },
    /// Softmax over all experts, top-k, the k probabilities used as they are (not renormalised):
    /// Qwen3-MoE with `norm_topk_prob: false`.
    Unnormalized,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mlp {
    /// SwiGLU: down(silu(gate(x)) * up(x)).
    Dense { intermediate_size: usize },
    /// Routed SwiGLU experts, each of width `intermediate_size`.
    Moe {
        num_experts: usize,
        top_k: usize,
        intermediate_size: usize,
        routing: MoeRouting,
    },
    /// No MLP at all: no post-attention norm and no projections (nemotron-nas `ffn.no_op`).
    NoOp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub attention: Attention,
    pub mlp: Mlp,
}

/// Bookkeeping that operators leave for later steps (healing reads it), stored in config.json under
/// the key `surgeon`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SurgeonMeta {
    /// Layers inserted by an operator (e.g. LLaMA Pro expansion): `--train new-blocks` trains these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_layers: Vec<usize>,
    /// Token ids added by vocabulary extension: `--train new-embeddings` trains these rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_token_ids: Vec<u32>,
    /// One line per operation applied, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
    /// Free-form notes for the model card (e.g. how routing differs from the exported layout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl SurgeonMeta {
    pub fn is_empty(&self) -> bool {
        self == &SurgeonMeta::default()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelArch {
    pub family: Family,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub layers: Vec<Layer>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_scaling` as found in config.json (e.g. llama3 frequency scaling), passed through.
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Hidden activation of the gated MLP: `silu` (SwiGLU) or `gelu_pytorch_tanh` (GeGLU).
    pub hidden_act: String,
    /// Attention and logit details beyond Llama's (Gemma's); all `None` for the other families.
    #[serde(default, skip_serializing_if = "GemmaParams::is_default")]
    pub gemma: GemmaParams,
    /// dtype the checkpoint declares (`torch_dtype`), if any.
    pub torch_dtype: Option<crate::DType>,
    pub surgeon: SurgeonMeta,
    /// config.json keys we do not interpret, carried over unchanged.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Gemma's departures from Llama's attention and output, as config.json names them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GemmaParams {
    /// Attention scores are `q.k / sqrt(query_pre_attn_scalar)` (instead of `/ sqrt(head_dim)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Scores become `c * tanh(score / c)` before the mask and softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Logits become `c * tanh(logit / c)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// RoPE base of the sliding-window layers (Gemma 3's `rope_local_base_freq`; no scaling),
    /// the layers with [`Attention::full_attention`] keep `rope_theta` and `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f64>,
}

impl GemmaParams {
    pub fn is_default(&self) -> bool {
        self == &GemmaParams::default()
    }
}

impl ModelArch {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The single attention shape if all layers agree.
    pub fn uniform_attention(&self) -> Option<&Attention> {
        let first = &self.layers.first()?.attention;
        self.layers
            .iter()
            .all(|l| &l.attention == first)
            .then_some(first)
    }

    /// The single MLP shape if all layers agree.
    pub fn uniform_mlp(&self) -> Option<&Mlp> {
        let first = &self.layers.first()?.mlp;
        self.layers.iter().all(|l| &l.mlp == first).then_some(first)
    }

    /// Expected tensors (HF names and shapes) of this architecture, in layer order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for i in 0..self.layers.len() {
            out.extend(self.layer_tensors(i));
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Tensors of decoder layer `i`, HF names and shapes: [`layer_tensors`], for Gemma with its
    /// sandwich norms (`post_attention_layernorm` then follows the attention, and the MLP sits
    /// between `pre_feedforward_layernorm` and `post_feedforward_layernorm`).
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let (layer, h) = (&self.layers[i], self.hidden_size);
        let mut out = layer_tensors(i, layer, h);
        if !self.family.is_gemma() {
            return out;
        }
        let p = format!("model.layers.{i}");
        let post_attention = format!("{p}.post_attention_layernorm.weight");
        out.retain(|(n, _)| n != &post_attention);
        if !layer.attention.is_no_op() {
            out.push((post_attention, vec![h]));
        }
        if layer.mlp != Mlp::NoOp {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
        }
        out
    }

    /// Key and value numbers a softmax-attention KV cache holds per token, over all layers:
    /// `num_kv_heads * (head_dim + v_head_dim)` per layer, `kv_lora_rank + qk_rope_head_dim` for
    /// latent attention (the latent and the shared rotary key). Skipped attention holds nothing, and
    /// so does linear attention (its state does not grow with the sequence).
    pub fn kv_cache_values_per_token(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| {
                let a = &l.attention;
                match a.kind {
                    AttentionKind::Softmax => (a.num_kv_heads * (a.head_dim + a.v_head_dim)) as u64,
                    AttentionKind::Mla {
                        kv_lora_rank,
                        qk_rope_head_dim,
                        ..
                    } => (kv_lora_rank + qk_rope_head_dim) as u64,
                    AttentionKind::Hedgehog { .. } | AttentionKind::NoOp => 0,
                }
            })
            .sum()
    }

    /// Parameter count from the formula (no tensors needed).
    pub fn parameter_count(&self) -> u64 {
        self.expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Tensors of decoder layer `i`, HF names and shapes.
pub fn layer_tensors(i: usize, layer: &Layer, h: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("model.layers.{i}");
    let mut out = vec![];
    let a = &layer.attention;
    if let AttentionKind::Mla {
        kv_lora_rank,
        q_lora_rank,
        qk_rope_head_dim,
    } = a.kind
    {
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.extend(mla_tensors(
            &p,
            a,
            h,
            kv_lora_rank,
            q_lora_rank,
            qk_rope_head_dim,
        ));
    } else if !a.is_no_op() {
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![a.q_dim(), h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![a.kv_dim(), h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![a.v_dim(), h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, a.o_dim()]),
        ]);
    }
    let softmax_like = !a.is_no_op() && !matches!(a.kind, AttentionKind::Mla { .. });
    if a.qkv_bias && softmax_like {
        out.push((format!("{p}.self_attn.q_proj.bias"), vec![a.q_dim()]));
        out.push((format!("{p}.self_attn.k_proj.bias"), vec![a.kv_dim()]));
        out.push((format!("{p}.self_attn.v_proj.bias"), vec![a.v_dim()]));
    }
    if a.qk_norm && softmax_like {
        out.push((format!("{p}.self_attn.q_norm.weight"), vec![a.head_dim]));
        out.push((format!("{p}.self_attn.k_norm.weight"), vec![a.head_dim]));
    }
    if let AttentionKind::Hedgehog {
        feature_dim,
        window,
    } = a.kind
    {
        out.push((
            format!("{p}.self_attn.feature_map_q.weight"),
            vec![a.num_heads, a.head_dim, feature_dim],
        ));
        out.push((
            format!("{p}.self_attn.feature_map_k.weight"),
            vec![a.num_heads, a.head_dim, feature_dim],
        ));
        if window > 0 {
            out.push((format!("{p}.self_attn.window_factors"), vec![a.num_heads]));
        }
    }
    if layer.mlp != Mlp::NoOp {
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    match &layer.mlp {
        Mlp::NoOp => {}
        Mlp::Dense {
            intermediate_size: i_size,
        } => {
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![*i_size, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![*i_size, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, *i_size]));
        }
        Mlp::Moe {
            num_experts,
            intermediate_size: i_size,
            ..
        } => {
            out.push((
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![*num_experts, h],
            ));
            for e in 0..*num_experts {
                let q = format!("{p}.block_sparse_moe.experts.{e}");
                out.push((format!("{q}.w1.weight"), vec![*i_size, h]));
                out.push((format!("{q}.w2.weight"), vec![h, *i_size]));
                out.push((format!("{q}.w3.weight"), vec![*i_size, h]));
            }
        }
    }
    out
}

/// DeepSeek-V3 attention tensors under `p` (`model.layers.{i}`), HF names and shapes.
fn mla_tensors(
    p: &str,
    a: &Attention,
    h: usize,
    kv_lora_rank: usize,
    q_lora_rank: Option<usize>,
    rope: usize,
) -> Vec<(String, Vec<usize>)> {
    let s = format!("{p}.self_attn");
    let nope = a.head_dim - rope.min(a.head_dim);
    let mut out = match q_lora_rank {
        None => vec![(format!("{s}.q_proj.weight"), vec![a.q_dim(), h])],
        Some(q) => vec![
            (format!("{s}.q_a_proj.weight"), vec![q, h]),
            (format!("{s}.q_a_layernorm.weight"), vec![q]),
            (format!("{s}.q_b_proj.weight"), vec![a.q_dim(), q]),
        ],
    };
    out.extend([
        (
            format!("{s}.kv_a_proj_with_mqa.weight"),
            vec![kv_lora_rank + rope, h],
        ),
        (format!("{s}.kv_a_layernorm.weight"), vec![kv_lora_rank]),
        (
            format!("{s}.kv_b_proj.weight"),
            vec![a.num_heads * (nope + a.v_head_dim), kv_lora_rank],
        ),
        (format!("{s}.o_proj.weight"), vec![h, a.o_dim()]),
    ]);
    out
}

/// Parses `model.layers.{i}.rest` into `(i, rest)`.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let dot = rest.find('.')?;
    Some((rest[..dot].parse().ok()?, &rest[dot + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn attention_is_written_flat_and_read_in_both_forms() {
        let hedgehog = Attention {
            kind: AttentionKind::Hedgehog {
                feature_dim: 8,
                window: 0,
            },
            ..Attention::softmax(4, 2, 16)
        };
        let hybrid = Attention {
            kind: AttentionKind::Hedgehog {
                feature_dim: 8,
                window: 64,
            },
            ..Attention::softmax(4, 2, 16)
        };
        for (a, want) in [
            (
                Attention {
                    v_head_dim: 8,
                    ..Attention::softmax(4, 2, 16)
                },
                json!({"kind": "softmax", "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                       "v_head_dim": 8, "qkv_bias": false}),
            ),
            (
                Attention::no_op(4, 16),
                json!({"kind": "no_op", "num_heads": 4, "num_kv_heads": 4, "head_dim": 16,
                       "v_head_dim": 16, "qkv_bias": false}),
            ),
            (
                hedgehog.clone(),
                json!({"kind": "hedgehog", "feature_dim": 8, "num_heads": 4, "num_kv_heads": 2,
                       "head_dim": 16, "v_head_dim": 16, "qkv_bias": false}),
            ),
            (
                hybrid,
                json!({"kind": "hedgehog", "feature_dim": 8, "window": 64, "num_heads": 4,
                       "num_kv_heads": 2, "head_dim": 16, "v_head_dim": 16, "qkv_bias": false}),
            ),
        ] {
            let v = serde_json::to_value(&a).unwrap();
            assert_eq!(v, want);
            assert_eq!(serde_json::from_value::<Attention>(v).unwrap(), a);
        }
        // Written before v_head_dim and the flat form existed.
        let old = json!({"kind": {"kind": "hedgehog", "feature_dim": 8}, "num_heads": 4,
                         "num_kv_heads": 2, "head_dim": 16, "qkv_bias": false});
        assert_eq!(serde_json::from_value::<Attention>(old).unwrap(), hedgehog);
        let bad = json!({"kind": "mamba", "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                         "qkv_bias": false});
        let e = serde_json::from_value::<Attention>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention kind") && e.contains("mamba"), "{e}");
        let mla = Attention {
            kind: AttentionKind::Mla {
                kv_lora_rank: 32,
                q_lora_rank: None,
                qk_rope_head_dim: 8,
            },
            v_head_dim: 12,
            ..Attention::softmax(4, 4, 24)
        };
        let v = serde_json::to_value(&mla).unwrap();
        let want = json!({"kind": "mla", "kv_lora_rank": 32, "qk_rope_head_dim": 8, "num_heads": 4,
                          "num_kv_heads": 4, "head_dim": 24, "v_head_dim": 12, "qkv_bias": false});
        assert_eq!(v, want);
        assert_eq!(serde_json::from_value::<Attention>(v).unwrap(), mla);
    }
}
