//! The Llama-family decoder in burn, generic over the backend so that it also trains under `Autodiff<B>`.
//!
//! Covers Llama, Mistral (sliding window), Qwen2 (q/k/v biases) and Mixtral (MoE layers), with per-layer
//! shapes that may differ (query and KV head counts, q/k and v/o head sizes, MLP widths) and layers
//! whose attention or MLP is skipped (nemotron-nas `no_op`: no norm, no projections). Every weight is a burn [`Param`] holding the tensor in Hugging Face layout
//! (`nn.Linear` weights `[out, in]`), so a parameter's HF name and shape are those of the checkpoint.
//!
//! Each module loads itself next to its `forward`, with names relative to its parent (candle's way:
//! `Linear::load(vb.pp("q_proj"), ..)`), so every HF tensor name is spelled once, in a `load`. Loading
//! records each parameter's name by its id ([`ParamNames`]); [`Llama::visit_named`],
//! [`Llama::map_named`], [`Llama::freeze_where`] and [`Llama::to_plan`] go through burn's module
//! visitor and mapper and look names up there. Adding a tensor is a field plus a line in the module's
//! `load` (and its shape in `surgeon_formats::arch::layer_tensors`, the architecture's schema).
//!
//! There is one decoder forward ([`DecoderLayer::forward`]); it reports intermediate values to a
//! [`Probe`] (no-ops by default), from which `crate::probe` builds calibration statistics.
mod adapter;
#[cfg(test)]
pub(crate) mod attention_tests;
mod gemma;
mod hedgehog;
#[cfg(test)]
pub(crate) mod hedgehog_tests;
mod host_attention;
mod host_attention_grad;
mod host_gemv;
pub(crate) mod host_linear;
mod host_swiglu;
mod kv_buffer;
mod load;
mod mla;
mod named;
mod precision;

pub use adapter::{
    is_adapter_param, Adapter, AdapterMaker, AdapterValues, BlockFactors, Cores, Lora,
};
pub use gemma::{embed_scale, gelu_tanh, softcap};
pub use hedgehog::{FeatureMap, Hedgehog, LinearState};
pub use kv_buffer::KvBuffer;
pub use load::{check_supported, param_id_for, ParamNames, VarBuilder};
pub use mla::{LowRankQuery, Mla, MlaBlock, QueryProj};
pub use named::{NamedParamMapper, ParamRef};
pub use precision::{mixed_matmul, Precision};

use crate::error::{Error, Result};
use crate::probe::{NoProbe, Probe};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{activation, Bool, IndexingUpdateOp, Int, Tensor, TensorData};
use surgeon_formats::{Attention, AttentionKind, Layer, ModelArch, MoeRouting};

/// A linear map `y = x W^T + b` with `W` stored `[out, in]` (HF layout).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A trainable adapter (LoRA, CLOVER), applied before the bias; see [`Llama::attach_adapters`].
    pub adapter: Option<Adapter<B>>,
    /// Mixed precision: the matmul runs in this dtype (see [`mixed_matmul`]); `None`: the inputs'.
    #[module(skip)]
    pub compute: Option<burn::tensor::FloatDType>,
}

impl<B: Backend> Linear<B> {
    /// Loads `weight` (and `bias` when `bias`) under `vb`.
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: vb.param("weight")?,
            bias: if bias { Some(vb.param("bias")?) } else { None },
            adapter: None,
            compute: None,
        })
    }

    /// Applies the map to the last dimension of `x` (`[.., in] -> [.., out]`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let inner = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let w = self.weight.val();
        let out = w.dims()[0];
        // One large GEMM over all rows; the transpose is a strided view, not a copy (CPU backend).
        let x = x.reshape([rows, inner]);
        let mut y = product(x.clone(), w, self.compute);
        if let Some(a) = &self.adapter {
            y = a.apply(x, y);
        }
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze_dim(0);
        }
        let mut out_dims = dims;
        out_dims[D - 1] = out;
        y.reshape(out_dims)
    }
}

/// Rows up to which `x W^T` is a matrix-vector product (decoding one token per sequence).
const GEMV_ROWS: usize = 4;

/// `x W^T` for `x` `[rows, in]` and `W` `[out, in]`, computed in `compute` (see
/// [`mixed_matmul`]). On the CPU backend in f32, the host's GEMM ([`host_linear`], with its own
/// backward under autodiff). In decoding (a few rows, weights not training) on the CPU backend in f32,
/// the host's matrix-vector product ([`host_gemv`]); on other backends or in another `compute`
/// type the outputs are split across the thread pool, since the CPU backend's GEMM runs
/// matrix-vector products on one thread: each part is the same product on a block of `W`'s rows,
/// so the result has the same bits.
pub(crate) fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    compute: Option<burn::tensor::FloatDType>,
) -> Tensor<B, 2> {
    use rayon::prelude::*;
    let [rows, _] = x.dims();
    let out = w.dims()[0];
    let threads = rayon::current_num_threads();
    if rows > GEMV_ROWS || w.is_require_grad() {
        let (x, w) = match compute {
            None => match host_linear::product(x, w) {
                Ok(y) => return y,
                Err(pair) => pair,
            },
            Some(_) => (x, w),
        };
        return mixed_matmul(x, w.transpose(), compute);
    }
    let (x, w) = match compute {
        None => match host_gemv::product(x, w) {
            Ok(y) => return y,
            Err(pair) => pair,
        },
        Some(_) => (x, w),
    };
    if threads < 2 || out < 256 * threads {
        return mixed_matmul(x, w.transpose(), compute);
    }
    let step = out.div_ceil(threads);
    let parts: Vec<Tensor<B, 2>> = (0..out)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let n = step.min(out - first);
            mixed_matmul(
                x.clone(),
                w.clone().narrow(0, first, n).transpose(),
                compute,
            )
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// RMSNorm as in HF Llama: `weight * x / sqrt(mean(x^2) + eps)`; Gemma's multiplies by
/// `offset + weight` with `offset` 1 (the stored weight is centred on 0).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub offset: f32,
}

impl<B: Backend> RmsNorm<B> {
    /// Loads `weight` under `vb`.
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.param("weight")?,
            eps,
            offset: 0.0,
        })
    }

    /// Loads `weight` under `vb` for a model of `arch`'s family (eps and offset from `arch`).
    pub fn load_for(vb: &mut VarBuilder<'_, '_, B>, arch: &ModelArch) -> Result<Self> {
        Ok(RmsNorm {
            offset: arch.family.norm_offset(),
            ..RmsNorm::load(vb, arch.rms_norm_eps)?
        })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let var = x.clone().powi_scalar(2).mean_dim(D - 1);
        let x = x * (var + self.eps).sqrt().recip();
        let w = match self.offset {
            0.0 => self.weight.val(),
            o => self.weight.val() + o,
        };
        x * w.unsqueeze::<D>()
    }
}

/// Rotary position embedding in HF rotate-half layout (first half / second half of each head).
#[derive(Clone, Debug)]
pub struct Rope {
    /// Inverse frequencies, `head_dim / 2` of them (after llama3/linear scaling).
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (1 for default, linear and llama3 scaling).
    pub attention_scaling: f32,
    /// LongRoPE (Phi-3): the frequencies for sequences longer than the pretraining length.
    pub long: Option<LongRope>,
}

/// LongRoPE's second set of frequencies: transformers uses them for a forward whose last position
/// is at or beyond `original_max` (and the short ones, [`Rope::inv_freq`], below it).
#[derive(Clone, Debug)]
pub struct LongRope {
    pub inv_freq: Vec<f32>,
    pub original_max: usize,
}

impl Rope {
    /// Frequencies for `head_dim` from `rope_theta` and `rope_scaling` (default, `linear`, `llama3`,
    /// `longrope`, whose default attention factor depends on `max_positions`).
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&serde_json::Value>,
        max_positions: usize,
    ) -> Result<Self> {
        // Same arithmetic as transformers: base ** (arange(0, d, 2) / d) in float32.
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut rope = Rope {
            inv_freq: inv,
            attention_scaling: 1.0,
            long: None,
        };
        let Some(s) = scaling.filter(|s| !s.is_null()) else {
            return Ok(rope);
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |k: &str| -> Result<f32> {
            s.get(k)
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .ok_or_else(|| Error::Unsupported(format!("rope_scaling {kind} without `{k}`")))
        };
        match kind {
            "default" => {}
            "linear" => {
                let f = num("factor")?;
                rope.inv_freq.iter_mut().for_each(|x| *x /= f);
            }
            "llama3" => {
                let factor = num("factor")?;
                let low = num("low_freq_factor")?;
                let high = num("high_freq_factor")?;
                let old = num("original_max_position_embeddings")?;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in rope.inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    // transformers' test, negated comparisons included (NaN counts as medium).
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            "longrope" => rope.longrope(s, theta, max_positions)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "rope_scaling type `{other}` (supported: default, linear, llama3, longrope)"
                )))
            }
        }
        Ok(rope)
    }

    /// LongRoPE as transformers computes it: frequencies divided by per-frequency `short_factor`
    /// (or `long_factor` past `original_max_position_embeddings`), cos and sin multiplied by
    /// `attention_factor`, by default sqrt(1 + ln(s) / ln(original)) with s = max / original.
    fn longrope(&mut self, s: &serde_json::Value, theta: f64, max_positions: usize) -> Result<()> {
        let factors = |k: &str| -> Result<Vec<f32>> {
            let v: Vec<f32> = s
                .get(k)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            if v.len() != self.inv_freq.len() {
                return Err(Error::Unsupported(format!(
                    "rope_scaling longrope: `{k}` needs {} numbers (head_dim / 2), got {}",
                    self.inv_freq.len(),
                    v.len()
                )));
            }
            Ok(v)
        };
        let (short, long) = (factors("short_factor")?, factors("long_factor")?);
        let original = s
            .get("original_max_position_embeddings")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                Error::Unsupported(
                    "rope_scaling longrope without `original_max_position_embeddings`".into(),
                )
            })? as usize;
        let factor = match s.get("factor").and_then(|v| v.as_f64()) {
            Some(f) => f,
            None => max_positions as f64 / original as f64,
        };
        self.attention_scaling = match s.get("attention_factor").and_then(|v| v.as_f64()) {
            Some(a) => a as f32,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32,
        };
        // transformers: 1 / (ext * base ** (arange(0, d, 2) / d)), in float32.
        let d = 2 * self.inv_freq.len();
        let scaled = |ext: &[f32]| {
            ext.iter()
                .enumerate()
                .map(|(i, e)| 1.0 / (e * (theta as f32).powf((2 * i) as f32 / d as f32)))
                .collect()
        };
        self.inv_freq = scaled(&short);
        self.long = Some(LongRope {
            inv_freq: scaled(&long),
            original_max: original,
        });
        Ok(())
    }

    /// `(cos, sin)` of shape `[1, 1, len, head_dim]` for positions `start..start + len`.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let inv_freq = match &self.long {
            Some(l) if start + len > l.original_max => &l.inv_freq,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let d = 2 * half;
        let mut cos = vec![0f32; len * d];
        let mut sin = vec![0f32; len * d];
        for t in 0..len {
            let p = (start + t) as f32;
            for (i, f) in inv_freq.iter().enumerate() {
                let a = p * f;
                let (s, c) = (
                    a.sin() * self.attention_scaling,
                    a.cos() * self.attention_scaling,
                );
                cos[t * d + i] = c;
                cos[t * d + half + i] = c;
                sin[t * d + i] = s;
                sin[t * d + half + i] = s;
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [1, 1, len, d]), device),
            Tensor::from_data(TensorData::new(sin, [1, 1, len, d]), device),
        )
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `[B, heads, T, d]`.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    // Rows of `t * d` numbers, one per (batch, head), against one shared row of the table: the CPU
    // backend's vectorised broadcast, where `[B, H, T, d] * [1, 1, T, d]` walked element by element.
    let rows = |x: Tensor<B, 4>| x.reshape([b * h, t * d]);
    let table = |c: &Tensor<B, 4>| c.clone().reshape([1, t * d]);
    (rows(x) * table(cos) + rows(rotated) * table(sin)).reshape([b, h, t, d])
}

/// `[B, T, n, e]` -> `[B, n, T, e]`, stored in that order. A `swap_dims` view alone would make the
/// CPU backend walk every later elementwise op (RoPE, norms) element by element through its strided
/// iterator (13% of `surgeon eval`'s time); reshaping across the swapped dimensions makes it one
/// tiled copy instead. Same values, same bits.
pub fn heads_first<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, n, e] = x.dims();
    x.swap_dims(1, 2)
        .reshape([b, n * t, e])
        .reshape([b, n, t, e])
}

/// Which rotary tables a layer reads: its head size, and whether it uses the local base.
type RopeKey = (usize, bool);

/// Tables shared by every layer of one forward call, built once per call: rotary `(cos, sin)` per
/// head size and the causal (optionally sliding-window) mask per window.
pub struct Positions<B: Backend> {
    /// Query positions `start..start + len`; keys cover `0..start + len`.
    pub start: usize,
    pub len: usize,
    /// Per (head size, local base): Gemma 3's sliding layers have their own RoPE base.
    rope: Vec<(RopeKey, Tensor<B, 4>, Tensor<B, 4>)>,
    masks: Vec<(usize, Tensor<B, 4, Bool>)>,
}

impl<B: Backend> Positions<B> {
    /// Tables for layers `range` of `model` at positions `start..start + len`.
    pub fn new(
        model: &Llama<B>,
        range: std::ops::Range<usize>,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> Self {
        let mut p = Positions {
            start,
            len,
            rope: vec![],
            masks: vec![],
        };
        for i in range {
            let layer = &model.layers[i];
            let (rope_dim, local, window) = match (layer.self_attn(), &layer.latent_attention) {
                (Some(a), _) => (
                    a.head_dim,
                    a.local_rope,
                    a.hedgehog.is_none().then_some(a.sliding_window),
                ),
                (None, Some(m)) => (m.self_attn.qk_rope_head_dim, false, Some(0)),
                (None, None) => continue,
            };
            let key = (rope_dim, local);
            if !p.rope.iter().any(|(k, ..)| *k == key) {
                let (c, s) = model.rope[i].tables::<B>(start, len, device);
                p.rope.push((key, c, s));
            }
            if let Some(w) = window.filter(|w| !p.masks.iter().any(|(x, _)| x == w)) {
                p.masks.push((w, causal_mask::<B>(start, len, w, device)));
            }
        }
        p
    }

    /// `(cos, sin)` `[1, 1, len, head_dim]` for heads of size `head_dim`.
    pub fn rope(&self, head_dim: usize) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        self.rope_for(head_dim, false)
    }

    /// `(cos, sin)` for heads of size `head_dim`, with the local RoPE base when `local`.
    pub fn rope_for(&self, head_dim: usize, local: bool) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        let (_, c, s) = self
            .rope
            .iter()
            .find(|(k, ..)| *k == (head_dim, local))
            .expect("rotary tables built for every layer's head size");
        (c, s)
    }

    /// `[1, 1, len, start + len]`, true where a query must not see a key.
    pub fn mask(&self, window: usize) -> &Tensor<B, 4, Bool> {
        &self
            .masks
            .iter()
            .find(|(w, _)| *w == window)
            .expect("mask built for every layer's window")
            .1
    }
}

/// Causal mask over keys at positions `0..start + t` for queries at `start..start + t`; with a
/// sliding window `w > 0`, keys with `q - k >= w` are masked too.
fn causal_mask<B: Backend>(
    start: usize,
    t: usize,
    w: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let tk = start + t;
    let mut m = vec![false; t * tk];
    for i in 0..t {
        let qpos = i + start;
        for j in 0..tk {
            m[i * tk + j] = j > qpos || (w > 0 && qpos - j >= w);
        }
    }
    Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [t, tk]), device).reshape([1, 1, t, tk])
}

/// Grouped-query causal self-attention (optionally sliding-window) with q/k/v/o projections; with
/// `hedgehog`, Hedgehog linear attention (optionally the LoLCATs hybrid) instead of softmax.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Per-head RMSNorm of queries and keys before the rotary embedding (Qwen3).
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Query/key size per head (the rotary dimension).
    pub head_dim: usize,
    /// Value size per head; `o_proj` reads `num_heads * v_head_dim` features.
    pub v_head_dim: usize,
    /// Sliding window (keys with `q - k >= window` are masked); 0 means none.
    pub sliding_window: usize,
    /// Multiplier of the scores `q . k` (`1 / sqrt(head_dim)`; Gemma: `1 / sqrt(query_pre_attn_scalar)`).
    pub scale: f64,
    /// Scores become `c * tanh(score / c)` before the mask (Gemma 2's `attn_logit_softcapping`).
    pub softcap: Option<f64>,
    /// Rotary tables of the model's local base (Gemma 3's sliding layers).
    pub local_rope: bool,
    /// Feature maps (and mixing factors) of a layer converted to linear attention.
    pub hedgehog: Option<Hedgehog<B>>,
}

impl<B: Backend> SelfAttention<B> {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` under `vb` (HF `self_attn`).
    pub fn load(
        vb: &mut VarBuilder<'_, '_, B>,
        a: &Attention,
        window: usize,
        eps: f64,
    ) -> Result<Self> {
        let mut norm = |name: &str| match a.qk_norm {
            true => RmsNorm::load(&mut vb.pp(name), eps).map(Some),
            false => Ok(None),
        };
        let (q_norm, k_norm) = (norm("q_norm")?, norm("k_norm")?);
        Ok(SelfAttention {
            q_norm,
            k_norm,
            q_proj: Linear::load(&mut vb.pp("q_proj"), a.qkv_bias)?,
            k_proj: Linear::load(&mut vb.pp("k_proj"), a.qkv_bias)?,
            v_proj: Linear::load(&mut vb.pp("v_proj"), a.qkv_bias)?,
            o_proj: Linear::load(&mut vb.pp("o_proj"), false)?,
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            v_head_dim: a.v_head_dim,
            sliding_window: window,
            scale: 1.0 / (a.head_dim as f64).sqrt(),
            softcap: None,
            local_rope: false,
            hedgehog: match a.kind {
                AttentionKind::Hedgehog { window, .. } => Some(Hedgehog::load(vb, window)?),
                _ => None,
            },
        })
    }

    /// `x`: `[B, T, h]` at the positions of `pos`. With `cache`, keys/values of earlier positions
    /// (and a linear attention's state) are read from and the new ones added to it.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        self.o_proj.forward(self.heads(x, pos, cache))
    }

    /// The attention's output before `o_proj`, heads concatenated: `[B, T, num_heads * v_head_dim]`
    /// (head `j` in features `j * v_head_dim..`), what Minitron scores heads on.
    pub fn heads(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, g, d, dv) = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.v_head_dim,
        );
        let mut qkv = self.projections(x);
        // Without a cache, on the CPU backend: attention on the projections as they lie.
        let flat = cache.is_none() && self.hedgehog.is_none() && pos.start == 0;
        if flat && t >= host_attention::MIN_QUERIES {
            let setup = host_attention_grad::Setup {
                start: 0,
                rule: self.score_rule(),
                heads: [h, g, d, dv],
                rope: Some(pos.rope_for(d, self.local_rope)),
            };
            match host_attention_grad::fused_projections(qkv, setup) {
                Ok(y) => return y,
                Err(back) => qkv = back,
            }
        }
        let (q, k, v) = self.heads_first_roped(qkv, pos);
        let y = match &self.hedgehog {
            Some(hh) => hh.attend_cached(q, (k, v), pos.start, cache, |x| self.repeat_kv(x)),
            None => self.softmax_attention(q, k, v, pos, cache),
        };
        y.swap_dims(1, 2).reshape([b, t, h * dv])
    }

    /// Queries `[B, H, T, d]`, keys `[B, G, T, d]` (both after RoPE) and values `[B, G, T, dv]`.
    pub fn qkv(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        self.heads_first_roped(self.projections(x), pos)
    }

    /// The projections, queries `[B, T, H * d]`, keys `[B, T, G * d]` and values `[B, T, G * dv]`,
    /// after the per-head norms (Qwen3, Gemma 3), before RoPE.
    fn projections(&self, x: Tensor<B, 3>) -> host_attention_grad::Qkv<B, 3> {
        let [b, t, _] = x.dims();
        let (h, g, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                qn.forward(q.reshape([b, t, h, d])).reshape([b, t, h * d]),
                kn.forward(k.reshape([b, t, g, d])).reshape([b, t, g * d]),
                v,
            ),
            _ => (q, k, v),
        }
    }

    /// [`Self::projections`] heads first, RoPE applied to queries and keys.
    fn heads_first_roped(
        &self,
        (q, k, v): host_attention_grad::Qkv<B, 3>,
        pos: &Positions<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = q.dims();
        let (h, g, d, dv) = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.v_head_dim,
        );
        let (cos, sin) = pos.rope_for(d, self.local_rope);
        let q = heads_first(q.reshape([b, t, h, d]));
        let k = heads_first(k.reshape([b, t, g, d]));
        let v = heads_first(v.reshape([b, t, g, dv]));
        (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    }

    /// Causal softmax attention weights `[B, H, T, T]` of `x` at positions `0..T` (the teacher's side
    /// of Hedgehog's attention-weight distillation; the forward never builds them).
    pub fn softmax_weights(&self, x: Tensor<B, 3>, pos: &Positions<B>) -> Tensor<B, 4> {
        let (q, k, _) = self.qkv(x, pos);
        let [b, h, t, _] = q.dims();
        let k = self.repeat_kv(k);
        let mask = pos.mask(self.sliding_window).clone().expand([b, h, t, t]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(self.scale);
        let scores = match self.softcap {
            Some(c) => softcap(scores, c),
            None => scores,
        };
        softmax(scores.mask_fill(mask, -1.0e30), 3)
    }

    /// Key or value heads `[B, G, n, x]` repeated to the query heads `[B, H, n, x]`
    /// (transformers' `repeat_kv` order).
    pub fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (h, g) = (self.num_heads, self.num_kv_heads);
        if g == h {
            return x;
        }
        let [b, _, n, e] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, g, h / g, n, e])
            .reshape([b, h, n, e])
    }

    /// Causal softmax attention `[B, H, T, dv]`, keys and values appended to `cache`. Each KV head
    /// serves its group of query heads as one product (queries of the group stacked), so keys and
    /// values are never copied to every query head.
    fn softmax_attention(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 4> {
        let [b, h, t, d] = q.dims();
        let (k, v) = match cache {
            Some(slot) => KvBuffer::append(&mut slot.buffer, k, v),
            None => (k, v),
        };
        let [_, g, _, dv] = v.dims();
        let q = q.reshape([b, g, h / g, t, d]);
        causal_attention(q, k, v, pos, self.score_rule()).reshape([b, h, t, dv])
    }

    /// How this attention turns `q . k` into weights.
    fn score_rule(&self) -> ScoreRule {
        ScoreRule {
            scale: self.scale,
            softcap: self.softcap,
            window: self.sliding_window,
        }
    }
}

/// How a causal attention turns `q . k` into weights: the scale, an optional soft-cap
/// `c * tanh(score / c)` before the mask, and a sliding window (0: none).
#[derive(Clone, Copy, Debug)]
pub struct ScoreRule {
    pub scale: f64,
    pub softcap: Option<f64>,
    pub window: usize,
}

/// Causal softmax attention of queries `[B, G, R, T, d]` (the `R` query heads of each of `G` key
/// heads) at the positions of `pos` over keys `[B, G, Tk, d]` and values `[B, G, Tk, dv]` (every
/// position so far); returns `[B, G, R, T, dv]`. Queries go in blocks of [`QUERY_BLOCK`], each
/// against only the keys it can see: the keys after a block (and before its sliding window) are
/// skipped rather than computed and masked, about half the work of a long window. On the CPU backend,
/// with or without autodiff, the blocks run fused on the host ([`host_attention`]; under autodiff as
/// one operation with its own backward pass, [`host_attention_grad`]), except in decoding.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    pos: &Positions<B>,
    rule: ScoreRule,
) -> Tensor<B, 5> {
    let t = q.dims()[3];
    debug_assert_eq!(
        k.dims()[2],
        pos.start + t,
        "cache length and positions disagree"
    );
    let (q, k, v) = match t >= host_attention::MIN_QUERIES {
        true => match host_attention_grad::fused((q, k, v), pos.start, rule) {
            Ok(y) => return y,
            Err(qkv) => qkv,
        },
        false => (q, k, v),
    };
    blocked_attention(q, k, v, pos.mask(rule.window), pos.start, rule)
}

/// [`causal_attention`] in tensor operations (autodiff differentiates them), with `mask`
/// `[1, 1, T, Tk]` (true: hidden) for queries at positions `start..start + T`.
fn blocked_attention<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
    start: usize,
    rule: ScoreRule,
) -> Tensor<B, 5> {
    let t = q.dims()[3];
    let mut blocks: Vec<Tensor<B, 5>> = (0..t)
        .step_by(QUERY_BLOCK)
        .map(|first| {
            let n = QUERY_BLOCK.min(t - first);
            let keys = visible_keys(start + first, n, rule.window);
            let m = keys.len();
            attend_block(
                q.clone().narrow(3, first, n),
                k.clone().narrow(2, keys.start, m),
                v.clone().narrow(2, keys.start, m),
                mask.clone().narrow(2, first, n).narrow(3, keys.start, m),
                rule,
            )
        })
        .collect();
    match blocks.len() {
        1 => blocks.pop().expect("one block"),
        _ => Tensor::cat(blocks, 3),
    }
}

/// One block of [`causal_attention`]: queries `[B, G, R, n, d]`, keys `[B, G, m, d]`, values
/// `[B, G, m, dv]`, `mask` `[1, 1, n, m]` (true: hidden); returns `[B, G, R, n, dv]`.
fn attend_block<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    rule: ScoreRule,
) -> Tensor<B, 5> {
    let [b, g, r, n, d] = q.dims();
    let [_, _, m, dv] = v.dims();
    let mask = mask.reshape([1, 1, 1, n, m]).expand([b, g, r, n, m]);
    // Attention from basic ops (not burn's fused `attention`/`softmax`), so that the result is
    // bitwise the same on `B` and `Autodiff<B>` (on a GPU, a teacher and an identical student agree
    // exactly; the CPU backend runs `host_attention` on both sides, equally).
    let scores = q
        .reshape([b, g, r * n, d])
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(rule.scale)
        .reshape([b, g, r, n, m]);
    let scores = match rule.softcap {
        Some(c) => softcap(scores, c),
        None => scores,
    };
    softmax(scores.mask_fill(mask, -1.0e30), 4)
        .reshape([b, g, r * n, m])
        .matmul(v)
        .reshape([b, g, r, n, dv])
}

/// Queries per block of causal softmax attention (see [`causal_attention`]): small
/// enough to skip most masked keys, large enough to keep the products big.
pub const QUERY_BLOCK: usize = 128;

/// The keys that queries at positions `first..first + n` can see: causal, and with a sliding window
/// `w > 0`, not `w` or more positions behind the first query.
fn visible_keys(first: usize, n: usize, w: usize) -> std::ops::Range<usize> {
    let lo = match w {
        0 => 0,
        w => (first + 1).saturating_sub(w),
    };
    lo..first + n
}

/// Softmax over `dim` from primitive ops. burn's fused `softmax`/`log_softmax` differ bitwise between
/// `Autodiff<B>` and `B` (autodiff decomposes them); these compute the same on both.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let e = (x.clone() - x.max_dim(dim).detach()).exp();
    e.clone() / e.sum_dim(dim)
}

/// `log(softmax(x))` over `dim` from primitive ops (see [`softmax`]).
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let z = x.clone() - x.max_dim(dim).detach();
    z.clone() - z.exp().sum_dim(dim).log()
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// GeGLU with tanh-approximated GELU (`gelu_pytorch_tanh`, Gemma) instead of SiLU.
    pub gelu_tanh: bool,
}

/// HF names of a SwiGLU's gate, up and down projections in a dense layer (`mlp`).
const DENSE_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// The same in a Mixtral expert (`block_sparse_moe.experts.{e}`).
const EXPERT_NAMES: [&str; 3] = ["w1", "w3", "w2"];

impl<B: Backend> SwiGlu<B> {
    /// Loads the three projections under `vb`, named `[gate, up, down]`.
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, names: [&str; 3]) -> Result<Self> {
        Ok(SwiGlu {
            gate_proj: Linear::load(&mut vb.pp(names[0]), false)?,
            up_proj: Linear::load(&mut vb.pp(names[1]), false)?,
            down_proj: Linear::load(&mut vb.pp(names[2]), false)?,
            gelu_tanh: false,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.down_proj.forward(self.activation(x))
    }

    /// The neuron activations `silu(gate(x)) * up(x)` (the input of `down_proj`).
    pub fn activation<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let g = self.gate_proj.forward(x.clone());
        let u = self.up_proj.forward(x);
        if self.gelu_tanh {
            return gelu_tanh(g) * u;
        }
        match host_swiglu::fused(g, u) {
            Ok(a) => a,
            Err((g, u)) => activation::silu(g) * u,
        }
    }
}

/// Routed SwiGLU experts (Mixtral layout). Softmax over experts, top-k, renormalise to sum 1 (not for
/// Qwen3-MoE without `norm_topk_prob`), times `scale` (1 for Mixtral routing, n/k for LLaMA-MoE).
/// Computed densely over all experts.
#[derive(Module, Debug)]
pub struct MoeMlp<B: Backend> {
    /// Router `[E, h]` (`block_sparse_moe.gate`).
    pub gate: Linear<B>,
    /// Experts; `gate_proj`/`up_proj`/`down_proj` are HF's `w1`/`w3`/`w2`.
    pub experts: Vec<SwiGlu<B>>,
    pub top_k: usize,
    /// Whether the top-k probabilities are divided by their sum (all but Qwen3-MoE without
    /// `norm_topk_prob`).
    pub renormalise: bool,
    pub scale: f64,
}

impl<B: Backend> MoeMlp<B> {
    /// Loads the router `gate` and `experts.{e}` under `vb` (HF `block_sparse_moe`).
    pub fn load(
        vb: &mut VarBuilder<'_, '_, B>,
        num_experts: usize,
        top_k: usize,
        routing: &MoeRouting,
    ) -> Result<Self> {
        let gate = Linear::load(&mut vb.pp("gate"), false)?;
        let mut experts = Vec::with_capacity(num_experts);
        for e in 0..num_experts {
            experts.push(SwiGlu::load(
                &mut vb.pp(&format!("experts.{e}")),
                EXPERT_NAMES,
            )?);
        }
        Ok(MoeMlp {
            gate,
            experts,
            top_k,
            renormalise: routing != &MoeRouting::Unnormalized,
            scale: match routing {
                MoeRouting::Mixtral | MoeRouting::Unnormalized => 1.0,
                MoeRouting::Scaled { scale } => *scale,
            },
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_probed(x, 0, &mut NoProbe)
    }

    /// [`MoeMlp::forward`] that reports the router logits `[B*T, E]` of layer `l` to `probe`.
    pub fn forward_probed(
        &self,
        x: Tensor<B, 3>,
        l: usize,
        probe: &mut dyn Probe<B>,
    ) -> Tensor<B, 3> {
        let [b, t, hdim] = x.dims();
        let n = b * t;
        let x2 = x.reshape([n, hdim]);
        let e = self.experts.len();
        let logits = self.gate.forward(x2.clone());
        probe.router_logits(l, &logits);
        let probs = softmax(logits, 1);
        let (top, idx) = probs.topk_with_indices(self.top_k, 1);
        let top = match self.renormalise {
            true => top.clone() / top.sum_dim(1),
            false => top,
        };
        let top = if self.scale != 1.0 {
            top * self.scale
        } else {
            top
        };
        let device = x2.device();
        let routed = tokens_per_expert(&idx, e);
        let weights =
            Tensor::<B, 2>::zeros([n, e], &device).scatter(1, idx, top, IndexingUpdateOp::Add);
        // Each expert runs on its routed tokens only; outputs are added back in expert order, as
        // the dense sum over all experts would (the skipped terms are exact zeros).
        let mut y = Tensor::<B, 2>::zeros([n, hdim], &device);
        for (i, expert) in self.experts.iter().enumerate() {
            if routed[i].is_empty() {
                continue;
            }
            let rows = routed[i].len();
            let ids =
                Tensor::<B, 1, Int>::from_data(TensorData::new(routed[i].clone(), [rows]), &device);
            let w = weights.clone().narrow(1, i, 1).select(0, ids.clone());
            let out = expert.forward(x2.clone().select(0, ids.clone())) * w;
            y = y.select_assign(0, ids, out, IndexingUpdateOp::Add);
        }
        y.reshape([b, t, hdim])
    }
}

/// For each of `experts`, the rows of `idx` `[n, k]` (each row's chosen experts) that chose it.
fn tokens_per_expert<B: Backend>(idx: &Tensor<B, 2, Int>, experts: usize) -> Vec<Vec<i64>> {
    let k = idx.dims()[1];
    let chosen: Vec<i64> = idx
        .to_data()
        .convert::<i64>()
        .into_vec()
        .expect("expert indices are integers");
    let mut rows = vec![vec![]; experts];
    for (i, &e) in chosen.iter().enumerate() {
        rows[e as usize].push((i / k) as i64);
    }
    rows
}

/// The MLP of one decoder layer. A layer holds one, so boxing the larger variant would add an
/// indirection to every forward and save nothing.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Mlp<B: Backend> {
    Dense(SwiGlu<B>),
    Moe(MoeMlp<B>),
}

impl<B: Backend> Mlp<B> {
    /// Loads a layer's MLP under the layer's `vb`: `mlp` (dense) or `block_sparse_moe` (MoE). A
    /// skipped MLP has no module (see [`DecoderLayer::feed_forward`]).
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, mlp: &surgeon_formats::Mlp) -> Result<Self> {
        Ok(match mlp {
            surgeon_formats::Mlp::NoOp => {
                return Err(Error::Unsupported(
                    "a skipped (no-op) MLP has no module to load".into(),
                ))
            }
            surgeon_formats::Mlp::Dense { .. } => {
                Mlp::Dense(SwiGlu::load(&mut vb.pp("mlp"), DENSE_NAMES)?)
            }
            surgeon_formats::Mlp::Moe {
                num_experts,
                top_k,
                routing,
                ..
            } => Mlp::Moe(MoeMlp::load(
                &mut vb.pp("block_sparse_moe"),
                *num_experts,
                *top_k,
                routing,
            )?),
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_probed(x, 0, &mut NoProbe)
    }

    /// The MLP with GeGLU (tanh-approximated GELU) when `hidden_act` is `gelu_pytorch_tanh`.
    pub fn with_activation(mut self, hidden_act: &str) -> Self {
        let gelu = hidden_act == "gelu_pytorch_tanh";
        match &mut self {
            Mlp::Dense(m) => m.gelu_tanh = gelu,
            Mlp::Moe(m) => m.experts.iter_mut().for_each(|e| e.gelu_tanh = gelu),
        }
        self
    }

    /// [`Mlp::forward`] reporting the dense activations or the router logits of layer `l`.
    pub fn forward_probed(
        &self,
        x: Tensor<B, 3>,
        l: usize,
        probe: &mut dyn Probe<B>,
    ) -> Tensor<B, 3> {
        match self {
            Mlp::Dense(m) => {
                let a = m.activation(x);
                probe.mlp_activation(l, &a);
                m.down_proj.forward(a)
            }
            Mlp::Moe(m) => m.forward_probed(x, l, probe),
        }
    }
}

/// The attention half of a decoder layer: `input_layernorm` and `self_attn` (for Gemma also the
/// norm of the attention's output, its `post_attention_layernorm`).
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_norm: Option<RmsNorm<B>>,
}

/// The MLP half of a decoder layer: `post_attention_layernorm` and the MLP (for Gemma:
/// `pre_feedforward_layernorm`, the MLP and `post_feedforward_layernorm`).
#[derive(Module, Debug)]
pub struct MlpBlock<B: Backend> {
    /// The norm of the MLP's input (Gemma's `pre_feedforward_layernorm`).
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
    pub post_norm: Option<RmsNorm<B>>,
}

/// One pre-norm decoder layer. A skipped (no-op) attention or MLP has neither its norm nor its
/// projections: that half is `None` and passes its input through (nemotron-nas `no_op`).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub attention: Option<AttentionBlock<B>>,
    /// DeepSeek-V3 latent attention, in place of `attention`.
    pub latent_attention: Option<MlaBlock<B>>,
    pub feed_forward: Option<MlpBlock<B>>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Loads layer `layer` of `arch` under `vb` (HF `model.layers.{i}`).
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, layer: &Layer, arch: &ModelArch) -> Result<Self> {
        let eps = arch.rms_norm_eps;
        let window = gemma::layer_window(arch, &layer.attention);
        let a = &layer.attention;
        let gemma = arch.family.is_gemma();
        let mla = matches!(a.kind, AttentionKind::Mla { .. });
        let latent_attention = match mla {
            false => None,
            true => Some(MlaBlock {
                input_layernorm: RmsNorm::load(&mut vb.pp("input_layernorm"), eps)?,
                self_attn: Mla::load(&mut vb.pp("self_attn"), a, arch.rope_scaling.as_ref())?,
            }),
        };
        let attention = match a.is_no_op() || mla {
            true => None,
            false => {
                let input_layernorm = RmsNorm::load_for(&mut vb.pp("input_layernorm"), arch)?;
                let mut self_attn = SelfAttention::load(&mut vb.pp("self_attn"), a, window, eps)?;
                let post_norm = match gemma {
                    true => {
                        gemma::configure_attention(&mut self_attn, arch, a);
                        Some(RmsNorm::load_for(
                            &mut vb.pp("post_attention_layernorm"),
                            arch,
                        )?)
                    }
                    false => None,
                };
                Some(AttentionBlock {
                    input_layernorm,
                    self_attn,
                    post_norm,
                })
            }
        };
        let feed_forward = match layer.mlp {
            surgeon_formats::Mlp::NoOp => None,
            _ => Some(MlpBlock {
                post_attention_layernorm: match gemma {
                    true => RmsNorm::load_for(&mut vb.pp("pre_feedforward_layernorm"), arch)?,
                    false => RmsNorm::load(&mut vb.pp("post_attention_layernorm"), eps)?,
                },
                post_norm: match gemma {
                    true => Some(RmsNorm::load_for(
                        &mut vb.pp("post_feedforward_layernorm"),
                        arch,
                    )?),
                    false => None,
                },
                mlp: Mlp::load(vb, &layer.mlp)?.with_activation(&arch.hidden_act),
            }),
        };
        Ok(DecoderLayer {
            attention,
            latent_attention,
            feed_forward,
        })
    }

    /// The attention, if this layer has one.
    pub fn self_attn(&self) -> Option<&SelfAttention<B>> {
        self.attention.as_ref().map(|a| &a.self_attn)
    }

    /// The MLP, if this layer has one.
    pub fn mlp(&self) -> Option<&Mlp<B>> {
        self.feed_forward.as_ref().map(|f| &f.mlp)
    }

    /// Layer `l` on `x` `[B, T, h]`, reporting its input, attention input, heads (input of
    /// `o_proj`), MLP input and activations, router logits and output to `probe` (a skipped half reports nothing).
    pub fn forward(
        &self,
        l: usize,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
        probe: &mut dyn Probe<B>,
    ) -> Tensor<B, 3> {
        probe.layer_input(l, &x);
        let h = match (&self.attention, &self.latent_attention) {
            (Some(att), _) => {
                let a = att.input_layernorm.forward(x.clone());
                probe.attention_input(l, &a);
                let heads = att.self_attn.heads(a, pos, cache);
                probe.attention_heads(l, &heads);
                let o = att.self_attn.o_proj.forward(heads);
                match &att.post_norm {
                    Some(n) => x + n.forward(o),
                    None => x + o,
                }
            }
            (None, Some(att)) => {
                let a = att.input_layernorm.forward(x.clone());
                probe.attention_input(l, &a);
                let heads = att.self_attn.heads(a, pos, cache);
                probe.attention_heads(l, &heads);
                x + att.self_attn.o_proj.forward(heads)
            }
            (None, None) => x,
        };
        let y = match &self.feed_forward {
            Some(ff) => {
                let m = ff.post_attention_layernorm.forward(h.clone());
                probe.mlp_input(l, &m);
                let o = ff.mlp.forward_probed(m, l, probe);
                match &ff.post_norm {
                    Some(n) => h + n.forward(o),
                    None => h + o,
                }
            }
            None => h,
        };
        probe.layer_output(l, &y);
        y
    }
}

/// What one layer keeps between generation steps.
#[derive(Clone, Debug)]
pub struct LayerCache<B: Backend> {
    /// Every position so far: softmax attention's keys (after RoPE) and values; latent
    /// attention's normalised latents `[B, 1, n, kv_lora_rank]` and shared rotary keys after RoPE
    /// `[B, 1, n, qk_rope_head_dim]`.
    pub buffer: Option<KvBuffer<B>>,
    /// Hedgehog: keys (after RoPE) and values `[B, kv_heads, n, *]` of the window's last positions.
    pub kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Hedgehog: the linear-attention state of every older key.
    pub state: Option<LinearState<B>>,
}

impl<B: Backend> Default for LayerCache<B> {
    fn default() -> Self {
        LayerCache {
            buffer: None,
            kv: None,
            state: None,
        }
    }
}

impl<B: Backend> LayerCache<B> {
    /// Numbers held (keys, values and state), for memory accounting.
    pub fn numel(&self) -> usize {
        let n = |t: &Tensor<B, 4>| t.dims().iter().product::<usize>();
        let kv = self.kv.as_ref().map_or(0, |(k, v)| n(k) + n(v))
            + self.buffer.as_ref().map_or(0, KvBuffer::numel);
        kv + self.state.as_ref().map_or(0, |(s, z)| n(s) + n(z))
    }
}

/// Keys and values of the positions seen so far, per layer (`[B, kv_heads, T, d]`), and the
/// states of linear-attention layers.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }
    /// Numbers held over all layers (keys, values, linear-attention states).
    pub fn numel(&self) -> usize {
        self.layers.iter().map(LayerCache::numel).sum()
    }
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn clear(&mut self) {
        self.layers
            .iter_mut()
            .for_each(|l| *l = LayerCache::default());
        self.len = 0;
    }
}

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `model.embed_tokens.weight` `[V, h]` (also the output matrix when tied).
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head.weight` `[V, h]`; `None` when tied to the embeddings.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Per-layer rotary tables' frequencies (layers may differ in head_dim).
    #[module(skip)]
    pub rope: Vec<Rope>,
    /// Factor of the token embeddings (Gemma: sqrt(hidden) in the embedding's dtype).
    #[module(skip)]
    pub embed_scale: Option<f32>,
    /// Logits become `c * tanh(logit / c)` (Gemma 2's `final_logit_softcapping`).
    #[module(skip)]
    pub final_softcap: Option<f64>,
    /// HF tensor name of every parameter, by parameter id (recorded while loading).
    #[module(skip)]
    pub names: ParamNames,
    /// Mixed precision of the output projection (see [`mixed_matmul`]); `None`: f32.
    #[module(skip)]
    pub compute: Option<burn::tensor::FloatDType>,
}

impl<B: Backend> Llama<B> {
    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.val().device()
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.val().dims()[0]
    }

    /// An empty KV cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    /// Logits `[B, T, V]` for token ids `[B, T]` at positions `0..T`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.logits(self.hidden(tokens, None))
    }

    /// [`Llama::forward`] reporting every layer's intermediate values to `probe`.
    pub fn forward_probed(
        &self,
        tokens: Tensor<B, 2, Int>,
        probe: &mut dyn Probe<B>,
    ) -> Tensor<B, 3> {
        let x = self.embed(tokens);
        let x = self.layers_probed(x, 0..self.layers.len(), None, probe);
        self.logits(self.norm.forward(x))
    }

    /// Logits of `tokens` that continue the positions held in `cache` (which is extended).
    /// Whether `new` positions after `cached` ones cross a LongRoPE switch: the frequencies of
    /// every position change (short factors up to `original_max`, long ones past it), so cached keys
    /// are stale.
    pub fn rope_switches(&self, cached: usize, new: usize) -> bool {
        self.rope.iter().any(|r| {
            r.long.as_ref().is_some_and(|l| {
                cached > 0 && cached <= l.original_max && cached + new > l.original_max
            })
        })
    }

    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        self.logits(self.hidden(tokens, Some(cache)))
    }

    /// Final hidden states (after `model.norm`) `[B, T, h]`.
    pub fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let x = self.embed(tokens);
        let x = self.layers_forward(x, 0..self.layers.len(), cache);
        self.norm.forward(x)
    }

    /// Token embeddings `[B, T, h]`.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = embedding(self.embed_tokens.val(), tokens);
        match self.embed_scale {
            Some(s) => x.mul_scalar(s),
            None => x,
        }
    }

    /// Runs decoder layers `range` over hidden states `x` (positions continue `cache` if given; without
    /// a cache positions start at 0). Lets callers capture per-layer outputs (attention transfer).
    pub fn layers_forward(
        &self,
        x: Tensor<B, 3>,
        range: std::ops::Range<usize>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.layers_probed(x, range, cache, &mut NoProbe)
    }

    /// [`Llama::layers_forward`] reporting to `probe`. Rotary tables and masks are built once here.
    pub fn layers_probed(
        &self,
        mut x: Tensor<B, 3>,
        range: std::ops::Range<usize>,
        mut cache: Option<&mut KvCache<B>>,
        probe: &mut dyn Probe<B>,
    ) -> Tensor<B, 3> {
        let t = x.dims()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let pos = Positions::new(self, range.clone(), start, t, &x.device());
        for i in range.clone() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = self.layers[i].forward(i, x, &pos, slot, probe);
        }
        if let Some(c) = cache {
            if range.end == self.layers.len() {
                c.len += t;
            }
        }
        x
    }

    /// Output projection: hidden `[B, T, h]` -> logits `[B, T, V]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        let w = match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed_tokens.val(),
        };
        let v = w.dims()[0];
        let logits = product(hidden.reshape([b * t, h]), w, self.compute).reshape([b, t, v]);
        match self.final_softcap {
            Some(c) => softcap(logits, c),
            None => logits,
        }
    }
}
