//! Which config.json dialect a model is exported in, and why.
//!
//! - a native transformers class (`llama`, `mistral`, `qwen2`, `mixtral`) when every layer is alike
//!   and standard;
//! - NVIDIA's `nemotron-nas` (`DeciLMForCausalLM` with per-layer `block_configs`) when layers differ
//!   only in MLP width, KV groups and skipped (no-op) attention or MLP: vLLM, SGLang, llama.cpp and
//!   mlx-lm load it natively, transformers through the modeling code shipped beside it;
//! - otherwise `model_type: "surgeon"`, with `configuration_surgeon.py` and `modeling_surgeon.py`
//!   written into the model directory (`trust_remote_code=True`).
//!
//! The Python sources live in `formats/python/` and are compiled into the binary.
use crate::arch::*;
use crate::{Error, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The config.json dialect of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    /// A stock transformers class of this family.
    Native(Family),
    /// `nemotron-nas` (`DeciLMForCausalLM`, `block_configs`).
    NemotronNas,
    /// `model_type: "surgeon"` with its modeling code shipped in the directory.
    Surgeon,
}

impl ExportFormat {
    pub fn model_type(self) -> &'static str {
        match self {
            ExportFormat::Native(f) => f.model_type(),
            ExportFormat::NemotronNas => NEMOTRON_MODEL_TYPE,
            ExportFormat::Surgeon => SURGEON_MODEL_TYPE,
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            ExportFormat::Native(f) => f.architecture(),
            ExportFormat::NemotronNas => "DeciLMForCausalLM",
            ExportFormat::Surgeon => "SurgeonForCausalLM",
        }
    }
    /// `auto_map` of config.json (remote-code formats only).
    pub fn auto_map(self) -> Option<Value> {
        match self {
            ExportFormat::Native(_) => None,
            ExportFormat::NemotronNas => Some(json!({
                "AutoConfig": "configuration_decilm.DeciLMConfig",
                "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
            })),
            ExportFormat::Surgeon => Some(json!({
                "AutoConfig": "configuration_surgeon.SurgeonConfig",
                "AutoModelForCausalLM": "modeling_surgeon.SurgeonForCausalLM",
            })),
        }
    }
    /// Python files written beside config.json: (file name, contents).
    pub fn code_files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ExportFormat::Native(_) => &[],
            ExportFormat::NemotronNas => &[
                ("configuration_surgeon.py", CONFIGURATION_SURGEON),
                ("modeling_surgeon.py", MODELING_SURGEON),
                ("configuration_decilm.py", CONFIGURATION_DECILM),
                ("modeling_decilm.py", MODELING_DECILM),
            ],
            ExportFormat::Surgeon => &[
                ("configuration_surgeon.py", CONFIGURATION_SURGEON),
                ("modeling_surgeon.py", MODELING_SURGEON),
            ],
        }
    }
}

pub const NEMOTRON_MODEL_TYPE: &str = "nemotron-nas";
pub const SURGEON_MODEL_TYPE: &str = "surgeon";

/// The modeling code shipped with remote-code exports (kept in `formats/python/`).
pub const MODELING_SURGEON: &str = include_str!("../python/modeling_surgeon.py");
pub const CONFIGURATION_SURGEON: &str = include_str!("../python/configuration_surgeon.py");
pub const MODELING_DECILM: &str = include_str!("../python/modeling_decilm.py");
pub const CONFIGURATION_DECILM: &str = include_str!("../python/configuration_decilm.py");

/// An export dialect and the reason it was picked (shown by `surgeon inspect`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExportChoice {
    pub format: ExportFormat,
    pub reason: String,
}

/// Picks the most widely loadable dialect that describes `arch` exactly.
pub fn choose_export(arch: &ModelArch) -> ExportChoice {
    let Some(why_not_native) = why_not_native(arch) else {
        let family = native_family(arch);
        return ExportChoice {
            format: ExportFormat::Native(family),
            reason: match family.is_gemma() {
                true => format!(
                    "every layer is standard, sliding and global ones listed in layer_types: \
                     transformers' {} loads it",
                    family.architecture()
                ),
                false => format!(
                    "every layer is alike and standard: transformers' {} loads it",
                    family.architecture()
                ),
            },
        };
    };
    match why_not_nemotron(arch) {
        None => ExportChoice {
            format: ExportFormat::NemotronNas,
            reason: format!(
                "{why_not_native}; layers differ only in {}, which nemotron-nas block_configs describe",
                nemotron_differences(arch)
            ),
        },
        Some(why_not) => ExportChoice {
            format: ExportFormat::Surgeon,
            reason: format!("{why_not_native}; not nemotron-nas: {why_not}"),
        },
    }
}

/// A uniformly MoE model is exported as its family's MoE class (Mixtral for the Llama-like
/// families, Qwen3-MoE for Qwen3), a dense Qwen3-MoE as Qwen3.
fn native_family(arch: &ModelArch) -> Family {
    match (arch.layers.first().map(|l| &l.mlp), arch.family) {
        (Some(Mlp::Moe { .. }), family) => family.moe_family(),
        (_, Family::Qwen3Moe) => Family::Qwen3,
        (_, family) => family,
    }
}

/// Why no native class describes `arch` (None when one does).
fn why_not_native(arch: &ModelArch) -> Option<String> {
    let family = native_family(arch);
    for (i, l) in arch.layers.iter().enumerate() {
        let a = &l.attention;
        match a.kind {
            AttentionKind::Softmax => {}
            AttentionKind::NoOp => return Some(format!("layer {i} has no attention")),
            AttentionKind::Hedgehog { .. } => {
                return Some(format!("layer {i} has hedgehog linear attention"))
            }
            AttentionKind::Mla { .. } => {}
        }
        let mla = matches!(a.kind, AttentionKind::Mla { .. });
        if mla != (family == Family::DeepseekV3) {
            return Some(format!(
                "layer {i}: latent attention is {}, the family is {}",
                if mla { "present" } else { "absent" },
                family.model_type()
            ));
        }
        if mla {
            if a.qkv_bias || a.qk_norm {
                return Some(format!(
                    "layer {i}: biases or query/key norms in latent attention"
                ));
            }
            if !matches!(l.mlp, Mlp::Dense { .. }) {
                return Some(format!("layer {i}: DeepSeek-V3 export needs dense MLPs"));
            }
            continue;
        }
        if a.v_head_dim != a.head_dim {
            return Some(format!(
                "layer {i}: value head size {} differs from query/key head size {}",
                a.v_head_dim, a.head_dim
            ));
        }
        if a.qkv_bias != (family == Family::Qwen2) {
            return Some(format!(
                "layer {i}: q/k/v biases do not match {}",
                family.model_type()
            ));
        }
        if a.qk_norm != family.has_qk_norm() {
            return Some(format!(
                "layer {i}: query/key norms do not match {}",
                family.model_type()
            ));
        }
        if l.mlp == Mlp::NoOp {
            return Some(format!("layer {i} has no MLP"));
        }
        if a.full_attention && !family.is_gemma() && arch.sliding_window.is_some() {
            return Some(format!(
                "layer {i} attends globally in a sliding-window {} model",
                family.model_type()
            ));
        }
        if let Mlp::Moe { routing, .. } = &l.mlp {
            let native = match family {
                Family::Qwen3Moe => {
                    matches!(routing, MoeRouting::Mixtral | MoeRouting::Unnormalized)
                }
                _ => routing == &MoeRouting::Mixtral,
            };
            if !native {
                return Some(format!(
                    "layer {i}: MoE routing {routing:?} is not {}'s",
                    family.model_type()
                ));
            }
        }
    }
    // Gemma's `layer_types` spell out which layers attend globally; no other class can.
    let same_shapes = match family.is_gemma() {
        true => arch.layers.iter().all(|l| {
            let global = |a: &Attention| Attention {
                full_attention: false,
                ..a.clone()
            };
            global(&l.attention) == global(&arch.layers[0].attention)
        }),
        false => arch.uniform_attention().is_some(),
    };
    if !same_shapes {
        return Some("attention shapes differ between layers".into());
    }
    if arch.uniform_mlp().is_none() {
        return Some("MLPs differ between layers".into());
    }
    None
}

/// Why nemotron-nas cannot describe `arch` (None when it can).
fn why_not_nemotron(arch: &ModelArch) -> Option<String> {
    if !matches!(arch.family, Family::Llama | Family::Mistral) {
        return Some(format!("a {} model", arch.family.model_type()));
    }
    if arch.sliding_window.is_some() {
        return Some("sliding-window attention".into());
    }
    let Some(heads) = global_heads(arch) else {
        return Some("no layer has attention".into());
    };
    for (i, l) in arch.layers.iter().enumerate() {
        let a = &l.attention;
        if !a.is_no_op() {
            if a.kind != AttentionKind::Softmax {
                return Some(format!("layer {i}: attention kind {:?}", a.kind));
            }
            if a.num_heads != heads {
                return Some(format!(
                    "layer {i}: {} query heads where layer attention elsewhere has {heads}",
                    a.num_heads
                ));
            }
            if a.head_dim != arch.hidden_size / heads || a.v_head_dim != a.head_dim {
                return Some(format!(
                    "layer {i}: head sizes q/k {} v/o {} (nemotron-nas needs hidden / heads = {})",
                    a.head_dim,
                    a.v_head_dim,
                    arch.hidden_size / heads
                ));
            }
            if a.qkv_bias {
                return Some(format!("layer {i}: q/k/v biases"));
            }
            if a.num_kv_heads == 0 || heads % a.num_kv_heads != 0 {
                return Some(format!("layer {i}: {} KV heads", a.num_kv_heads));
            }
        }
        match &l.mlp {
            Mlp::Dense { intermediate_size } => {
                if intermediate_size_from_ffn_mult(
                    ffn_mult(*intermediate_size, arch.hidden_size),
                    arch.hidden_size,
                ) != *intermediate_size
                {
                    return Some(format!(
                        "layer {i}: MLP width {intermediate_size} is not a multiple of 256 (block_configs give widths as ffn_mult, rounded up to 256)"
                    ));
                }
            }
            Mlp::Moe { .. } => return Some(format!("layer {i}: a mixture of experts")),
            Mlp::NoOp => {}
        }
    }
    None
}

/// The query head count shared by the layers that have attention.
fn global_heads(arch: &ModelArch) -> Option<usize> {
    arch.layers
        .iter()
        .find(|l| !l.attention.is_no_op())
        .map(|l| l.attention.num_heads)
}

fn nemotron_differences(arch: &ModelArch) -> String {
    let mut what = vec![];
    let first = |f: &dyn Fn(&Layer) -> Option<usize>| {
        let vals: Vec<usize> = arch.layers.iter().filter_map(f).collect();
        vals.windows(2).any(|w| w[0] != w[1])
    };
    if first(&|l| match l.mlp {
        Mlp::Dense { intermediate_size } => Some(intermediate_size),
        _ => None,
    }) {
        what.push("MLP widths");
    }
    if first(&|l| (!l.attention.is_no_op()).then_some(l.attention.num_kv_heads)) {
        what.push("KV groups");
    }
    if arch.layers.iter().any(|l| l.attention.is_no_op()) {
        what.push("no-op attention");
    }
    if arch.layers.iter().any(|l| l.mlp == Mlp::NoOp) {
        what.push("no-op MLP");
    }
    if what.is_empty() {
        what.push("nothing a native class lacks");
    }
    what.join(", ")
}

/// vLLM's (and DeciLM's) rule: `int(2 * ffn_mult * hidden / 3)` rounded up to a multiple of 256.
pub fn intermediate_size_from_ffn_mult(ffn_mult: f64, hidden_size: usize) -> usize {
    // Same operation order as Python's `int(2 * ffn_mult * n_embd / 3)`.
    let n = (2.0 * ffn_mult * hidden_size as f64 / 3.0) as usize;
    n.div_ceil(256) * 256
}

/// The `ffn_mult` that [`intermediate_size_from_ffn_mult`] turns back into `intermediate_size`
/// (when it is a multiple of 256).
pub fn ffn_mult(intermediate_size: usize, hidden_size: usize) -> f64 {
    1.5 * intermediate_size as f64 / hidden_size as f64
}

/// `block_configs` of a nemotron-nas config.json.
pub fn block_configs(arch: &ModelArch) -> Value {
    let heads = global_heads(arch).unwrap_or(1);
    let blocks = arch
        .layers
        .iter()
        .map(|l| {
            let a = &l.attention;
            let attention = if a.is_no_op() {
                json!({"n_heads_in_group": null, "no_op": true, "replace_with_linear": false})
            } else {
                json!({"n_heads_in_group": heads / a.num_kv_heads, "no_op": false, "replace_with_linear": false})
            };
            let ffn = match &l.mlp {
                Mlp::Dense { intermediate_size } => json!({
                    "ffn_mult": ffn_mult(*intermediate_size, arch.hidden_size),
                    "no_op": false,
                    "replace_with_linear": false,
                }),
                Mlp::NoOp => json!({"no_op": true, "replace_with_linear": false}),
                Mlp::Moe { .. } => unreachable!("checked by choose_export"),
            };
            json!({"attention": attention, "ffn": ffn})
        })
        .collect();
    Value::Array(blocks)
}

/// Layers described by a nemotron-nas `block_configs` list.
pub fn layers_from_block_configs(
    path: &Path,
    blocks: &Value,
    num_layers: usize,
    hidden_size: usize,
    num_heads: usize,
    head_dim: usize,
) -> Result<Vec<Layer>> {
    let err = |i: usize, field: &str, m: String| {
        Error::config(path, format!("block_configs[{i}].{field}"), m)
    };
    let blocks = blocks
        .as_array()
        .ok_or_else(|| Error::config(path, "block_configs", "expected a list"))?;
    if blocks.len() != num_layers {
        return Err(Error::config(
            path,
            "block_configs",
            format!(
                "lists {} blocks but num_hidden_layers = {num_layers}",
                blocks.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(num_layers);
    for (i, b) in blocks.iter().enumerate() {
        let section = |name: &str| -> Result<&Map<String, Value>> {
            b.get(name)
                .and_then(Value::as_object)
                .ok_or_else(|| err(i, name, "missing or not an object".into()))
        };
        let (att, ffn) = (section("attention")?, section("ffn")?);
        for (name, s) in [("attention", att), ("ffn", ffn)] {
            if s.get("replace_with_linear").and_then(Value::as_bool) == Some(true) {
                return Err(err(
                    i,
                    &format!("{name}.replace_with_linear"),
                    "linear replacement blocks are not supported".into(),
                ));
            }
            for unsupported in ["sparsify", "window_length", "num_sink_tokens"] {
                if s.get(unsupported).is_some_and(|v| !v.is_null()) {
                    return Err(err(
                        i,
                        &format!("{name}.{unsupported}"),
                        "is not supported".into(),
                    ));
                }
            }
        }
        let no_op = |s: &Map<String, Value>| s.get("no_op").and_then(Value::as_bool) == Some(true);
        let attention = if no_op(att) {
            Attention::no_op(num_heads, head_dim)
        } else {
            let g = att
                .get("n_heads_in_group")
                .and_then(Value::as_u64)
                .ok_or_else(|| err(i, "attention.n_heads_in_group", "missing".into()))?
                as usize;
            if g == 0 || !num_heads.is_multiple_of(g) {
                return Err(err(
                    i,
                    "attention.n_heads_in_group",
                    format!("{g} does not divide num_attention_heads = {num_heads}"),
                ));
            }
            Attention::softmax(num_heads, num_heads / g, head_dim)
        };
        if no_op(ffn) {
            layers.push(Layer {
                attention,
                mlp: Mlp::NoOp,
            });
            continue;
        }
        let intermediate_size = match (
            ffn.get("ffn_mult").and_then(Value::as_f64),
            ffn.get("intermediate_size").and_then(Value::as_u64),
        ) {
            (Some(m), _) => intermediate_size_from_ffn_mult(m, hidden_size),
            (None, Some(n)) => n as usize,
            (None, None) => {
                return Err(err(
                    i,
                    "ffn",
                    "has neither ffn_mult nor intermediate_size".into(),
                ))
            }
        };
        layers.push(Layer {
            attention,
            mlp: Mlp::Dense { intermediate_size },
        });
    }
    Ok(layers)
}
