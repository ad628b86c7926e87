//! The block library (Puzzle, arXiv 2411.19146): for every layer, variants of its attention
//! (kept, fewer KV groups, skipped) and of its MLP (100/75/50/25 % of the neurons, skipped), each
//! scored by swapping only that half into the parent and measuring KL(parent || variant) on the
//! calibration tokens, starting from the parent's cached input of that layer. A layer option is
//! an (attention, MLP) pair: its score is the sum of its halves' (additive scores), its parameters
//! exact, its latency the measured layer time of each half's variant.
use crate::error::{invalid, Result};
use crate::prune::{prune, AttentionSpec, LayerSpec, MlpSpec, PruneSpec};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::model::{log_softmax, Llama};
use surgeon_formats::{ImportanceScores, ModelArch, Plan};

/// One choice for one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockOption {
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
    /// Additive score: KL of the attention variant alone plus KL of the MLP variant alone (nats
    /// per token; 0 for the parent's block).
    pub kl: f64,
    /// Parameters of the layer.
    pub params: u64,
    /// Seconds per calibration pass of the layer (measured per half, summed).
    pub latency: f64,
}

/// Per layer its options (option 0 is the parent's block), and the parameters outside layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockLibrary {
    pub fixed_params: u64,
    pub layers: Vec<Vec<BlockOption>>,
}

impl BlockLibrary {
    /// The spec of one choice per layer (`genes[l]` indexes `layers[l]`); all layers kept.
    pub fn spec(&self, hidden_size: usize, genes: &[u8]) -> PruneSpec {
        PruneSpec {
            hidden_size,
            layers: genes
                .iter()
                .enumerate()
                .map(|(l, &g)| {
                    let o = &self.layers[l][g as usize];
                    LayerSpec {
                        source: l,
                        attention: o.attention,
                        mlp: o.mlp,
                    }
                })
                .collect(),
        }
    }

    /// `(additive KL, parameters, latency)` of one choice per layer.
    pub fn objectives(&self, genes: &[u8]) -> (f64, u64, f64) {
        let mut out = (0.0, self.fixed_params, 0.0);
        for (l, &g) in genes.iter().enumerate() {
            let o = &self.layers[l][g as usize];
            out.0 += o.kl;
            out.1 += o.params;
            out.2 += o.latency;
        }
        out
    }

    /// Parameters of the smallest sub-network the library can build.
    pub fn min_params(&self) -> u64 {
        self.fixed_params
            + self
                .layers
                .iter()
                .map(|o| o.iter().map(|x| x.params).min().unwrap_or(0))
                .sum::<u64>()
    }
}

/// The attention variants of a layer: kept, then 1 fewer KV group down to 1, then skipped.
fn attention_variants(parent: &LayerSpec) -> Vec<AttentionSpec> {
    let mut v = vec![parent.attention];
    if let AttentionSpec::Heads {
        kv_heads,
        heads_per_group,
    } = parent.attention
    {
        v.extend((1..kv_heads).rev().map(|g| AttentionSpec::Heads {
            kv_heads: g,
            heads_per_group,
        }));
        v.push(AttentionSpec::NoOp);
    }
    v
}

/// The MLP variants of a layer: 100, 75, 50, 25 % of the neurons (distinct, at least 1), skipped.
fn mlp_variants(parent: &LayerSpec) -> Vec<MlpSpec> {
    let mut v = vec![parent.mlp];
    if let MlpSpec::Dense { intermediate_size } = parent.mlp {
        for pct in [75, 50, 25] {
            let w = (intermediate_size * pct / 100).max(1);
            let m = MlpSpec::Dense {
                intermediate_size: w,
            };
            if !v.contains(&m) {
                v.push(m);
            }
        }
        v.push(MlpSpec::NoOp);
    }
    v
}

/// Parent forward state shared by every variant: each window's input of every layer and the
/// parent's log-probabilities.
struct Cache<B: Backend> {
    /// `inputs[w][l]`: hidden states entering layer `l` in window `w`.
    inputs: Vec<Vec<Tensor<B, 3>>>,
    logp: Vec<Tensor<B, 3>>,
}

fn cache<B: Backend>(model: &Llama<B>, windows: &[&[u32]]) -> Cache<B> {
    let device = model.device();
    let n = model.layers.len();
    let mut c = Cache {
        inputs: vec![],
        logp: vec![],
    };
    for w in windows {
        let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, w.len()]), &device);
        let mut x = model.embed(t);
        let mut ins = Vec::with_capacity(n);
        for l in 0..n {
            ins.push(x.clone());
            x = model.layers_forward(x, l..l + 1, None);
        }
        c.logp
            .push(log_softmax(model.logits(model.norm.forward(x)), 2));
        c.inputs.push(ins);
    }
    c
}

/// Mean KL(parent || model) per token over the windows, given the parent's log-probabilities.
pub fn kl_per_token<B: Backend>(parent_logp: &Tensor<B, 3>, logits: Tensor<B, 3>) -> f64 {
    let [b, t, _] = logits.dims();
    let q = log_softmax(logits, 2);
    let p = parent_logp.clone();
    let kl = (p.clone().exp() * (p - q)).sum();
    kl.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64")[0]
        / (b * t) as f64
}

/// KL of `model` (the parent with layer `l` swapped) from layer `l`'s cached input, and the
/// seconds layer `l` took.
fn swapped_kl<B: Backend>(model: &Llama<B>, l: usize, c: &Cache<B>) -> (f64, f64) {
    let n = model.layers.len();
    let (mut kl, mut secs) = (0.0, 0.0);
    for (ins, logp) in c.inputs.iter().zip(&c.logp) {
        let start = Instant::now();
        let y = model.layers_forward(ins[l].clone(), l..l + 1, None);
        let _ = y.clone().into_data();
        secs += start.elapsed().as_secs_f64();
        let x = model.layers_forward(y, l + 1..n, None);
        kl += kl_per_token(logp, model.logits(model.norm.forward(x)));
    }
    (kl / c.logp.len() as f64, secs)
}

/// Builds the block library of `plan` (every layer dense and attended, or already skipped) on
/// calibration `windows`, extracting each variant with [`prune`] by `scores`. `progress` is
/// called after each layer with (layers done, layers).
pub fn build_library<B: Backend>(
    plan: &Plan,
    scores: &ImportanceScores,
    windows: &[&[u32]],
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BlockLibrary> {
    if windows.is_empty() {
        return invalid("no calibration windows to score blocks on");
    }
    let parent = &plan.arch;
    let model = Llama::<B>::from_plan(plan, device)?;
    let c = cache(&model, windows);
    let base = PruneSpec::parent(parent);
    let n = parent.num_layers();
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let p = base.layers[l];
        let (_, t0) = swapped_kl(&model, l, &c);
        let score = |spec_layer: LayerSpec| -> Result<(f64, f64)> {
            let mut spec = base.clone();
            spec.layers[l] = spec_layer;
            let sub = prune(plan, &spec, Some(scores))?;
            let (layer, rope) = Llama::<B>::layer_from_plan(&sub, l, device)?;
            let mut m = model.clone();
            m.layers[l] = layer;
            m.rope[l] = rope;
            Ok(swapped_kl(&m, l, &c))
        };
        let mut att = vec![];
        for a in attention_variants(&p) {
            att.push(match a == p.attention {
                true => (a, 0.0, t0),
                false => {
                    let (kl, t) = score(LayerSpec { attention: a, ..p })?;
                    (a, kl, t)
                }
            });
        }
        let mut mlp = vec![];
        for m in mlp_variants(&p) {
            mlp.push(match m == p.mlp {
                true => (m, 0.0, t0),
                false => {
                    let (kl, t) = score(LayerSpec { mlp: m, ..p })?;
                    (m, kl, t)
                }
            });
        }
        layers.push(combine(parent, l, &att, &mlp, t0));
        progress(l + 1, n);
    }
    Ok(BlockLibrary {
        fixed_params: fixed_params(parent),
        layers,
    })
}

/// Every (attention, MLP) pair of a layer: KL and latency add up, parameters are exact.
fn combine(
    parent: &ModelArch,
    l: usize,
    att: &[(AttentionSpec, f64, f64)],
    mlp: &[(MlpSpec, f64, f64)],
    t0: f64,
) -> Vec<BlockOption> {
    let mut out = vec![];
    for &(a, ka, ta) in att {
        for &(m, km, tm) in mlp {
            let spec = LayerSpec {
                source: l,
                attention: a,
                mlp: m,
            };
            out.push(BlockOption {
                attention: a,
                mlp: m,
                kl: ka + km,
                params: layer_params(parent, &spec),
                latency: (ta + tm - t0).max(0.0),
            });
        }
    }
    out
}

/// Parameters of one layer of a sub-network.
pub fn layer_params(parent: &ModelArch, s: &LayerSpec) -> u64 {
    let one = PruneSpec {
        hidden_size: parent.hidden_size,
        layers: vec![*s],
    };
    one.parameter_count(parent) - fixed_params(parent)
}

/// Parameters outside the decoder layers (embeddings, final norm, lm_head).
pub fn fixed_params(parent: &ModelArch) -> u64 {
    let mut a = parent.clone();
    a.layers.clear();
    a.parameter_count()
}
