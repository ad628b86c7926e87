//! Linearising attention (Hedgehog, arXiv 2402.04347; LoLCATs, arXiv 2410.10254): chosen softmax
//! layers become Hedgehog linear attention, optionally the LoLCATs sliding-window hybrid.
//!
//! The projections stay as they are; each converted layer gains, as HazyResearch/lolcats
//! initialises them:
//! - `self_attn.feature_map_q.weight` `[heads, head_dim, feature_dim]`, Kaiming-uniform over the
//!   whole tensor as torch's `kaiming_uniform_` on that shape does (fan-in `head_dim *
//!   feature_dim`, bound `sqrt(6 / fan_in)`), and `feature_map_k.weight` a copy of it (the
//!   reference deep-copies the query map);
//! - with a window, `self_attn.window_factors` `[heads]`, all `logit(0.1)` (the softmax terms start
//!   at weight 0.1).
//!
//! The converted model's function changes: healing (attention transfer, then language modelling)
//! recovers it. Which layers were converted is in the architecture (each layer's attention kind)
//! and the history line.
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use surgeon_formats::plan::{Source, TensorEntry};
use surgeon_formats::{AttentionKind, HostTensor, Plan};

/// `logit(0.1)`, LoLCATs' initial window factor.
pub const INIT_WINDOW_FACTOR: f32 = -2.197_224_6;

/// What to convert and how.
#[derive(Clone, Debug, PartialEq)]
pub struct HedgehogOptions {
    /// Columns of each feature map's `W` (the feature map has twice as many features).
    pub feature_dim: usize,
    /// Keys per query seen by exact softmax (0: linear attention only).
    pub window: usize,
    /// Layers to convert; `None`: every softmax-attention layer.
    pub layers: Option<Vec<usize>>,
    /// Seed of the feature maps' initialisation.
    pub seed: u64,
}

impl Default for HedgehogOptions {
    fn default() -> Self {
        HedgehogOptions {
            feature_dim: 64,
            window: 64,
            layers: None,
            seed: 0,
        }
    }
}

/// The plan with the chosen layers converted to Hedgehog attention.
pub fn to_hedgehog(plan: &Plan, opts: &HedgehogOptions) -> Result<Plan> {
    if opts.feature_dim == 0 {
        return Err(Error::Invalid("`feature_dim` must be at least 1".into()));
    }
    if plan.arch.family.is_gemma() {
        return Err(Error::Invalid(format!(
            "a {} model cannot get Hedgehog attention: its feature maps replace the softmax that \
             Gemma's score soft-capping and query_pre_attn_scalar shape, and no exported class \
             would describe the result",
            plan.arch.family.model_type()
        )));
    }
    if plan.arch.sliding_window.is_some() {
        return Err(Error::Invalid(
            "the model has a `sliding_window`: Hedgehog conversion needs full attention layers"
                .into(),
        ));
    }
    let layers = chosen_layers(plan, opts.layers.as_deref())?;
    let mut out = plan.clone();
    for &l in &layers {
        convert_layer(&mut out, l, opts);
    }
    let window = match opts.window {
        0 => "no window".to_string(),
        w => format!("softmax window {w}"),
    };
    out.arch.surgeon.history.push(format!(
        "convert-attention: hedgehog linear attention (feature_dim {}, {window}) in layers {layers:?}",
        opts.feature_dim
    ));
    out.validate()?;
    Ok(out)
}

/// The layers to convert: the listed ones (each must have softmax attention) or every softmax
/// layer.
fn chosen_layers(plan: &Plan, wanted: Option<&[usize]>) -> Result<Vec<usize>> {
    let arch = &plan.arch;
    let Some(wanted) = wanted else {
        let all: Vec<usize> = (0..arch.num_layers())
            .filter(|&l| arch.layers[l].attention.kind == AttentionKind::Softmax)
            .collect();
        if all.is_empty() {
            return Err(Error::Invalid("no layer has softmax attention".into()));
        }
        return Ok(all);
    };
    if wanted.is_empty() {
        return Err(Error::Invalid("`layers` is empty".into()));
    }
    let mut layers = wanted.to_vec();
    layers.sort_unstable();
    layers.dedup();
    for &l in &layers {
        let Some(layer) = arch.layers.get(l) else {
            return Err(Error::Invalid(format!(
                "`layers` names layer {l}, but the model has {} layers",
                arch.num_layers()
            )));
        };
        if layer.attention.kind != AttentionKind::Softmax {
            return Err(Error::Unsupported {
                layer: l,
                message: format!(
                    "{:?} attention: only softmax attention is linearised",
                    layer.attention.kind
                ),
            });
        }
    }
    Ok(layers)
}

/// Adds layer `l`'s feature maps (and window factors) and marks it Hedgehog.
fn convert_layer(plan: &mut Plan, l: usize, opts: &HedgehogOptions) {
    let a = plan.arch.layers[l].attention.clone();
    let (h, d, f) = (a.num_heads, a.head_dim, opts.feature_dim);
    let p = format!("model.layers.{l}.self_attn");
    let dtype = plan.tensors[&format!("{p}.q_proj.weight")].dtype;
    let seed = opts.seed.wrapping_mul(1_000_003).wrapping_add(l as u64);
    let w = kaiming_uniform(h * d * f, d * f, seed);
    for part in ["feature_map_q", "feature_map_k"] {
        let t = HostTensor::from_f32(vec![h, d, f], &w);
        let entry = TensorEntry {
            source: Source::inline("kaiming uniform (LoLCATs)", t),
            dtype,
        };
        plan.tensors.insert(format!("{p}.{part}.weight"), entry);
    }
    if opts.window > 0 {
        let t = HostTensor::from_f32(vec![h], &vec![INIT_WINDOW_FACTOR; h]);
        let entry = TensorEntry {
            source: Source::inline("logit(0.1) (LoLCATs)", t),
            dtype,
        };
        plan.tensors.insert(format!("{p}.window_factors"), entry);
    }
    plan.arch.layers[l].attention.kind = AttentionKind::Hedgehog {
        feature_dim: f,
        window: opts.window,
    };
}

/// `n` values uniform in `[-b, b)`, `b = sqrt(6 / fan_in)` (torch's `kaiming_uniform_`, a = 0).
pub fn kaiming_uniform(n: usize, fan_in: usize, seed: u64) -> Vec<f32> {
    let bound = (6.0 / fan_in as f64).sqrt() as f32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use surgeon_formats::synthetic::SyntheticSpec;

    #[test]
    fn converts_chosen_layers_as_lolcats_initialises_them() {
        let plan = SyntheticSpec::tiny().plan();
        let opts = HedgehogOptions {
            feature_dim: 8,
            window: 4,
            layers: Some(vec![1]),
            seed: 0,
        };
        let out = to_hedgehog(&plan, &opts).unwrap();
        assert_eq!(out.arch.layers[0].attention.kind, AttentionKind::Softmax);
        let want = AttentionKind::Hedgehog {
            feature_dim: 8,
            window: 4,
        };
        assert_eq!(out.arch.layers[1].attention.kind, want);
        let (sq, q) = out
            .load_f32("model.layers.1.self_attn.feature_map_q.weight")
            .unwrap();
        let (_, k) = out
            .load_f32("model.layers.1.self_attn.feature_map_k.weight")
            .unwrap();
        assert_eq!(sq, [4, 16, 8]);
        assert_eq!(q, k);
        let bound = (6.0f32 / 128.0).sqrt();
        assert!(q.iter().all(|x| x.abs() <= bound));
        assert!(q.iter().any(|x| x.abs() > 0.9 * bound));
        let (_, wf) = out
            .load_f32("model.layers.1.self_attn.window_factors")
            .unwrap();
        let sig = 1.0 / (1.0 + (-wf[0]).exp());
        assert!((sig - 0.1).abs() < 1e-6 && wf.iter().all(|&x| x == wf[0]));
        assert!(!out
            .tensors
            .contains_key("model.layers.0.self_attn.feature_map_q.weight"));
        // The tensor count grows by exactly the new ones.
        assert_eq!(out.tensors.len(), plan.tensors.len() + 3);
        // Converting twice, or a layer that does not exist, is an error naming it.
        let e = to_hedgehog(&out, &opts).err().unwrap().to_string();
        assert!(e.contains("layer 1") && e.contains("Hedgehog"), "{e}");
        let bad = HedgehogOptions {
            layers: Some(vec![7]),
            ..opts
        };
        let e = to_hedgehog(&plan, &bad).err().unwrap().to_string();
        assert!(e.contains("layer 7") && e.contains("2 layers"), "{e}");
    }
}
