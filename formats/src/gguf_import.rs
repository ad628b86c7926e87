//! GGUF file -> plan (Llama family, incl. Mixtral experts; Qwen3, Qwen3-MoE; Phi-3; Gemma 2 and
//! Gemma 3 text).
//!
//! Quantised tensors become lazy `decode` sources (dequantised while writing); llama.cpp's RoPE row
//! permutation of q/k is undone by a row selection, and its Gemma norms (stored as `1 + w`) get 1
//! subtracted, so the plan says exactly what happens.
//!
//! What a Gemma GGUF does not store is what llama.cpp hard-codes, and so do we: the layer pattern
//! (Gemma 2: every 2nd layer global; Gemma 3: every 6th), Gemma 3's local RoPE base 10000, the
//! attention scale (`query_pre_attn_scalar` = head_dim, except hidden / heads for the 27B models,
//! recognised by their layer count as llama.cpp does), Gemma 2's window 4096 and soft-capping
//! 50 / 30 when their keys are absent; Gemma 3 no attention soft-capping, and final soft-capping
//! only from its key (as recent llama.cpp reads it). Phi-3's `attention.sliding_window` is honoured as its
//! checkpoint's config is (llama.cpp currently turns Phi-3's window off, noting that its converter
//! may write a wrong one); Phi-3 LongRoPE files (`rope_factors_*` tensors) are refused.
use crate::arch::*;
use crate::gguf::{self, GgmlType, GgufError, GgufFile, GgufTensorInfo};
use crate::plan::{AuxFile, Codec, Op, Plan, Source, TensorEntry};
use crate::safetensors_file::SourceFile;
use crate::{DType, Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

struct GgmlCodec(GgmlType);

impl Codec for GgmlCodec {
    fn name(&self) -> String {
        format!("{:?}", self.0).to_lowercase()
    }
    fn decode(&self, bytes: &[u8], numel: usize) -> std::result::Result<Vec<f32>, String> {
        gguf::dequantize(self.0, bytes, numel).map_err(|e| e.to_string())
    }
}

fn gguf_err(e: GgufError) -> Error {
    Error::Invalid(e.to_string())
}

fn tensor_source(file: &Arc<SourceFile>, t: &GgufTensorInfo) -> Result<Source> {
    let shape = t.hf_shape();
    let dtype = match t.ggml_type {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    };
    if let Some(dtype) = dtype {
        return Ok(Source::Stored {
            file: file.clone(),
            tensor: t.name.clone(),
            offset: t.offset as usize,
            dtype,
            shape,
        });
    }
    if !gguf::dequant::is_supported(t.ggml_type) {
        return Err(Error::tensor(
            &file.path,
            &t.name,
            format!("unsupported quantisation type {:?}", t.ggml_type),
        ));
    }
    Ok(Source::Encoded {
        file: file.clone(),
        tensor: t.name.clone(),
        offset: t.offset as usize,
        len: t.byte_len as usize,
        shape,
        codec: Arc::new(GgmlCodec(t.ggml_type)),
    })
}

/// Opens a GGUF file as a plan in HF layout.
pub fn plan_from_gguf(path: &Path) -> Result<Plan> {
    let g = GgufFile::open(path).map_err(gguf_err)?;
    let hyper = gguf::LlamaHyper::from_gguf(&g).map_err(gguf_err)?;
    check_full_rotary(path, &hyper)?;
    let file = Arc::new(SourceFile::open(path)?);
    let mut tensors = BTreeMap::new();
    let mut quant_types: BTreeMap<String, usize> = BTreeMap::new();
    for t in g.tensors() {
        *quant_types
            .entry(format!("{:?}", t.ggml_type).to_lowercase())
            .or_default() += 1;
        import_tensor(path, &file, &hyper, t, &mut tensors)?;
    }
    let arch = arch_from_hyper(path, &hyper, &tensors, &quant_types)?;
    // Phi-3's fused qkv_proj / gate_up_proj become row selections, as for its safetensors.
    let tensors = crate::layout::from_stored(path, &arch, tensors)?;
    let plan = Plan {
        arch,
        tensors,
        files: tokenizer_files(&g)?,
        origin: path.display().to_string(),
    };
    plan.validate()?;
    Ok(plan)
}

/// Partial rotary embeddings (RoPE over part of each head) have no HF Llama equivalent.
fn check_full_rotary(path: &Path, hyper: &gguf::LlamaHyper) -> Result<()> {
    if hyper.rope_dimension_count != hyper.head_dim() {
        return Err(Error::config(
            path,
            format!("{}.rope.dimension_count", hyper.architecture),
            format!(
                "{} differs from the head dimension {} (partial rotary embeddings are not supported)",
                hyper.rope_dimension_count,
                hyper.head_dim()
            ),
        ));
    }
    Ok(())
}

/// Adds GGUF tensor `t` to `tensors` under its HF name: q/k rows un-permuted, and a stacked expert
/// tensor split into one entry per expert (HF stores experts separately).
fn import_tensor(
    path: &Path,
    file: &Arc<SourceFile>,
    hyper: &gguf::LlamaHyper,
    t: &GgufTensorInfo,
    tensors: &mut BTreeMap<String, TensorEntry>,
) -> Result<()> {
    let hf = gguf::names::hf_tensor_name_in(&hyper.architecture, &t.name)
        .map_err(|e| Error::tensor(path, &t.name, e.to_string()))?;
    let mut src = tensor_source(file, t)?;
    if is_gemma(hyper) && t.name.ends_with("norm.weight") {
        src = Source::op(Op::AddScalar {
            input: src,
            value: -1.0,
        });
    }
    if let Some(n_head) = hf.rope_heads(hyper) {
        src = unpermute_rope(path, t, src, n_head)?;
    }
    if hf.stacked_experts {
        let shape = t.hf_shape();
        let (experts, inner) = (shape[0], shape[1..].to_vec());
        for e in 0..experts {
            let one = Source::op(Op::Reshape {
                input: src.clone().rows(vec![e], format!("expert {e}")),
                shape: inner.clone(),
            });
            tensors.insert(hf.expert(e), TensorEntry::new(one));
        }
    } else {
        tensors.insert(hf.name.clone(), TensorEntry::new(src));
    }
    Ok(())
}

/// Undoes llama.cpp's interleaving of q/k rows for its RoPE layout, as a row selection.
fn unpermute_rope(path: &Path, t: &GgufTensorInfo, src: Source, n_head: usize) -> Result<Source> {
    let rows = t.hf_shape()[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(Error::tensor(
            path,
            &t.name,
            format!("{rows} rows cannot be split into {n_head} rotary heads"),
        ));
    }
    Ok(src.rows(gguf::names::rope_row_order(rows, n_head), "unpermute rope"))
}

/// Attention and MLP of every layer: Mixtral MoE when the file has more than one expert, else dense.
fn layer_from_hyper(hyper: &gguf::LlamaHyper, qkv_bias: bool) -> (Family, Layer) {
    let attention = Attention {
        kind: AttentionKind::Softmax,
        num_heads: hyper.head_count,
        num_kv_heads: hyper.head_count_kv,
        head_dim: hyper.head_dim(),
        v_head_dim: hyper.head_dim(),
        qkv_bias,
        qk_norm: matches!(hyper.architecture.as_str(), "qwen3" | "qwen3moe" | "gemma3"),
        full_attention: false,
    };
    let (family, mlp) = match (hyper.expert_count, hyper.expert_used_count) {
        // llama.cpp renormalises Qwen3-MoE's top-k weights (norm_topk_prob true) whatever the file says.
        (Some(e), Some(k)) if e > 1 => (
            match hyper.architecture.as_str() {
                "qwen3moe" => Family::Qwen3Moe,
                _ => Family::Mixtral,
            },
            Mlp::Moe {
                num_experts: e,
                top_k: k,
                intermediate_size: hyper
                    .expert_feed_forward_length
                    .unwrap_or(hyper.feed_forward_length),
                routing: MoeRouting::Mixtral,
            },
        ),
        _ => (
            match hyper.architecture.as_str() {
                "qwen3" => Family::Qwen3,
                "gemma2" => Family::Gemma2,
                "gemma3" => Family::Gemma3,
                "phi3" => Family::Phi3,
                _ => Family::Llama,
            },
            Mlp::Dense {
                intermediate_size: hyper.feed_forward_length,
            },
        ),
    };
    (family, Layer { attention, mlp })
}

/// The HF architecture described by the GGUF hyperparameters, with a history line naming the file
/// and its quantisation types.
fn arch_from_hyper(
    path: &Path,
    hyper: &gguf::LlamaHyper,
    tensors: &BTreeMap<String, TensorEntry>,
    quant_types: &BTreeMap<String, usize>,
) -> Result<ModelArch> {
    let qkv_bias = tensors.contains_key("model.layers.0.self_attn.q_proj.bias");
    let (family, layer) = layer_from_hyper(hyper, qkv_bias);
    let mut layers = vec![layer; hyper.block_count];
    let gemma = gemma_params(hyper, &mut layers);
    if qkv_bias {
        return Err(Error::format(
            path,
            "q/k/v biases in a llama GGUF are not supported",
        ));
    }
    let quant = quant_types
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ModelArch {
        family,
        hidden_size: hyper.embedding_length,
        vocab_size: hyper.vocab_size,
        layers,
        rms_norm_eps: hyper.rms_norm_eps,
        rope_theta: hyper.rope_freq_base,
        rope_scaling: gemma.as_ref().and_then(|g| g.rope_scaling.clone()),
        max_position_embeddings: hyper.context_length.unwrap_or(2048),
        tie_word_embeddings: hyper.tie_word_embeddings,
        sliding_window: match &gemma {
            Some(g) => g.sliding_window,
            None => hyper.sliding_window.filter(|&w| w > 0),
        },
        bos_token_id: hyper.bos_token_id,
        eos_token_ids: hyper.eos_token_id.into_iter().collect(),
        pad_token_id: hyper.pad_token_id,
        hidden_act: match &gemma {
            Some(_) => "gelu_pytorch_tanh".into(),
            None => "silu".into(),
        },
        gemma: gemma.map(|g| g.params).unwrap_or_default(),
        torch_dtype: None,
        surgeon: SurgeonMeta {
            history: vec![format!(
                "imported from GGUF {name} ({quant}), dequantised to f32{}",
                match hyper.rope_permuted() {
                    true => ", RoPE rows un-permuted",
                    false => "",
                }
            )],
            ..Default::default()
        },
        extra: Default::default(),
    })
}

fn is_gemma(hyper: &gguf::LlamaHyper) -> bool {
    matches!(hyper.architecture.as_str(), "gemma2" | "gemma3")
}

/// What a Gemma GGUF implies beyond the Llama hyper-parameters.
struct GemmaImport {
    params: GemmaParams,
    sliding_window: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
}

/// Gemma's parameters as llama.cpp reads them (see the module docs), and which `layers` attend
/// globally; `None` for other architectures.
fn gemma_params(hyper: &gguf::LlamaHyper, layers: &mut [Layer]) -> Option<GemmaImport> {
    let gemma2 = match hyper.architecture.as_str() {
        "gemma2" => true,
        "gemma3" => false,
        _ => return None,
    };
    let (pattern, big_layers) = if gemma2 { (2, 46) } else { (6, 62) };
    let sliding_window = match gemma2 {
        true => Some(hyper.sliding_window.unwrap_or(4096)),
        false => hyper.sliding_window.filter(|&w| w > 0),
    };
    for (i, layer) in layers.iter_mut().enumerate() {
        layer.attention.full_attention = sliding_window.is_none() || (i + 1) % pattern == 0;
    }
    let scalar = match hyper.block_count == big_layers {
        true => hyper.embedding_length / hyper.head_count,
        false => hyper.head_dim(),
    };
    let params = GemmaParams {
        query_pre_attn_scalar: Some(scalar as f64),
        attn_logit_softcapping: gemma2.then(|| hyper.attn_logit_softcapping.unwrap_or(50.0)),
        final_logit_softcapping: match gemma2 {
            true => Some(hyper.final_logit_softcapping.unwrap_or(30.0)),
            false => hyper.final_logit_softcapping.filter(|&c| c > 0.0),
        },
        rope_local_theta: (!gemma2).then_some(10000.0),
    };
    let rope_scaling = hyper
        .rope_scaling
        .as_ref()
        .map(|(kind, factor)| serde_json::json!({ "rope_type": kind, "factor": factor }));
    Some(GemmaImport {
        params,
        sliding_window,
        rope_scaling,
    })
}

/// tokenizer.json and friends rebuilt from the GGUF's `tokenizer.ggml.*` metadata, when it has any.
fn tokenizer_files(g: &GgufFile) -> Result<BTreeMap<String, AuxFile>> {
    let mut files = BTreeMap::new();
    if g.get("tokenizer.ggml.model").is_some() {
        let tok = gguf::build_hf_tokenizer(g).map_err(gguf_err)?;
        for (n, text) in [
            ("tokenizer.json", tok.tokenizer_json),
            ("tokenizer_config.json", tok.tokenizer_config_json),
            ("special_tokens_map.json", tok.special_tokens_map_json),
        ] {
            files.insert(n.to_string(), AuxFile::Bytes(Arc::new(text.into_bytes())));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_indices_match_the_in_place_inverse() {
        let (rows, cols, heads) = (12, 3, 2);
        let original: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = original.clone();
        gguf::names::permute_rope_rows(&mut permuted, rows, cols, heads).unwrap();
        let idx = gguf::names::rope_row_order(rows, heads);
        let restored: Vec<f32> = idx
            .iter()
            .flat_map(|&r| permuted[r * cols..(r + 1) * cols].to_vec())
            .collect();
        assert_eq!(restored, original);
    }
}
