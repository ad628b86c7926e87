//! The Llama-family decoder in burn, generic over the backend so that it also trains under `Autodiff<B>`.
//!
//! Covers Llama, Mistral (sliding window), Qwen2 (q/k/v biases) and Mixtral (MoE layers), with per-layer
//! shapes that may differ. Every weight is a burn [`Param`] holding the tensor in Hugging Face layout
//! (`nn.Linear` weights `[out, in]`), so a parameter's HF name and shape are those of the checkpoint:
//! [`Llama::visit_named`] / [`Llama::param_names`] map parameters to names, [`Llama::map_named`] /
//! [`Llama::freeze_where`] rewrite them by name, and [`Llama::to_plan`] exports the weights back into a
//! [`Plan`].
use crate::error::{Error, Result};
use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{activation, Bool, IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::collections::BTreeMap;
use surgeon_formats::arch::layer_tensors;
use surgeon_formats::{
    AttentionKind, HostTensor, ModelArch, MoeRouting, Plan, Source, TensorEntry,
};

/// A linear map `y = x W^T + b` with `W` stored `[out, in]` (HF layout).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Applies the map to the last dimension of `x` (`[.., in] -> [.., out]`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let inner = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let w = self.weight.val();
        let out = w.dims()[0];
        // One large GEMM over all rows; the transpose is a strided view, not a copy (CPU backend).
        let mut y = x.reshape([rows, inner]).matmul(w.transpose());
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze_dim(0);
        }
        let mut out_dims = dims;
        out_dims[D - 1] = out;
        y.reshape(out_dims)
    }
}

/// RMSNorm as in HF Llama: `weight * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let var = x.clone().powi_scalar(2).mean_dim(2);
        let x = x * (var + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze::<3>()
    }
}

/// Rotary position embedding in HF rotate-half layout (first half / second half of each head).
#[derive(Clone, Debug)]
pub struct Rope {
    /// Inverse frequencies, `head_dim / 2` of them (after llama3/linear scaling).
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (1 for default, linear and llama3 scaling).
    pub attention_scaling: f32,
}

impl Rope {
    /// Frequencies for `head_dim` from `rope_theta` and `rope_scaling` (default, `linear`, `llama3`).
    pub fn new(head_dim: usize, theta: f64, scaling: Option<&serde_json::Value>) -> Result<Self> {
        // Same arithmetic as transformers: base ** (arange(0, d, 2) / d) in float32.
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut rope = Rope {
            inv_freq: inv,
            attention_scaling: 1.0,
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
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "rope_scaling type `{other}` (supported: default, linear, llama3)"
                )))
            }
        }
        Ok(rope)
    }

    /// `(cos, sin)` of shape `[1, 1, len, head_dim]` for positions `start..start + len`.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let half = self.inv_freq.len();
        let d = 2 * half;
        let mut cos = vec![0f32; len * d];
        let mut sin = vec![0f32; len * d];
        for t in 0..len {
            let p = (start + t) as f32;
            for (i, f) in self.inv_freq.iter().enumerate() {
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
    let _ = (b, h, t);
    x * cos.clone() + rotated * sin.clone()
}

/// Grouped-query causal self-attention (optionally sliding-window) with q/k/v/o projections.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (keys with `q - k >= window` are masked); 0 means none.
    pub sliding_window: usize,
}

impl<B: Backend> SelfAttention<B> {
    /// `x`: `[B, T, h]` at positions `start..start+T`. With `cache`, keys/values of earlier positions
    /// are read from and the new ones appended to it.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, g, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, t, h, d])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, t, g, d])
            .swap_dims(1, 2);
        let v = self.v_proj.forward(x).reshape([b, t, g, d]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let mut k = apply_rope(k, cos, sin);
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let tk = k.dims()[2];
        let (k, v) = if g != h {
            let r = h / g;
            let k = k
                .unsqueeze_dim::<5>(2)
                .expand([b, g, r, tk, d])
                .reshape([b, h, tk, d]);
            let v = v
                .unsqueeze_dim::<5>(2)
                .expand([b, g, r, tk, d])
                .reshape([b, h, tk, d]);
            (k, v)
        } else {
            (k, v)
        };
        // Causal (and sliding-window) mask over keys at positions `0..tk`, queries at `tk-t..tk`.
        let w = self.sliding_window;
        let offset = tk - t;
        let mut m = vec![false; t * tk];
        for i in 0..t {
            let qpos = i + offset;
            for j in 0..tk {
                m[i * tk + j] = j > qpos || (w > 0 && qpos - j >= w);
            }
        }
        let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [t, tk]), &q.device())
            .reshape([1, 1, t, tk])
            .expand([b, h, t, tk]);
        // Attention from basic ops (not burn's fused `attention`/`softmax`), so that the result is
        // bitwise the same on `B` and `Autodiff<B>` (a teacher and an identical student agree exactly).
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt())
            .mask_fill(mask, -1.0e30);
        let y = softmax(scores, 3).matmul(v);
        let y = y.swap_dims(1, 2).reshape([b, t, h * d]);
        self.o_proj.forward(y)
    }
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
}

impl<B: Backend> SwiGlu<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let g = activation::silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g * self.up_proj.forward(x))
    }
}

/// Routed SwiGLU experts (Mixtral layout). Softmax over experts, top-k, renormalise to sum 1, times
/// `scale` (1 for Mixtral routing, n/k for LLaMA-MoE). Computed densely over all experts.
#[derive(Module, Debug)]
pub struct MoeMlp<B: Backend> {
    /// Router `[E, h]` (`block_sparse_moe.gate`).
    pub gate: Linear<B>,
    /// Experts; `gate_proj`/`up_proj`/`down_proj` are HF's `w1`/`w3`/`w2`.
    pub experts: Vec<SwiGlu<B>>,
    pub top_k: usize,
    pub scale: f64,
}

impl<B: Backend> MoeMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, hdim] = x.dims();
        let n = b * t;
        let x2 = x.reshape([n, hdim]);
        let e = self.experts.len();
        let probs = softmax(self.gate.forward(x2.clone()), 1);
        let (top, idx) = probs.topk_with_indices(self.top_k, 1);
        let top = top.clone() / top.sum_dim(1);
        let top = if self.scale != 1.0 {
            top * self.scale
        } else {
            top
        };
        let weights =
            Tensor::<B, 2>::zeros([n, e], &x2.device()).scatter(1, idx, top, IndexingUpdateOp::Add);
        let mut y: Option<Tensor<B, 2>> = None;
        for (i, expert) in self.experts.iter().enumerate() {
            let out = expert.forward(x2.clone()) * weights.clone().narrow(1, i, 1);
            y = Some(match y {
                Some(acc) => acc + out,
                None => out,
            });
        }
        y.expect("MoE layer without experts").reshape([b, t, hdim])
    }
}

/// The MLP of one decoder layer.
#[derive(Module, Debug)]
pub enum Mlp<B: Backend> {
    Dense(SwiGlu<B>),
    Moe(MoeMlp<B>),
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Mlp::Dense(m) => m.forward(x),
            Mlp::Moe(m) => m.forward(x),
        }
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Keys and values of the positions seen so far, per layer (`[B, kv_heads, T, d]`).
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
        }
    }
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
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
}

/// A parameter seen by [`Llama::visit_named`].
pub enum ParamRef<'a, B: Backend> {
    Vector(&'a Param<Tensor<B, 1>>),
    Matrix(&'a Param<Tensor<B, 2>>),
}

impl<B: Backend> ParamRef<'_, B> {
    pub fn id(&self) -> ParamId {
        match self {
            ParamRef::Vector(p) => p.id,
            ParamRef::Matrix(p) => p.id,
        }
    }
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ParamRef::Vector(p) => p.val().dims().to_vec(),
            ParamRef::Matrix(p) => p.val().dims().to_vec(),
        }
    }
    /// Values as f32, row-major, in HF layout.
    pub fn to_f32(&self) -> Vec<f32> {
        let data = match self {
            ParamRef::Vector(p) => p.val().into_data(),
            ParamRef::Matrix(p) => p.val().into_data(),
        };
        data.convert::<f32>().into_vec::<f32>().expect("f32 data")
    }
}

/// Rewrites parameters by HF name (see [`Llama::map_named`]).
pub trait NamedParamMapper<B: Backend> {
    fn map_vector(&mut self, name: &str, p: Param<Tensor<B, 1>>) -> Param<Tensor<B, 1>> {
        let _ = name;
        p
    }
    fn map_matrix(&mut self, name: &str, p: Param<Tensor<B, 2>>) -> Param<Tensor<B, 2>> {
        let _ = name;
        p
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
    if arch.hidden_act != "silu" {
        return Err(Error::Unsupported(format!(
            "hidden_act `{}` (only silu)",
            arch.hidden_act
        )));
    }
    if arch.layers.is_empty() {
        return Err(Error::Unsupported("a model without layers".into()));
    }
    for (i, l) in arch.layers.iter().enumerate() {
        let a = &l.attention;
        if a.kind != AttentionKind::Softmax {
            return Err(Error::Unsupported(format!(
                "layer {i}: attention kind {:?} (only softmax)",
                a.kind
            )));
        }
        if a.num_kv_heads == 0 || a.num_heads % a.num_kv_heads != 0 || a.head_dim % 2 != 0 {
            return Err(Error::Unsupported(format!(
                "layer {i}: {} query heads, {} kv heads, head_dim {}",
                a.num_heads, a.num_kv_heads, a.head_dim
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

/// Tensors read from the plan, by name, as `(shape, values)`.
type HostMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn load_group(plan: &Plan, expected: &[(String, Vec<usize>)]) -> Result<HostMap> {
    // Check everything first so that the error lists every problem.
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
    expected
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
        .collect()
}

fn take<B: Backend, const D: usize>(
    map: &mut HostMap,
    name: &str,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let (shape, values) = map.remove(name).expect("checked by load_group");
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

fn take_linear<B: Backend>(
    map: &mut HostMap,
    prefix: &str,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    Linear {
        weight: take(map, &format!("{prefix}.weight"), device),
        bias: bias.then(|| take(map, &format!("{prefix}.bias"), device)),
    }
}

fn take_norm<B: Backend>(
    map: &mut HostMap,
    name: &str,
    eps: f64,
    device: &B::Device,
) -> RmsNorm<B> {
    RmsNorm {
        weight: take(map, name, device),
        eps,
    }
}

impl<B: Backend> Llama<B> {
    /// Loads a model from `plan` (tensors in any stored dtype are decoded to f32, no temporary files).
    /// Missing tensors or shapes that disagree with the architecture give [`Error::Mismatch`];
    /// features the runtime lacks give [`Error::Unsupported`].
    pub fn from_plan(plan: &Plan, device: &B::Device) -> Result<Self> {
        let arch = &plan.arch;
        check_supported(arch)?;
        let h = arch.hidden_size;
        let eps = arch.rms_norm_eps;
        let mut top_expected = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![arch.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !arch.tie_word_embeddings {
            top_expected.push(("lm_head.weight".into(), vec![arch.vocab_size, h]));
        }
        let mut top = load_group(plan, &top_expected)?;
        let embed_tokens = take(&mut top, "model.embed_tokens.weight", device);
        let norm = take_norm(&mut top, "model.norm.weight", eps, device);
        let lm_head = (!arch.tie_word_embeddings).then(|| take(&mut top, "lm_head.weight", device));

        let mut layers = Vec::with_capacity(arch.layers.len());
        let mut ropes = Vec::with_capacity(arch.layers.len());
        for (i, l) in arch.layers.iter().enumerate() {
            let expected = layer_tensors(i, l, h);
            let mut m = load_group(plan, &expected)?;
            let p = format!("model.layers.{i}");
            let a = &l.attention;
            let self_attn = SelfAttention {
                q_proj: take_linear(&mut m, &format!("{p}.self_attn.q_proj"), a.qkv_bias, device),
                k_proj: take_linear(&mut m, &format!("{p}.self_attn.k_proj"), a.qkv_bias, device),
                v_proj: take_linear(&mut m, &format!("{p}.self_attn.v_proj"), a.qkv_bias, device),
                o_proj: take_linear(&mut m, &format!("{p}.self_attn.o_proj"), false, device),
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
                sliding_window: arch.sliding_window.unwrap_or(0),
            };
            let mlp = match &l.mlp {
                surgeon_formats::Mlp::Dense { .. } => Mlp::Dense(SwiGlu {
                    gate_proj: take_linear(&mut m, &format!("{p}.mlp.gate_proj"), false, device),
                    up_proj: take_linear(&mut m, &format!("{p}.mlp.up_proj"), false, device),
                    down_proj: take_linear(&mut m, &format!("{p}.mlp.down_proj"), false, device),
                }),
                surgeon_formats::Mlp::Moe {
                    num_experts,
                    top_k,
                    routing,
                    ..
                } => {
                    let q = format!("{p}.block_sparse_moe");
                    Mlp::Moe(MoeMlp {
                        gate: take_linear(&mut m, &format!("{q}.gate"), false, device),
                        experts: (0..*num_experts)
                            .map(|e| SwiGlu {
                                gate_proj: take_linear(
                                    &mut m,
                                    &format!("{q}.experts.{e}.w1"),
                                    false,
                                    device,
                                ),
                                up_proj: take_linear(
                                    &mut m,
                                    &format!("{q}.experts.{e}.w3"),
                                    false,
                                    device,
                                ),
                                down_proj: take_linear(
                                    &mut m,
                                    &format!("{q}.experts.{e}.w2"),
                                    false,
                                    device,
                                ),
                            })
                            .collect(),
                        top_k: *top_k,
                        scale: match routing {
                            MoeRouting::Mixtral => 1.0,
                            MoeRouting::Scaled { scale } => *scale,
                        },
                    })
                }
            };
            layers.push(DecoderLayer {
                input_layernorm: take_norm(
                    &mut m,
                    &format!("{p}.input_layernorm.weight"),
                    eps,
                    device,
                ),
                self_attn,
                post_attention_layernorm: take_norm(
                    &mut m,
                    &format!("{p}.post_attention_layernorm.weight"),
                    eps,
                    device,
                ),
                mlp,
            });
            ropes.push(Rope::new(
                a.head_dim,
                arch.rope_theta,
                arch.rope_scaling.as_ref(),
            )?);
        }
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: ropes,
        })
    }

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

    /// Logits of `tokens` that continue the positions held in `cache` (which is extended).
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
        embedding(self.embed_tokens.val(), tokens)
    }

    /// Runs decoder layers `range` over hidden states `x` (positions continue `cache` if given; without
    /// a cache positions start at 0). Lets callers capture per-layer outputs (attention transfer).
    pub fn layers_forward(
        &self,
        mut x: Tensor<B, 3>,
        range: std::ops::Range<usize>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let t = x.dims()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let device = x.device();
        let mut tables: Vec<(usize, Tensor<B, 4>, Tensor<B, 4>)> = vec![];
        for i in range.clone() {
            let layer = &self.layers[i];
            let rope = &self.rope[i];
            let d = layer.self_attn.head_dim;
            if !tables.iter().any(|(dd, ..)| *dd == d) {
                let (c, s) = rope.tables::<B>(start, t, &device);
                tables.push((d, c, s));
            }
            let (_, cos, sin) = tables.iter().find(|(dd, ..)| *dd == d).unwrap();
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, cos, sin, slot);
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
        hidden
            .reshape([b * t, h])
            .matmul(w.transpose())
            .reshape([b, t, v])
    }

    /// Calls `f` with every parameter and its HF tensor name, in model order.
    pub fn visit_named(&self, f: &mut dyn FnMut(&str, ParamRef<'_, B>)) {
        fn lin<B: Backend>(f: &mut dyn FnMut(&str, ParamRef<'_, B>), p: &str, l: &Linear<B>) {
            f(&format!("{p}.weight"), ParamRef::Matrix(&l.weight));
            if let Some(b) = &l.bias {
                f(&format!("{p}.bias"), ParamRef::Vector(b));
            }
        }
        f(
            "model.embed_tokens.weight",
            ParamRef::Matrix(&self.embed_tokens),
        );
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            f(
                &format!("{p}.input_layernorm.weight"),
                ParamRef::Vector(&l.input_layernorm.weight),
            );
            lin(f, &format!("{p}.self_attn.q_proj"), &l.self_attn.q_proj);
            lin(f, &format!("{p}.self_attn.k_proj"), &l.self_attn.k_proj);
            lin(f, &format!("{p}.self_attn.v_proj"), &l.self_attn.v_proj);
            lin(f, &format!("{p}.self_attn.o_proj"), &l.self_attn.o_proj);
            f(
                &format!("{p}.post_attention_layernorm.weight"),
                ParamRef::Vector(&l.post_attention_layernorm.weight),
            );
            match &l.mlp {
                Mlp::Dense(m) => {
                    lin(f, &format!("{p}.mlp.gate_proj"), &m.gate_proj);
                    lin(f, &format!("{p}.mlp.up_proj"), &m.up_proj);
                    lin(f, &format!("{p}.mlp.down_proj"), &m.down_proj);
                }
                Mlp::Moe(m) => {
                    let q = format!("{p}.block_sparse_moe");
                    lin(f, &format!("{q}.gate"), &m.gate);
                    for (e, x) in m.experts.iter().enumerate() {
                        lin(f, &format!("{q}.experts.{e}.w1"), &x.gate_proj);
                        lin(f, &format!("{q}.experts.{e}.w2"), &x.down_proj);
                        lin(f, &format!("{q}.experts.{e}.w3"), &x.up_proj);
                    }
                }
            }
        }
        f("model.norm.weight", ParamRef::Vector(&self.norm.weight));
        if let Some(w) = &self.lm_head {
            f("lm_head.weight", ParamRef::Matrix(w));
        }
    }

    /// Every parameter's id and HF tensor name, in model order.
    pub fn param_names(&self) -> Vec<(ParamId, String)> {
        let mut out = vec![];
        self.visit_named(&mut |n, p| out.push((p.id(), n.to_string())));
        out
    }

    /// Rebuilds the model with every parameter passed through `mapper` together with its HF name.
    pub fn map_named(self, mapper: &mut dyn NamedParamMapper<B>) -> Self {
        fn lin<B: Backend>(m: &mut dyn NamedParamMapper<B>, p: &str, l: Linear<B>) -> Linear<B> {
            Linear {
                weight: m.map_matrix(&format!("{p}.weight"), l.weight),
                bias: l.bias.map(|b| m.map_vector(&format!("{p}.bias"), b)),
            }
        }
        fn norm<B: Backend>(
            m: &mut dyn NamedParamMapper<B>,
            name: &str,
            n: RmsNorm<B>,
        ) -> RmsNorm<B> {
            RmsNorm {
                weight: m.map_vector(name, n.weight),
                eps: n.eps,
            }
        }
        let Llama {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            rope,
        } = self;
        let embed_tokens = mapper.map_matrix("model.embed_tokens.weight", embed_tokens);
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let p = format!("model.layers.{i}");
                let a = l.self_attn;
                let input_layernorm = norm(
                    mapper,
                    &format!("{p}.input_layernorm.weight"),
                    l.input_layernorm,
                );
                let self_attn = SelfAttention {
                    q_proj: lin(mapper, &format!("{p}.self_attn.q_proj"), a.q_proj),
                    k_proj: lin(mapper, &format!("{p}.self_attn.k_proj"), a.k_proj),
                    v_proj: lin(mapper, &format!("{p}.self_attn.v_proj"), a.v_proj),
                    o_proj: lin(mapper, &format!("{p}.self_attn.o_proj"), a.o_proj),
                    ..a
                };
                let post_attention_layernorm = norm(
                    mapper,
                    &format!("{p}.post_attention_layernorm.weight"),
                    l.post_attention_layernorm,
                );
                let mlp = match l.mlp {
                    Mlp::Dense(m) => Mlp::Dense(SwiGlu {
                        gate_proj: lin(mapper, &format!("{p}.mlp.gate_proj"), m.gate_proj),
                        up_proj: lin(mapper, &format!("{p}.mlp.up_proj"), m.up_proj),
                        down_proj: lin(mapper, &format!("{p}.mlp.down_proj"), m.down_proj),
                    }),
                    Mlp::Moe(m) => {
                        let q = format!("{p}.block_sparse_moe");
                        Mlp::Moe(MoeMlp {
                            gate: lin(mapper, &format!("{q}.gate"), m.gate),
                            experts: m
                                .experts
                                .into_iter()
                                .enumerate()
                                .map(|(e, x)| {
                                    let gate_proj =
                                        lin(mapper, &format!("{q}.experts.{e}.w1"), x.gate_proj);
                                    let down_proj =
                                        lin(mapper, &format!("{q}.experts.{e}.w2"), x.down_proj);
                                    let up_proj =
                                        lin(mapper, &format!("{q}.experts.{e}.w3"), x.up_proj);
                                    SwiGlu {
                                        gate_proj,
                                        up_proj,
                                        down_proj,
                                    }
                                })
                                .collect(),
                            top_k: m.top_k,
                            scale: m.scale,
                        })
                    }
                };
                DecoderLayer {
                    input_layernorm,
                    self_attn,
                    post_attention_layernorm,
                    mlp,
                }
            })
            .collect();
        let final_norm = norm(mapper, "model.norm.weight", final_norm);
        let lm_head = lm_head.map(|w| mapper.map_matrix("lm_head.weight", w));
        Llama {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            rope,
        }
    }

    /// Marks parameters whose HF name satisfies `frozen` as not requiring gradients (and the others as
    /// requiring them). Only meaningful under an autodiff backend.
    pub fn freeze_where(self, frozen: impl Fn(&str) -> bool) -> Self {
        struct Freeze<F>(F);
        impl<B: Backend, F: Fn(&str) -> bool> NamedParamMapper<B> for Freeze<F> {
            fn map_vector(&mut self, name: &str, p: Param<Tensor<B, 1>>) -> Param<Tensor<B, 1>> {
                p.set_require_grad(!(self.0)(name))
            }
            fn map_matrix(&mut self, name: &str, p: Param<Tensor<B, 2>>) -> Param<Tensor<B, 2>> {
                p.set_require_grad(!(self.0)(name))
            }
        }
        self.map_named(&mut Freeze(frozen))
    }

    /// Exports the weights into a copy of `base` (same architecture): every tensor becomes an inline f32
    /// [`HostTensor`] labelled `trained`, written later in the dtype `base` declared for it.
    pub fn to_plan(&self, base: &Plan) -> Result<Plan> {
        let mut plan = base.clone();
        let mut problems = vec![];
        self.visit_named(&mut |name, p| {
            let shape = p.shape();
            if let Some(entry) = base.tensors.get(name) {
                if entry.shape() != shape {
                    problems.push(format!(
                        "tensor `{name}`: model has shape {shape:?}, base plan {:?}",
                        entry.shape()
                    ));
                    return;
                }
            }
            let values = p.to_f32();
            let source = Source::inline("trained", HostTensor::from_f32(shape, &values));
            let dtype = base
                .tensors
                .get(name)
                .map_or(surgeon_formats::DType::F32, |e| e.dtype);
            plan.tensors
                .insert(name.to_string(), TensorEntry { source, dtype });
        });
        if !problems.is_empty() {
            return Err(mismatch(base, problems.join("; ")));
        }
        Ok(plan)
    }
}
