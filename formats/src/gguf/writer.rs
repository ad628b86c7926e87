//! Writing a plan as a GGUF file that llama.cpp runs (`general.architecture = llama`).
//!
//! * Metadata: the `llama.*` hyper-parameters, `general.file_type`, the tokenizer
//!   (`tokenizer.ggml.model = gpt2`: tokens, token types, merges, the pre-tokenizer name, special token
//!   ids, `add_bos_token`) and `tokenizer.chat_template`.
//! * Tensors: llama.cpp names; q/k rows permuted again for llama.cpp's interleaved RoPE
//!   ([`super::names::rope_row_order`]); 1-D tensors in F32, matrices in the chosen type (F32, F16,
//!   BF16, Q8_0, Q4_0, Q4_1; a matrix whose rows are not whole 32-value blocks falls back to F16).
//! * The file is written to a temporary sibling, synced and renamed into place; an existing file is
//!   replaced only with `force`, never when it is one of the plan's inputs.
//!
//! Not covered (a clear error): MoE layers, layers of different shapes, q/k/v biases, non-softmax
//! attention, `rope_scaling`, SentencePiece-style tokenizers, k-quants and i-quants.
use super::names::rope_row_order;
use super::quant;
use super::reader::{GgmlType, GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::arch::{AttentionKind, Family, Mlp};
use crate::plan::Plan;
use crate::{DType, Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The element type of the exported matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl ExportType {
    pub const NAMES: &'static [&'static str] = &["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "bf16" => ExportType::BF16,
            "q8_0" => ExportType::Q8_0,
            "q4_0" => ExportType::Q4_0,
            "q4_1" => ExportType::Q4_1,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::BF16 => GgmlType::BF16,
            ExportType::Q8_0 => GgmlType::Q8_0,
            ExportType::Q4_0 => GgmlType::Q4_0,
            ExportType::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// llama.cpp's `llama_ftype` (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q4_1 => 3,
            ExportType::Q8_0 => 7,
            ExportType::BF16 => 32,
        }
    }
}

impl std::str::FromStr for ExportType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ExportType::parse(s).ok_or_else(|| {
            format!(
                "unknown GGUF type `{s}` (supported: {}; k-quants such as q4_k_m are not)",
                ExportType::NAMES.join(", ")
            )
        })
    }
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub ty: ExportType,
    /// Replace an existing output file.
    pub force: bool,
    /// llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`); detected from tokenizer.json when `None`.
    pub pre: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            ty: ExportType::F16,
            force: false,
            pre: None,
            name: None,
            progress: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExportReport {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    /// How many tensors of each ggml type.
    pub types: BTreeMap<String, usize>,
    /// The pre-tokenizer name written.
    pub pre: Option<String>,
    /// What the export could not carry (informational).
    pub notes: Vec<String>,
}

/// One tensor to write: its GGUF name, HF name, HF shape, type and RoPE heads (for q/k).
#[derive(Clone, Debug)]
struct Planned {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    ty: GgmlType,
    rope_heads: Option<usize>,
    bytes: u64,
}

/// The llama.cpp name of an HF Llama tensor and whether it is q (`Some(true)`) or k (`Some(false)`).
pub fn gguf_tensor_name(hf: &str) -> Option<(String, Option<bool>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let (layer, rest) = crate::arch::split_layer_name(hf)?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    let (g, rope) = match stem {
        "self_attn.q_proj" => ("attn_q", Some(true)),
        "self_attn.k_proj" => ("attn_k", Some(false)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{g}.{suffix}"), rope))
}

fn unsupported(plan: &Plan, what: String) -> Error {
    Error::invalid(format!("{}: cannot export to GGUF: {what}", plan.origin))
}

/// Checks that llama.cpp's `llama` architecture can hold the plan.
fn check_supported(plan: &Plan) -> Result<()> {
    let a = &plan.arch;
    if !matches!(a.family, Family::Llama | Family::Mistral) {
        return Err(unsupported(
            plan,
            format!(
                "family `{}` (supported: llama, mistral)",
                a.family.model_type()
            ),
        ));
    }
    let att = a.uniform_attention().ok_or_else(|| {
        unsupported(
            plan,
            "layers have different attention shapes (llama.cpp needs one)".into(),
        )
    })?;
    if att.kind != AttentionKind::Softmax {
        return Err(unsupported(plan, "non-softmax attention".into()));
    }
    if att.qkv_bias {
        return Err(unsupported(plan, "q/k/v biases".into()));
    }
    if att.v_head_dim != att.head_dim {
        return Err(unsupported(
            plan,
            format!(
                "value head size {} differs from query/key head size {}",
                att.v_head_dim, att.head_dim
            ),
        ));
    }
    match a.uniform_mlp() {
        Some(Mlp::Dense { .. }) => {}
        Some(Mlp::Moe { .. }) => return Err(unsupported(plan, "MoE layers".into())),
        Some(Mlp::NoOp) => return Err(unsupported(plan, "layers without an MLP".into())),
        None => {
            return Err(unsupported(
                plan,
                "layers have different MLP shapes (llama.cpp needs one)".into(),
            ))
        }
    }
    if a.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(plan, "rope_scaling".into()));
    }
    if a.hidden_act != "silu" {
        return Err(unsupported(plan, format!("hidden_act `{}`", a.hidden_act)));
    }
    if a.sliding_window.is_some() {
        return Err(unsupported(plan, "sliding-window attention".into()));
    }
    Ok(())
}

fn plan_tensors(plan: &Plan, ty: ExportType, notes: &mut Vec<String>) -> Result<Vec<Planned>> {
    let att = plan.arch.uniform_attention().expect("checked");
    let mut out = vec![];
    let mut fallback = 0;
    for name in plan.ordered_names() {
        let (gguf, rope) = gguf_tensor_name(name).ok_or_else(|| {
            unsupported(
                plan,
                format!("tensor `{name}` has no llama.cpp counterpart"),
            )
        })?;
        let shape = plan.tensors[name].shape();
        let cols = shape.last().copied().unwrap_or(1);
        let mut t = if shape.len() == 1 {
            GgmlType::F32
        } else {
            ty.ggml()
        };
        if !cols.is_multiple_of(t.block_layout().0) {
            t = GgmlType::F16;
            fallback += 1;
        }
        let n: u64 = shape.iter().product::<usize>() as u64;
        out.push(Planned {
            bytes: t.byte_len(n).expect("whole blocks"),
            gguf,
            hf: name.clone(),
            shape,
            ty: t,
            rope_heads: rope.map(|q| if q { att.num_heads } else { att.num_kv_heads }),
        });
    }
    if fallback > 0 {
        notes.push(format!(
            "{fallback} matrices whose rows are not whole 32-value blocks are stored as F16"
        ));
    }
    Ok(out)
}

fn model_metadata(plan: &Plan, opts: &ExportOptions) -> Vec<(String, GgufValue)> {
    let a = &plan.arch;
    let att = a.uniform_attention().expect("checked");
    let ff = match a.uniform_mlp() {
        Some(Mlp::Dense { intermediate_size }) => *intermediate_size,
        _ => unreachable!("checked"),
    };
    let s = |v: &str| GgufValue::String(v.to_string());
    let u = |v: usize| GgufValue::U32(v as u32);
    let name = opts.name.clone().unwrap_or_else(|| {
        Path::new(&plan.origin)
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| "model".into())
    });
    let mut m = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".into(), s(&name)),
        (
            "general.file_type".into(),
            GgufValue::U32(opts.ty.file_type()),
        ),
    ];
    if matches!(
        opts.ty,
        ExportType::Q8_0 | ExportType::Q4_0 | ExportType::Q4_1
    ) {
        m.push(("general.quantization_version".into(), GgufValue::U32(2)));
    }
    m.extend([
        ("llama.context_length".into(), u(a.max_position_embeddings)),
        ("llama.embedding_length".into(), u(a.hidden_size)),
        ("llama.block_count".into(), u(a.num_layers())),
        ("llama.feed_forward_length".into(), u(ff)),
        ("llama.attention.head_count".into(), u(att.num_heads)),
        ("llama.attention.head_count_kv".into(), u(att.num_kv_heads)),
        (
            "llama.rope.freq_base".into(),
            GgufValue::F32(a.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(a.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u(att.head_dim)),
        ("llama.vocab_size".into(), u(a.vocab_size)),
    ]);
    if att.head_dim * att.num_heads != a.hidden_size {
        m.push(("llama.attention.key_length".into(), u(att.head_dim)));
        m.push(("llama.attention.value_length".into(), u(att.head_dim)));
    }
    m
}

/// The pre-tokenizer JSON reduced to what decides the splits: each step's type, regex, digit
/// handling and whether ByteLevel uses its own regex.
fn pre_signature(v: &Value) -> Vec<String> {
    let steps: Vec<&Value> = match v.get("type").and_then(Value::as_str) {
        Some("Sequence") => v["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![v],
    };
    steps
        .iter()
        .map(|s| {
            let ty = s["type"].as_str().unwrap_or("?");
            match ty {
                "Split" => format!("Split {}", s["pattern"]["Regex"].as_str().unwrap_or("?")),
                "Digits" => format!("Digits {}", s["individual_digits"]),
                "ByteLevel" => format!("ByteLevel {}", s["use_regex"]),
                other => other.to_string(),
            }
        })
        .collect()
}

/// llama.cpp's pre-tokenizer name for a tokenizer.json pre-tokenizer, among those surgeon knows.
pub fn detect_pre(pre_tokenizer: &Value) -> Option<&'static str> {
    let want = pre_signature(pre_tokenizer);
    ["smollm", "llama-bpe", "qwen2", "gpt2"]
        .into_iter()
        .find(|n| {
            super::tokenizer::gpt2_pre_tokenizer(n).is_some_and(|v| pre_signature(&v) == want)
        })
}

fn read_json(plan: &Plan, name: &str) -> Result<Option<Value>> {
    let Some(f) = plan.files.get(name) else {
        return Ok(None);
    };
    let bytes = f.read()?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::invalid(format!("{}: {name}: not valid JSON: {e}", plan.origin)))
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from the plan's tokenizer files.
fn tokenizer_metadata(
    plan: &Plan,
    opts: &ExportOptions,
    notes: &mut Vec<String>,
) -> Result<(Vec<(String, GgufValue)>, Option<String>)> {
    let bad = |m: String| Error::invalid(format!("{}: tokenizer.json: {m}", plan.origin));
    let tok = read_json(plan, "tokenizer.json")?.ok_or_else(|| {
        unsupported(
            plan,
            "the model has no tokenizer.json (llama.cpp needs the tokenizer)".into(),
        )
    })?;
    let model = &tok["model"];
    if model["type"].as_str().unwrap_or("BPE") != "BPE" || model.get("merges").is_none() {
        return Err(bad("only BPE tokenizers are exported".into()));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad(
            "SentencePiece-style BPE (byte fallback) is not exported yet; byte-level BPE is".into(),
        ));
    }
    // Tokens by id: the BPE vocabulary, then added tokens, padded to the embedding rows.
    let n = plan.arch.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let mut put = |id: u64, t: &str, ty: i32| -> Result<()> {
        let i = id as usize;
        if i >= n {
            return Err(bad(format!(
                "token {t:?} has id {id}, outside the {n} embedding rows"
            )));
        }
        tokens[i] = Some(t.to_string());
        types[i] = ty;
        Ok(())
    };
    for (t, id) in model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no vocab".into()))?
    {
        put(
            id.as_u64().ok_or_else(|| bad(format!("id of {t:?}")))?,
            t,
            1,
        )?;
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad(format!("bad added token {a}")));
        };
        let special = a["special"].as_bool().unwrap_or(false);
        put(id, t, if special { 3 } else { 4 })?;
    }
    let mut padded = 0;
    let tokens: Vec<GgufValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            GgufValue::String(t.unwrap_or_else(|| {
                padded += 1;
                types[i] = 5; // UNUSED
                format!("[PAD{i}]")
            }))
        })
        .collect();
    if padded > 0 {
        notes.push(format!(
            "{padded} embedding rows without a token are named [PAD<id>]"
        ));
    }
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(bad(format!("bad merge {other}"))),
        })
        .map(|m| m.map(GgufValue::String))
        .collect::<Result<_>>()?;
    let pre = match &opts.pre {
        Some(p) => p.clone(),
        None => match detect_pre(&tok["pre_tokenizer"]) {
            Some(p) => p.to_string(),
            None => {
                notes.push(
                    "pre-tokenizer not recognised: wrote `default` (give `pre` NAME to choose)"
                        .into(),
                );
                "default".into()
            }
        },
    };
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.clone())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(merges)),
    ];
    let cfg = read_json(plan, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let a = &plan.arch;
    let vocab = model["vocab"].as_object();
    let id_of = |key: &str| -> Option<u32> {
        let t = cfg[key].as_str().or_else(|| cfg[key]["content"].as_str())?;
        let from_added = tok["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["content"].as_str() == Some(t))
            .and_then(|x| x["id"].as_u64());
        from_added
            .or_else(|| vocab?.get(t)?.as_u64())
            .map(|v| v as u32)
    };
    let ids = [
        ("bos", a.bos_token_id.or_else(|| id_of("bos_token"))),
        (
            "eos",
            a.eos_token_ids
                .first()
                .copied()
                .or_else(|| id_of("eos_token")),
        ),
        ("padding", a.pad_token_id.or_else(|| id_of("pad_token"))),
        ("unknown", id_of("unk_token")),
    ];
    for (k, id) in ids {
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{k}_token_id"), GgufValue::U32(id)));
        }
    }
    if let Some(b) = cfg["add_bos_token"].as_bool() {
        m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
    }
    if let Some(b) = cfg["add_eos_token"].as_bool() {
        m.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(b)));
    }
    match chat_template(plan, &cfg)? {
        Some(t) => m.push(("tokenizer.chat_template".into(), GgufValue::String(t))),
        None => notes.push("no chat template".into()),
    }
    Ok((m, Some(pre)))
}

/// The chat template: `chat_template.jinja`, else tokenizer_config.json's `chat_template` (a string,
/// or the one named `default` in a list).
fn chat_template(plan: &Plan, cfg: &Value) -> Result<Option<String>> {
    if let Some(f) = plan.files.get("chat_template.jinja") {
        return Ok(Some(String::from_utf8_lossy(&f.read()?).into_owned()));
    }
    Ok(match &cfg["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of strings (its type does not matter).
            out.extend(items.first().map(value_type).unwrap_or(8).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

/// The header: magic, version 3, counts, metadata, tensor infos, padding to the data section.
fn header(meta: &[(String, GgufValue)], tensors: &[Planned]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(GGUF_MAGIC);
    h.extend(3u32.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut h, k);
        h.extend(value_type(v).to_le_bytes());
        put_value(&mut h, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut h, &t.gguf);
        h.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend((*d as u64).to_le_bytes());
        }
        h.extend(t.ty.id().to_le_bytes());
        h.extend(offset.to_le_bytes());
        offset = align(offset + t.bytes);
    }
    h.resize(align(h.len() as u64) as usize, 0);
    h
}

/// The bytes of one tensor in its GGUF type, q/k rows in llama.cpp's order.
fn encode(plan: &Plan, t: &Planned) -> Result<Vec<u8>> {
    let entry = &plan.tensors[&t.hf];
    let host = entry.materialize()?;
    let rows = t.shape[0];
    let permute = |bytes: Vec<u8>, row_bytes: usize| -> Vec<u8> {
        let Some(heads) = t.rope_heads else {
            return bytes;
        };
        let mut out = vec![0u8; bytes.len()];
        // order[hf_row] = gguf_row
        for (hf_row, gguf_row) in rope_row_order(rows, heads).into_iter().enumerate() {
            out[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]
                .copy_from_slice(&bytes[hf_row * row_bytes..(hf_row + 1) * row_bytes]);
        }
        out
    };
    if let Some(heads) = t.rope_heads {
        if heads == 0 || !rows.is_multiple_of(2 * heads) {
            return Err(Error::invalid(format!(
                "{}: tensor `{}`: {rows} rows cannot be split into {heads} rotary heads",
                plan.origin, t.hf
            )));
        }
    }
    let cols = host.numel() / rows.max(1);
    let dtype = match t.ty {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    };
    if let Some(d) = dtype {
        let host = host.cast(d);
        return Ok(permute(host.data, cols * d.size()));
    }
    let values = permute(host.cast(DType::F32).data, cols * 4);
    let values: Vec<f32> = bytemuck::pod_collect_to_vec(&values);
    quant::quantize(t.ty, &values).ok_or_else(|| {
        Error::invalid(format!(
            "{}: tensor `{}`: cannot quantise to {}",
            plan.origin, t.hf, t.ty
        ))
    })
}

/// Refuses an output that is a directory, an input of the plan, or an existing file without `force`.
fn check_output(plan: &Plan, out: &Path, force: bool) -> Result<()> {
    let err = |m: &str| Error::Output {
        path: out.to_path_buf(),
        message: m.to_string(),
    };
    if out.is_dir() {
        return Err(err("is a directory (give a file name ending in .gguf)"));
    }
    if out.exists() {
        let canon = out.canonicalize().map_err(|e| Error::io(out, e))?;
        let is_input = crate::load::input_files(plan)
            .iter()
            .any(|f| f.canonicalize().is_ok_and(|c| c == canon));
        if is_input {
            return Err(err(
                "is an input of this export (never overwritten, even with `force`)",
            ));
        }
        if !force {
            return Err(err("already exists (use `force` to replace it)"));
        }
    }
    Ok(())
}

/// Writes `plan` as a GGUF file at `out`.
pub fn export_gguf(plan: &Plan, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    plan.validate()?;
    check_supported(plan)?;
    check_output(plan, out, opts.force)?;
    let mut notes = vec![];
    let tensors = plan_tensors(plan, opts.ty, &mut notes)?;
    let mut meta = model_metadata(plan, opts);
    let (tok_meta, pre) = tokenizer_metadata(plan, opts, &mut notes)?;
    meta.extend(tok_meta);
    let head = header(&meta, &tensors);

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Output {
            path: out.to_path_buf(),
            message: "has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = TempFile(parent.join(format!(".{file_name}.surgeon-tmp-{}", std::process::id())));
    let file = std::fs::File::create(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(&tmp.0, e);
    w.write_all(&head).map_err(io)?;
    let total: u64 = tensors.iter().map(|t| t.bytes).sum();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} export-gguf [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut written = head.len() as u64;
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tensors {
        let bytes = encode(plan, t)?;
        debug_assert_eq!(bytes.len() as u64, t.bytes);
        w.write_all(&bytes).map_err(io)?;
        let pad = align(t.bytes) - t.bytes;
        w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        written += t.bytes + pad;
        *types.entry(t.ty.to_string()).or_default() += 1;
        bar.inc(t.bytes);
    }
    bar.finish_and_clear();
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp.0, out).map_err(|e| Error::io(out, e))?;
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(ExportReport {
        path: out.to_path_buf(),
        tensors: tensors.len(),
        bytes: written,
        types,
        pre,
        notes,
    })
}

/// Removes the temporary file unless it was renamed into place.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_invert_the_importer() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.self_attn.q_proj.weight",
            "model.layers.7.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.3.mlp.gate_proj.weight",
            "model.layers.3.mlp.up_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            let (g, rope) = gguf_tensor_name(hf).unwrap();
            let back = super::super::hf_tensor_name(&g).unwrap();
            assert_eq!(back.name, hf);
            assert_eq!(back.rope.is_some(), rope.is_some(), "{hf}");
        }
        assert!(gguf_tensor_name("model.layers.0.block_sparse_moe.gate.weight").is_none());
    }

    #[test]
    fn pre_tokenizers_are_recognised() {
        for n in ["smollm", "llama-bpe", "qwen2", "gpt2"] {
            let v = super::super::tokenizer::gpt2_pre_tokenizer(n).unwrap();
            assert_eq!(detect_pre(&v), Some(n));
        }
        assert_eq!(detect_pre(&serde_json::json!({"type": "Whitespace"})), None);
    }

    #[test]
    fn types_parse() {
        for n in ExportType::NAMES {
            assert_eq!(
                ExportType::parse(n)
                    .unwrap()
                    .ggml()
                    .to_string()
                    .to_lowercase(),
                *n
            );
        }
        let e = "q4_k_m".parse::<ExportType>().unwrap_err();
        assert!(e.contains("not"), "{e}");
    }
}
