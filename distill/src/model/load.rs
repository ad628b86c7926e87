//! Loading a [`Llama`] from a plan: a candle-style [`VarBuilder`] hands each module its tensors by
//! name relative to the module, and records every parameter's full HF name by id ([`ParamNames`]).
use super::{DecoderLayer, Llama, RmsNorm, Rope};
use crate::error::{Error, Result};
use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use surgeon_formats::{AttentionKind, ModelArch, Plan};

/// The HF tensor name of every parameter of a model, by parameter id. Filled in by [`VarBuilder`]
/// while loading; burn's mappers keep ids, so the table stays valid through training.
#[derive(Clone, Debug, Default)]
pub struct ParamNames(Arc<BTreeMap<ParamId, String>>);

impl ParamNames {
    pub fn get(&self, id: &ParamId) -> Option<&str> {
        self.0.get(id).map(String::as_str)
    }

    /// This table with `extra` names added (parameters attached after loading: adapters).
    pub fn with(&self, extra: impl IntoIterator<Item = (ParamId, String)>) -> Self {
        let mut names = (*self.0).clone();
        names.extend(extra);
        ParamNames(Arc::new(names))
    }
}

/// A stable parameter id from an HF tensor name (FNV-1a), so that ids agree across processes and
/// optimizer records survive a reload (resume).
pub fn param_id_for(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

/// Tensors read from the plan, by name, as `(shape, values)`.
type HostMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensors decoded from a plan, handed out once each to the modules that load them.
struct Loader<'d, B: Backend> {
    origin: String,
    host: HostMap,
    device: &'d B::Device,
    names: BTreeMap<ParamId, String>,
}

/// A [`Loader`] seen from one module: names are relative to `prefix` (candle's `VarBuilder::pp`).
pub struct VarBuilder<'l, 'd, B: Backend> {
    loader: &'l mut Loader<'d, B>,
    prefix: String,
}

impl<'d, B: Backend> VarBuilder<'_, 'd, B> {
    /// The builder of the submodule `name`.
    pub fn pp(&mut self, name: &str) -> VarBuilder<'_, 'd, B> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        VarBuilder {
            loader: &mut *self.loader,
            prefix,
        }
    }

    /// The parameter `name` (relative to this builder), with its stable id ([`param_id_for`]).
    pub fn param<const D: usize>(&mut self, name: &str) -> Result<Param<Tensor<B, D>>> {
        let full = format!("{}.{name}", self.prefix);
        let l = &mut *self.loader;
        let (shape, values) = l.host.remove(&full).ok_or_else(|| Error::Mismatch {
            origin: l.origin.clone(),
            message: format!("tensor `{full}` is not among the architecture's tensors"),
        })?;
        let t = Tensor::from_data(TensorData::new(values, shape), l.device);
        let id = param_id_for(&full);
        l.names.insert(id, full);
        Ok(Param::initialized(id, t.require_grad()))
    }
}

fn mismatch(plan: &Plan, message: impl Into<String>) -> Error {
    Error::Mismatch {
        origin: plan.origin.clone(),
        message: message.into(),
    }
}

/// Checks that the runtime supports `arch`.
pub fn check_supported(arch: &ModelArch) -> Result<()> {
    if !surgeon_formats::arch::SUPPORTED_ACTIVATIONS.contains(&arch.hidden_act.as_str()) {
        return Err(Error::Unsupported(format!(
            "hidden_act `{}` (supported: {})",
            arch.hidden_act,
            surgeon_formats::arch::SUPPORTED_ACTIVATIONS.join(", ")
        )));
    }
    if arch.layers.is_empty() {
        return Err(Error::Unsupported("a model without layers".into()));
    }
    for (i, l) in arch.layers.iter().enumerate() {
        let a = &l.attention;
        match a.kind {
            AttentionKind::Softmax | AttentionKind::NoOp => {}
            AttentionKind::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => {
                let bad = kv_lora_rank == 0
                    || qk_rope_head_dim == 0
                    || qk_rope_head_dim % 2 != 0
                    || qk_rope_head_dim > a.head_dim
                    || a.qkv_bias
                    || a.qk_norm;
                if bad {
                    return Err(Error::Unsupported(format!(
                        "layer {i}: latent attention with kv_lora_rank {kv_lora_rank}, \
                         qk_rope_head_dim {qk_rope_head_dim}, head_dim {}{}",
                        a.head_dim,
                        if a.qkv_bias || a.qk_norm {
                            ", biases or query/key norms"
                        } else {
                            ""
                        }
                    )));
                }
            }
            AttentionKind::Hedgehog { feature_dim, .. } => {
                if feature_dim == 0 {
                    return Err(Error::Unsupported(format!(
                        "layer {i}: hedgehog attention with `feature_dim` 0"
                    )));
                }
                if arch.sliding_window.is_some() {
                    return Err(Error::Unsupported(format!(
                        "layer {i}: hedgehog attention in a model with `sliding_window`"
                    )));
                }
            }
        }
        let bad = a.num_kv_heads == 0
            || a.num_heads % a.num_kv_heads != 0
            || a.head_dim == 0
            || a.rope_dim() % 2 != 0
            || a.v_head_dim == 0;
        if !a.is_no_op() && bad {
            return Err(Error::Unsupported(format!(
                "layer {i}: {} query heads, {} kv heads, head_dim {}, v_head_dim {}",
                a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim
            )));
        }
        if let surgeon_formats::Mlp::Moe {
            num_experts, top_k, ..
        } = &l.mlp
        {
            if *top_k == 0 || top_k > num_experts {
                return Err(Error::Unsupported(format!(
                    "layer {i}: top_k {top_k} of {num_experts} experts"
                )));
            }
        }
    }
    Ok(())
}

impl<'d, B: Backend> Loader<'d, B> {
    /// Decodes the tensors `expected` (name, shape) from `plan`, after checking all of them so
    /// that the error lists every problem.
    fn group(&mut self, plan: &Plan, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let mut problems = vec![];
        for (name, shape) in expected {
            match plan.tensors.get(name) {
                None => problems.push(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                )),
                Some(t) if &t.shape() != shape => problems.push(format!(
                    "tensor `{name}` has shape {:?} but the architecture implies {shape:?}",
                    t.shape()
                )),
                _ => {}
            }
        }
        if !problems.is_empty() {
            return Err(mismatch(plan, problems.join("; ")));
        }
        let loaded: HostMap = expected
            .par_iter()
            .map(|(name, shape)| {
                let (s, v) = plan.load_f32(name)?;
                if &s != shape || v.len() != shape.iter().product::<usize>() {
                    return Err(mismatch(
                        plan,
                        format!("tensor `{name}` decoded to shape {s:?}, expected {shape:?}"),
                    ));
                }
                Ok((name.clone(), (s, v)))
            })
            .collect::<Result<_>>()?;
        self.host.extend(loaded);
        Ok(())
    }

    fn root(&mut self, prefix: &str) -> VarBuilder<'_, 'd, B> {
        VarBuilder {
            loader: self,
            prefix: prefix.to_string(),
        }
    }
}

impl<B: Backend> Llama<B> {
    /// Loads a model from `plan` (tensors in any stored dtype are decoded to f32, no temporary files).
    /// Missing tensors or shapes that disagree with the architecture give [`Error::Mismatch`];
    /// features the runtime lacks give [`Error::Unsupported`].
    pub fn from_plan(plan: &Plan, device: &B::Device) -> Result<Self> {
        let arch = &plan.arch;
        check_supported(arch)?;
        let (h, v) = (arch.hidden_size, arch.vocab_size);
        let mut ld = Loader::<B> {
            origin: plan.origin.clone(),
            host: HostMap::new(),
            device,
            names: BTreeMap::new(),
        };
        let mut top = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !arch.tie_word_embeddings {
            top.push(("lm_head.weight".into(), vec![v, h]));
        }
        ld.group(plan, &top)?;
        let embed_tokens = ld.root("model.embed_tokens").param("weight")?;
        let norm = RmsNorm::load_for(&mut ld.root("model.norm"), arch)?;
        let lm_head = match arch.tie_word_embeddings {
            true => None,
            false => Some(ld.root("lm_head").param("weight")?),
        };
        let mut layers = Vec::with_capacity(arch.layers.len());
        let mut rope = Vec::with_capacity(arch.layers.len());
        for (i, l) in arch.layers.iter().enumerate() {
            // One layer's tensors at a time bounds the host memory held.
            ld.group(plan, &arch.layer_tensors(i))?;
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer::load(&mut ld.root(&p), l, arch)?);
            rope.push(layer_rope(arch, i)?);
        }
        let embed_dtype = plan.tensors["model.embed_tokens.weight"].dtype;
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            embed_scale: arch
                .family
                .is_gemma()
                .then(|| super::embed_scale(h, embed_dtype)),
            final_softcap: arch.gemma.final_logit_softcapping,
            names: ParamNames(Arc::new(ld.names)),
            compute: None,
        })
    }

    /// Decoder layer `i` of `plan` alone (a block to swap into another model of the same hidden
    /// size, e.g. one variant of a block library), with its rotary table.
    pub fn layer_from_plan(
        plan: &Plan,
        i: usize,
        device: &B::Device,
    ) -> Result<(DecoderLayer<B>, Rope)> {
        let arch = &plan.arch;
        check_supported(arch)?;
        let l = arch
            .layers
            .get(i)
            .ok_or_else(|| mismatch(plan, format!("no layer {i}")))?;
        let mut ld = Loader::<B> {
            origin: plan.origin.clone(),
            host: HostMap::new(),
            device,
            names: BTreeMap::new(),
        };
        ld.group(plan, &arch.layer_tensors(i))?;
        let layer = DecoderLayer::load(&mut ld.root(&format!("model.layers.{i}")), l, arch)?;
        Ok((layer, layer_rope(arch, i)?))
    }
}

/// The rotary frequencies of layer `i` (over its rotary features: all of a head, or an MLA layer's
/// `qk_rope_head_dim`): the model's `rope_theta` and `rope_scaling`, or for a
/// sliding layer of a model with a local base (Gemma 3) that base, unscaled.
fn layer_rope(arch: &ModelArch, i: usize) -> Result<Rope> {
    let a = &arch.layers[i].attention;
    let max = arch.max_position_embeddings;
    match arch.gemma.rope_local_theta {
        Some(local) if !a.full_attention => Rope::new(a.rope_dim(), local, None, max),
        _ => Rope::new(
            a.rope_dim(),
            arch.rope_theta,
            arch.rope_scaling.as_ref(),
            max,
        ),
    }
}
