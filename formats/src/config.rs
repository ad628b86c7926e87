//! Hugging Face `config.json` <-> [`ModelArch`].
//!
//! Reads both dialects (transformers >= 5 `rope_parameters`/`dtype`, older top-level `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and writes both rope spellings so old and new loaders agree.
use crate::arch::*;
use crate::export::*;
use crate::{DType, Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

mod gemma;

/// Keys this module interprets; everything else is carried over in `ModelArch::extra`.
const KNOWN_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
    "torch_dtype",
    "dtype",
    "attention_bias",
    "mlp_bias",
    "num_local_experts",
    "num_experts_per_tok",
    "num_experts",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "layer_types",
    "surgeon",
    "auto_map",
    "block_configs",
    "transformers_version",
    "_name_or_path",
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_local_base_freq",
    "sliding_window_pattern",
    "use_bidirectional_attention",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "first_k_dense_replace",
    "rope_interleave",
];

struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(self.path, field, message)
    }
    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }
    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }
    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }
    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| self.err(field, format!("expected token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(field, format!("expected a token id, got {v}"))),
        }
    }
}

/// Reads and interprets `config.json`.
pub fn read_config(path: &Path) -> Result<ModelArch> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    parse_config(path, &value)
}

/// The most decoder layers a config may declare (real models have a few hundred at most).
pub const MAX_LAYERS: usize = 1 << 16;

/// Interprets a parsed config.json; `path` is only used in error messages.
///
/// Three dialects: a native class (`llama`, `mistral`, `qwen2`, `mixtral`), `nemotron-nas`
/// (`block_configs`) and `surgeon` (per-layer shapes in `surgeon.layers`); see [`crate::export`].
pub fn parse_config(path: &Path, value: &Value) -> Result<ModelArch> {
    let map = value
        .as_object()
        .ok_or_else(|| Error::format(path, "config.json is not a JSON object"))?;
    let f = Fields { path, map };
    let model_type = map
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| f.err("model_type", "missing"))?;
    let family = family_of(&f, model_type)?;
    let hidden_size = f.usize("hidden_size")?;
    let num_layers = f.usize("num_hidden_layers")?;
    // Layers are allocated from this number; a corrupt value must be an error, not an abort
    // (found by fuzzing config_json).
    if num_layers > MAX_LAYERS {
        return Err(f.err(
            "num_hidden_layers",
            format!("{num_layers} is beyond any real model (at most {MAX_LAYERS})"),
        ));
    }
    let vocab_size = f.usize("vocab_size")?;
    let hidden_act = hidden_act(&f, family)?;
    if f.bool_opt("mlp_bias")?.unwrap_or(false) {
        return Err(f.err("mlp_bias", "MLP biases are not supported"));
    }
    let mut layers = match model_type {
        NEMOTRON_MODEL_TYPE => nemotron_layers(&f, hidden_size, num_layers)?,
        "deepseek_v3" => deepseek_layers(&f, num_layers)?,
        _ => uniform_layers(&f, family, hidden_size, num_layers)?,
    };
    let native = model_type != SURGEON_MODEL_TYPE;
    let (rope_theta, rope_scaling, rope_local_theta) = match family {
        Family::Gemma3 if native => gemma::rope(&f)?,
        _ => {
            let (theta, scaling) = rope(&f, family)?;
            (theta, scaling, None)
        }
    };
    let sliding_window = match family {
        Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe if native => {
            qwen_sliding_window(&f, num_layers)?
        }
        _ => f.usize_opt("sliding_window")?,
    };
    let gemma = match family.is_gemma() && native {
        true => gemma::params(&f, family, rope_local_theta, sliding_window, &mut layers)?,
        false => GemmaParams::default(),
    };

    let surgeon = surgeon_meta(&f, model_type, num_layers, &mut layers)?;

    let torch_dtype = map
        .get("torch_dtype")
        .or_else(|| map.get("dtype"))
        .and_then(Value::as_str)
        .and_then(DType::from_torch_name);
    let extra = map
        .iter()
        .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
    check_numbers(&f, rope_theta, rms_norm_eps, vocab_size)?;

    Ok(ModelArch {
        family,
        hidden_size,
        vocab_size,
        layers,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
        // transformers' default: tied for Gemma, untied otherwise.
        tie_word_embeddings: f
            .bool_opt("tie_word_embeddings")?
            .unwrap_or(family.is_gemma()),
        sliding_window,
        bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.token_ids("eos_token_id")?,
        pad_token_id: f.token_ids("pad_token_id")?.first().copied(),
        hidden_act,
        gemma,
        torch_dtype,
        surgeon,
        extra,
    })
}

/// The MLP's activation: `hidden_act`, or for Gemma `hidden_activation` (what transformers reads;
/// default `gelu_pytorch_tanh`). The runtime has SwiGLU and tanh-approximated GeGLU.
fn hidden_act(f: &Fields, family: Family) -> Result<String> {
    let (field, default) = match family.is_gemma() && f.map.contains_key("hidden_activation") {
        true => ("hidden_activation", "gelu_pytorch_tanh"),
        false if family.is_gemma() => ("hidden_act", "gelu_pytorch_tanh"),
        false => ("hidden_act", "silu"),
    };
    let act = match f.map.get(field) {
        None | Some(Value::Null) => default,
        Some(v) => v
            .as_str()
            .ok_or_else(|| f.err(field, format!("expected a string, got {v}")))?,
    };
    if !SUPPORTED_ACTIVATIONS.contains(&act) {
        return Err(f.err(
            field,
            format!(
                "`{act}` is not supported (supported: {})",
                SUPPORTED_ACTIVATIONS.join(", ")
            ),
        ));
    }
    Ok(act.to_string())
}

/// The family a config describes: its `model_type`, or for the surgeon dialect `surgeon.family`.
fn family_of(f: &Fields, model_type: &str) -> Result<Family> {
    Ok(match model_type {
        NEMOTRON_MODEL_TYPE => Family::Llama,
        SURGEON_MODEL_TYPE => {
            let base = f.map
                .get("surgeon")
                .and_then(|s| s.get("family"))
                .and_then(Value::as_str)
                .ok_or_else(|| f.err("surgeon.family", "missing"))?;
            Family::from_model_type(base).ok_or_else(|| {
                f.err("surgeon.family", format!("unsupported family `{base}`"))
            })?
        }
        _ => Family::from_model_type(model_type).ok_or_else(|| {
            f.err(
                "model_type",
                format!(
                    "unsupported model type `{model_type}`; supported: {}, {NEMOTRON_MODEL_TYPE}, {SURGEON_MODEL_TYPE}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            )
        })?,
    })
}

/// The `surgeon` block; its `layers`, when present, replace `layers` (layers that differ from
/// one another are spelled out in full there).
fn surgeon_meta(
    f: &Fields,
    model_type: &str,
    num_layers: usize,
    layers: &mut Vec<Layer>,
) -> Result<SurgeonMeta> {
    let Some(s) = f.map.get("surgeon") else {
        if model_type == SURGEON_MODEL_TYPE {
            return Err(f.err("surgeon.layers", "missing"));
        }
        return Ok(SurgeonMeta::default());
    };
    let surgeon = serde_json::from_value(s.clone())
        .map_err(|e| f.err("surgeon", format!("unreadable: {e}")))?;
    if let Some(per_layer) = s.get("layers") {
        let explicit: Vec<Layer> = serde_json::from_value(per_layer.clone())
            .map_err(|e| f.err("surgeon.layers", format!("unreadable: {e}")))?;
        if explicit.len() != num_layers {
            return Err(f.err(
                "surgeon.layers",
                format!(
                    "lists {} layers but num_hidden_layers = {num_layers}",
                    explicit.len()
                ),
            ));
        }
        *layers = explicit;
    } else if model_type == SURGEON_MODEL_TYPE {
        return Err(f.err("surgeon.layers", "missing"));
    }
    Ok(surgeon)
}

/// Numeric fields must be in range (a negative `rope_theta` or `rms_norm_eps` turns every forward
/// pass into NaN; a zero size makes empty tensors).
fn check_numbers(f: &Fields, rope_theta: f64, eps: f64, vocab_size: usize) -> Result<()> {
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        let nested = f
            .map
            .get("rope_parameters")
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("rope_theta"));
        let field = if nested {
            "rope_parameters.rope_theta"
        } else {
            "rope_theta"
        };
        return Err(f.err(
            field,
            format!("must be a positive finite number, got {rope_theta}"),
        ));
    }
    if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
        return Err(f.err("rms_norm_eps", format!("must be in (0, 1), got {eps}")));
    }
    if vocab_size == 0 {
        return Err(f.err("vocab_size", "must be positive"));
    }
    if f.usize_opt("max_position_embeddings")? == Some(0) {
        return Err(f.err("max_position_embeddings", "must be positive"));
    }
    Ok(())
}

/// Qwen's sliding window: only with `use_sliding_window`, and then only in layers from
/// `max_window_layers` on (transformers' `layer_types`); the runtime has one window for all
/// layers, so a model whose layers differ is refused.
fn qwen_sliding_window(f: &Fields, num_layers: usize) -> Result<Option<usize>> {
    if !f.bool_opt("use_sliding_window")?.unwrap_or(false) {
        return Ok(None);
    }
    let window = f.usize_opt("sliding_window")?;
    match f.usize_opt("max_window_layers")? {
        Some(m) if m >= num_layers => Ok(None),
        None | Some(0) => Ok(window),
        Some(m) => Err(f.err(
            "max_window_layers",
            format!(
                "{m}: layers below it use full attention and the rest a sliding window; \
                 surgeon has one window for all layers (use 0 or >= num_hidden_layers = {num_layers})"
            ),
        )),
    }
}

/// `num_attention_heads` and `head_dim` (default hidden / heads).
fn heads(f: &Fields, hidden_size: usize) -> Result<(usize, usize)> {
    let num_heads = f.usize("num_attention_heads")?;
    if num_heads == 0 || hidden_size == 0 {
        return Err(f.err("num_attention_heads", "must be positive"));
    }
    let head_dim = f.usize_opt("head_dim")?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 {
        return Err(f.err("head_dim", "must be positive"));
    }
    Ok((num_heads, head_dim))
}

/// Layers of a native config: all alike.
fn uniform_layers(
    f: &Fields,
    family: Family,
    hidden_size: usize,
    num_layers: usize,
) -> Result<Vec<Layer>> {
    let (num_heads, head_dim) = heads(f, hidden_size)?;
    let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(f.err(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
        ));
    }
    let qkv_bias = match family {
        Family::Qwen2 => true,
        _ => {
            if f.bool_opt("attention_bias")?.unwrap_or(false) {
                return Err(f.err(
                    "attention_bias",
                    format!(
                        "attention biases on a {} model are not supported",
                        family.model_type()
                    ),
                ));
            }
            false
        }
    };
    let mlp = match family {
        Family::Mixtral => Mlp::Moe {
            num_experts: f.usize("num_local_experts")?,
            top_k: f.usize("num_experts_per_tok")?,
            intermediate_size: positive(f, "intermediate_size")?,
            routing: MoeRouting::Mixtral,
        },
        Family::Qwen3Moe => qwen3_moe_mlp(f)?,
        _ => Mlp::Dense {
            intermediate_size: positive(f, "intermediate_size")?,
        },
    };
    let attention = Attention {
        qkv_bias,
        qk_norm: family.has_qk_norm(),
        ..Attention::softmax(num_heads, num_kv_heads, head_dim)
    };
    Ok(vec![Layer { attention, mlp }; num_layers])
}

/// Layers of a DeepSeek-V3 config: multi-head latent attention, every layer dense (the routed
/// experts of layers from `first_k_dense_replace` on are not supported).
fn deepseek_layers(f: &Fields, num_layers: usize) -> Result<Vec<Layer>> {
    let dense = f.usize_opt("first_k_dense_replace")?.unwrap_or(3);
    if dense < num_layers {
        return Err(f.err(
            "first_k_dense_replace",
            format!(
                "{dense}: layers {dense}.. of {num_layers} would be DeepSeek-V3 MoE layers, which are \
                 not supported (only dense models: first_k_dense_replace >= num_hidden_layers)"
            ),
        ));
    }
    if f.bool_opt("attention_bias")?.unwrap_or(false) {
        return Err(f.err("attention_bias", "MLA projection biases are not supported"));
    }
    if !f.bool_opt("rope_interleave")?.unwrap_or(true) {
        return Err(f.err(
            "rope_interleave",
            "only interleaved rotary pairs (true) are supported",
        ));
    }
    let num_heads = positive(f, "num_attention_heads")?;
    let rope = positive(f, "qk_rope_head_dim")?;
    if rope % 2 != 0 {
        return Err(f.err("qk_rope_head_dim", format!("{rope} is odd")));
    }
    let q_lora_rank = match f.usize_opt("q_lora_rank")? {
        Some(0) => return Err(f.err("q_lora_rank", "must be positive or null")),
        q => q,
    };
    let attention = Attention {
        kind: AttentionKind::Mla {
            kv_lora_rank: positive(f, "kv_lora_rank")?,
            q_lora_rank,
            qk_rope_head_dim: rope,
        },
        v_head_dim: positive(f, "v_head_dim")?,
        ..Attention::softmax(num_heads, num_heads, f.usize("qk_nope_head_dim")? + rope)
    };
    let mlp = Mlp::Dense {
        intermediate_size: positive(f, "intermediate_size")?,
    };
    Ok(vec![Layer { attention, mlp }; num_layers])
}

/// A required size that must not be zero.
fn positive(f: &Fields, field: &str) -> Result<usize> {
    match f.usize(field)? {
        0 => Err(f.err(field, "must be positive")),
        n => Ok(n),
    }
}

/// Qwen3-MoE's experts: every layer routed (dense layers between them are not supported), the
/// top-k probabilities renormalised only with `norm_topk_prob`.
fn qwen3_moe_mlp(f: &Fields) -> Result<Mlp> {
    if f.usize_opt("decoder_sparse_step")?.unwrap_or(1) != 1 {
        return Err(f.err(
            "decoder_sparse_step",
            "only 1 (every layer has experts) is supported",
        ));
    }
    if let Some(Value::Array(dense)) = f.map.get("mlp_only_layers") {
        if !dense.is_empty() {
            return Err(f.err(
                "mlp_only_layers",
                "dense layers between MoE layers are not supported",
            ));
        }
    }
    let renormalise = f.bool_opt("norm_topk_prob")?.unwrap_or(false);
    Ok(Mlp::Moe {
        // transformers >= 5 writes `num_local_experts`; older versions `num_experts`.
        num_experts: match f.usize_opt("num_local_experts")? {
            Some(_) => positive(f, "num_local_experts")?,
            None => positive(f, "num_experts")?,
        },
        top_k: positive(f, "num_experts_per_tok")?,
        intermediate_size: positive(f, "moe_intermediate_size")?,
        routing: match renormalise {
            true => MoeRouting::Mixtral,
            false => MoeRouting::Unnormalized,
        },
    })
}

/// Layers of a nemotron-nas config (`block_configs`).
fn nemotron_layers(f: &Fields, hidden_size: usize, num_layers: usize) -> Result<Vec<Layer>> {
    let (num_heads, head_dim) = heads(f, hidden_size)?;
    if f.bool_opt("attention_bias")?.unwrap_or(false) {
        return Err(f.err("attention_bias", "attention biases are not supported"));
    }
    let blocks = f
        .map
        .get("block_configs")
        .ok_or_else(|| f.err("block_configs", "missing"))?;
    layers_from_block_configs(f.path, blocks, num_layers, hidden_size, num_heads, head_dim)
}

/// Rope base and scaling: transformers >= 5 nests them in `rope_parameters`; older configs keep
/// them top level.
fn rope(f: &Fields, family: Family) -> Result<(f64, Option<Value>)> {
    let rope_params = f.map.get("rope_parameters").and_then(Value::as_object);
    let default_theta = match family {
        Family::Mixtral => 1e6,
        _ => 10000.0,
    };
    let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| f.err("rope_parameters.rope_theta", "expected a number"))?,
        None => f.f64_opt("rope_theta")?.unwrap_or(default_theta),
    };
    let partial = rope_params
        .and_then(|p| p.get("partial_rotary_factor"))
        .or_else(|| f.map.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    if partial != 1.0 {
        return Err(f.err(
            "partial_rotary_factor",
            format!("{partial}: rotary embeddings over part of each head are not supported"),
        ));
    }
    let rope_scaling = match f.map.get("rope_scaling") {
        Some(Value::Null) | None => rope_params.and_then(|p| {
            let kind = p
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            (kind != "default").then(|| {
                let mut s = p.clone();
                s.remove("rope_theta");
                Value::Object(s)
            })
        }),
        Some(v) => Some(v.clone()),
    };
    Ok((
        rope_theta,
        rope_scaling.map(|s| longrope_original_max(f, s)),
    ))
}

/// Phi-3's older configs keep LongRoPE's `original_max_position_embeddings` top level; the runtime
/// reads it from the scaling parameters, where transformers >= 5 puts it.
fn longrope_original_max(f: &Fields, mut scaling: Value) -> Value {
    let top = f.map.get("original_max_position_embeddings");
    if let (Some(s), Some(top)) = (scaling.as_object_mut(), top) {
        let kind = s.get("rope_type").or_else(|| s.get("type"));
        if kind.and_then(Value::as_str) == Some("longrope") {
            s.entry("original_max_position_embeddings")
                .or_insert_with(|| top.clone());
        }
    }
    scaling
}

/// Renders config.json for `arch`, stored in `dtype`, in the dialect [`choose_export`] picks.
pub fn config_json(arch: &ModelArch, dtype: DType) -> Result<Value> {
    if arch.layers.is_empty() {
        return Err(Error::invalid("a model needs at least one layer"));
    }
    let choice = choose_export(arch);
    let format = choice.format;
    if arch.family.is_gemma() && !matches!(format, ExportFormat::Native(_)) {
        return Err(Error::invalid(format!(
            "a {} model that no transformers class describes ({}) cannot be written: \
             surgeon's shipped modeling code does not implement Gemma's norms and soft-capping",
            arch.family.model_type(),
            choice.reason
        )));
    }
    let mut m = Map::new();
    m.insert("architectures".into(), json!([format.architecture()]));
    m.insert("model_type".into(), json!(format.model_type()));
    if let Some(auto_map) = format.auto_map() {
        m.insert("auto_map".into(), auto_map);
    }
    m.insert("hidden_size".into(), json!(arch.hidden_size));
    m.insert("num_hidden_layers".into(), json!(arch.num_layers()));
    match format {
        ExportFormat::NemotronNas => nemotron_shape(arch, &mut m),
        _ => uniform_shape(arch, &mut m),
    }
    m.insert("vocab_size".into(), json!(arch.vocab_size));
    m.insert("hidden_act".into(), json!(arch.hidden_act));
    m.insert("rms_norm_eps".into(), json!(arch.rms_norm_eps));
    match format {
        ExportFormat::Native(Family::Gemma3) => gemma::insert_rope(arch, &mut m),
        _ => insert_rope(arch, &mut m),
    }
    m.insert(
        "max_position_embeddings".into(),
        json!(arch.max_position_embeddings),
    );
    m.insert(
        "tie_word_embeddings".into(),
        json!(arch.tie_word_embeddings),
    );
    match format {
        ExportFormat::Native(family) => native_attention_fields(arch, family, &mut m)?,
        ExportFormat::NemotronNas => {
            m.insert("attention_bias".into(), json!(false));
            m.insert("mlp_bias".into(), json!(false));
        }
        ExportFormat::Surgeon => {
            m.insert("sliding_window".into(), json!(arch.sliding_window));
        }
    }
    insert_token_ids(arch, &mut m);
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    for (k, v) in &arch.extra {
        m.entry(k.clone()).or_insert_with(|| v.clone());
    }
    if format == ExportFormat::NemotronNas {
        m.insert("block_configs".into(), block_configs(arch));
    }
    let mut surgeon = serde_json::to_value(&arch.surgeon).expect("SurgeonMeta serialises");
    if format == ExportFormat::Surgeon {
        surgeon["family"] = json!(arch.family.model_type());
        surgeon["layers"] = serde_json::to_value(&arch.layers).expect("layers serialise");
    }
    if surgeon.as_object().is_some_and(|o| !o.is_empty()) {
        m.insert("surgeon".into(), surgeon);
    }
    Ok(Value::Object(m))
}

/// Head counts and MLP width of a uniform config (the first layer's, for the surgeon dialect,
/// whose `surgeon.layers` is authoritative).
fn uniform_shape(arch: &ModelArch, m: &mut Map<String, Value>) {
    let a = arch
        .layers
        .iter()
        .map(|l| &l.attention)
        .find(|a| !a.is_no_op())
        .unwrap_or(&arch.layers[0].attention);
    m.insert("num_attention_heads".into(), json!(a.num_heads));
    m.insert("num_key_value_heads".into(), json!(a.num_kv_heads));
    m.insert("head_dim".into(), json!(a.head_dim));
    let mlp = arch
        .layers
        .iter()
        .map(|l| &l.mlp)
        .find(|m| **m != Mlp::NoOp)
        .unwrap_or(&Mlp::NoOp);
    let (intermediate, experts) = match mlp {
        Mlp::NoOp => (0, None),
        Mlp::Dense { intermediate_size } => (*intermediate_size, None),
        Mlp::Moe {
            num_experts,
            top_k,
            intermediate_size,
            routing,
        } => (*intermediate_size, Some((*num_experts, *top_k, routing))),
    };
    m.insert("intermediate_size".into(), json!(intermediate));
    match (experts, arch.family) {
        (Some((e, k, routing)), Family::Qwen3 | Family::Qwen3Moe) => {
            // Both spellings: transformers >= 5 reads `num_local_experts`, older `num_experts`.
            m.insert("num_experts".into(), json!(e));
            m.insert("num_local_experts".into(), json!(e));
            m.insert("num_experts_per_tok".into(), json!(k));
            m.insert("moe_intermediate_size".into(), json!(intermediate));
            m.insert(
                "norm_topk_prob".into(),
                json!(routing != &MoeRouting::Unnormalized),
            );
            m.insert("decoder_sparse_step".into(), json!(1));
            m.insert("mlp_only_layers".into(), json!([]));
        }
        (Some((e, k, _)), _) => {
            m.insert("num_local_experts".into(), json!(e));
            m.insert("num_experts_per_tok".into(), json!(k));
        }
        (None, _) => {}
    }
}

/// nemotron-nas: global query heads; KV heads and MLP widths live in `block_configs`.
fn nemotron_shape(arch: &ModelArch, m: &mut Map<String, Value>) {
    let a = arch
        .layers
        .iter()
        .map(|l| &l.attention)
        .find(|a| !a.is_no_op())
        .expect("checked by choose_export");
    m.insert("num_attention_heads".into(), json!(a.num_heads));
    m.insert("num_key_value_heads".into(), Value::Null);
    m.insert("intermediate_size".into(), Value::Null);
}

/// Both rope spellings, so that old and new loaders agree.
fn insert_rope(arch: &ModelArch, m: &mut Map<String, Value>) {
    m.insert("rope_theta".into(), json!(arch.rope_theta));
    m.insert(
        "rope_scaling".into(),
        arch.rope_scaling.clone().unwrap_or(Value::Null),
    );
    let mut rope_parameters = match &arch.rope_scaling {
        Some(Value::Object(s)) => s.clone(),
        _ => {
            let mut p = Map::new();
            p.insert("rope_type".into(), json!("default"));
            p
        }
    };
    rope_parameters.insert("rope_theta".into(), json!(arch.rope_theta));
    m.insert("rope_parameters".into(), Value::Object(rope_parameters));
}

/// Sliding window and bias flags as each native family spells them.
fn native_attention_fields(
    arch: &ModelArch,
    family: Family,
    m: &mut Map<String, Value>,
) -> Result<()> {
    if family.is_gemma() {
        gemma::insert_attention_fields(arch, m);
        return Ok(());
    }
    let qwen = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe);
    if qwen {
        m.insert(
            "use_sliding_window".into(),
            json!(arch.sliding_window.is_some()),
        );
        // Every layer slides (or none does): see `qwen_sliding_window`.
        m.insert("max_window_layers".into(), json!(0));
    }
    if qwen || matches!(family, Family::Mistral | Family::Mixtral | Family::Phi3) {
        m.insert("sliding_window".into(), json!(arch.sliding_window));
    } else if arch.sliding_window.is_some() {
        return Err(Error::invalid(
            "a sliding window needs a mistral, mixtral, qwen or phi3 config",
        ));
    }
    if family == Family::DeepseekV3 {
        deepseek_fields(arch, m);
    }
    if matches!(
        family,
        Family::Llama | Family::Qwen3 | Family::Qwen3Moe | Family::DeepseekV3
    ) {
        m.insert("attention_bias".into(), json!(false));
        m.insert("mlp_bias".into(), json!(false));
    }
    Ok(())
}

/// DeepSeek-V3's attention sizes (every layer alike, see `choose_export`), all layers dense.
fn deepseek_fields(arch: &ModelArch, m: &mut Map<String, Value>) {
    let a = &arch.layers[0].attention;
    if let AttentionKind::Mla {
        kv_lora_rank,
        q_lora_rank,
        qk_rope_head_dim,
    } = a.kind
    {
        m.insert("kv_lora_rank".into(), json!(kv_lora_rank));
        m.insert("q_lora_rank".into(), json!(q_lora_rank));
        m.insert("qk_rope_head_dim".into(), json!(qk_rope_head_dim));
        m.insert(
            "qk_nope_head_dim".into(),
            json!(a.head_dim - qk_rope_head_dim),
        );
        m.insert("v_head_dim".into(), json!(a.v_head_dim));
        // transformers' DeepseekV3Config takes `head_dim` to be the rotary size.
        m.insert("head_dim".into(), json!(qk_rope_head_dim));
    }
    m.insert("first_k_dense_replace".into(), json!(arch.num_layers()));
    m.insert("rope_interleave".into(), json!(true));
}

fn insert_token_ids(arch: &ModelArch, m: &mut Map<String, Value>) {
    if let Some(b) = arch.bos_token_id {
        m.insert("bos_token_id".into(), json!(b));
    }
    match arch.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), json!(one));
        }
        many => {
            m.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = arch.pad_token_id {
        m.insert("pad_token_id".into(), json!(p));
    }
}

/// True when transformers can load the exported config without custom code
/// (uniform layers, standard attention and routing).
pub fn is_standard(arch: &ModelArch) -> bool {
    matches!(choose_export(arch).format, ExportFormat::Native(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol_like() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 512, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "initializer_range": 0.02
        })
    }

    /// The fuzzer's input: this layer count made parse_config allocate ~1.4e13 layers and abort.
    #[test]
    fn absurd_layer_count_is_an_error_not_an_allocation() {
        let mut v = smol_like();
        v["num_hidden_layers"] = json!(14444444444444u64);
        let e = parse_config(Path::new("config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("beyond any real model"),
            "{e}"
        );
        v["num_hidden_layers"] = json!(MAX_LAYERS);
        assert!(parse_config(Path::new("config.json"), &v).is_ok());
    }

    #[test]
    fn non_finite_or_out_of_range_numbers_name_the_field() {
        for (field, value, want) in [
            (
                "rope_theta",
                json!(-5.0),
                "`rope_theta`: must be a positive finite number, got -5",
            ),
            ("rope_theta", json!(0.0), "`rope_theta`: must be a positive"),
            (
                "rms_norm_eps",
                json!(-1.0),
                "`rms_norm_eps`: must be in (0, 1), got -1",
            ),
            (
                "rms_norm_eps",
                json!(0.0),
                "`rms_norm_eps`: must be in (0, 1)",
            ),
            (
                "rms_norm_eps",
                json!(2.0),
                "`rms_norm_eps`: must be in (0, 1)",
            ),
            ("vocab_size", json!(0), "`vocab_size`: must be positive"),
            (
                "intermediate_size",
                json!(0),
                "`intermediate_size`: must be positive",
            ),
            (
                "max_position_embeddings",
                json!(0),
                "`max_position_embeddings`: must be positive",
            ),
        ] {
            let mut v = smol_like();
            v[field] = value;
            let e = parse_config(Path::new("c/config.json"), &v)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{field}: {e}");
            assert!(e.starts_with("c/config.json"), "{e}");
        }
        let mut v = smol_like();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": -1.0});
        let e = parse_config(Path::new("config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rope_parameters.rope_theta`"), "{e}");
    }

    #[test]
    fn reads_both_rope_dialects() {
        let old = parse_config(Path::new("c.json"), &smol_like()).unwrap();
        let mut new = smol_like();
        let o = new.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 100000.0}),
        );
        let new = parse_config(Path::new("c.json"), &new).unwrap();
        assert_eq!(old.rope_theta, 100000.0);
        assert_eq!(new.rope_theta, 100000.0);
        assert_eq!(new.rope_scaling, None);
    }

    #[test]
    fn round_trips_through_json() {
        let arch = parse_config(Path::new("c.json"), &smol_like()).unwrap();
        let out = config_json(&arch, DType::BF16).unwrap();
        let again = parse_config(Path::new("c.json"), &out).unwrap();
        assert_eq!(arch, again);
        assert_eq!(out["initializer_range"], json!(0.02));
        assert!(is_standard(&arch));
    }

    fn qwen3_moe_like() -> Value {
        let mut v = smol_like();
        v["model_type"] = json!("qwen3_moe");
        v["moe_intermediate_size"] = json!(32);
        v["num_experts"] = json!(4);
        v["num_experts_per_tok"] = json!(2);
        v
    }

    #[test]
    fn qwen_layers_that_differ_are_refused_with_the_field() {
        let path = Path::new("config.json");
        let mut v = qwen3_moe_like();
        v["mlp_only_layers"] = json!([0]);
        let e = parse_config(path, &v).unwrap_err().to_string();
        assert!(e.contains("`mlp_only_layers`"), "{e}");
        let mut v = qwen3_moe_like();
        v["decoder_sparse_step"] = json!(2);
        let e = parse_config(path, &v).unwrap_err().to_string();
        assert!(e.contains("`decoder_sparse_step`"), "{e}");
        let mut v = qwen3_moe_like();
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(64);
        v["max_window_layers"] = json!(1);
        let e = parse_config(path, &v).unwrap_err().to_string();
        assert!(e.contains("`max_window_layers`"), "{e}");
        // No layer slides when the window starts past the last layer; all do from layer 0.
        v["max_window_layers"] = json!(2);
        assert_eq!(parse_config(path, &v).unwrap().sliding_window, None);
        v["max_window_layers"] = json!(0);
        let arch = parse_config(path, &v).unwrap();
        assert_eq!(arch.sliding_window, Some(64));
        assert!(arch.layers[0].attention.qk_norm);
        // Unnormalised top-k routing unless norm_topk_prob.
        assert!(matches!(
            &arch.layers[1].mlp,
            Mlp::Moe {
                routing: MoeRouting::Unnormalized,
                num_experts: 4,
                ..
            }
        ));
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let mut v = smol_like();
        v["model_type"] = json!("gpt2");
        let e = parse_config(Path::new("m/config.json"), &v)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m/config.json: field `model_type`: unsupported model type `gpt2`; supported: llama, mistral, qwen2, mixtral, qwen3, qwen3_moe, phi3, gemma2, gemma3_text, deepseek_v3, nemotron-nas, surgeon"
        );
    }

    #[test]
    fn heterogeneous_layers_survive_export() {
        let mut arch = parse_config(Path::new("c.json"), &smol_like()).unwrap();
        arch.layers[1].mlp = Mlp::Dense {
            intermediate_size: 96,
        };
        assert!(!is_standard(&arch));
        let out = config_json(&arch, DType::F32).unwrap();
        let again = parse_config(Path::new("c.json"), &out).unwrap();
        assert_eq!(again.layers, arch.layers);
    }
}
