//! A compact Llama-family training model for healing: every weight is a burn [`Param`] kept in
//! Hugging Face layout (`nn.Linear` weights `[out, in]`), with a stable [`ParamId`] derived from the
//! HF tensor name so that optimizer records survive a reload (resume).
//!
//! This is the healing loop's stand-in until the shared runtime model (`distill::model`, branch
//! `runtime`) offers the same three things: load from a plan with chosen trainable tensors, a
//! `ParamId -> HF name` map, and export of parameter values back into a plan.
use super::{HealError, Result};
use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use surgeon_formats::{AttentionKind, Mlp, ModelArch, Plan};

/// Static shape information (not a parameter).
#[derive(Clone, Debug)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub rope_theta: f64,
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_norm: Param<Tensor<B, 1>>,
    pub q: Param<Tensor<B, 2>>,
    pub k: Param<Tensor<B, 2>>,
    pub v: Param<Tensor<B, 2>>,
    pub o: Param<Tensor<B, 2>>,
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub k_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
    pub post_norm: Param<Tensor<B, 1>>,
    pub gate: Param<Tensor<B, 2>>,
    pub up: Param<Tensor<B, 2>>,
    pub down: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct TrainModel<B: Backend> {
    pub embed: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub norm: Param<Tensor<B, 1>>,
    /// `None` when embeddings are tied.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    #[module(skip)]
    pub dims: Dims,
}

/// A stable parameter id from an HF tensor name (FNV-1a), so ids agree across processes.
pub fn param_id_for(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

/// Checks that the runtime can run this architecture.
pub fn check_supported(arch: &ModelArch) -> Result<()> {
    let att = arch
        .uniform_attention()
        .ok_or_else(|| HealError::Unsupported("layers with different attention shapes".into()))?;
    if att.kind != AttentionKind::Softmax {
        return Err(HealError::Unsupported("non-softmax attention".into()));
    }
    for l in &arch.layers {
        if !matches!(l.mlp, Mlp::Dense { .. }) {
            return Err(HealError::Unsupported("MoE layers".into()));
        }
    }
    if arch.hidden_act != "silu" {
        return Err(HealError::Unsupported(format!(
            "activation `{}`",
            arch.hidden_act
        )));
    }
    Ok(())
}

fn load_param<B: Backend, const D: usize>(
    plan: &Plan,
    name: &str,
    trainable: &dyn Fn(&str) -> bool,
    device: &B::Device,
) -> Result<Param<Tensor<B, D>>> {
    let (shape, values) = plan.load_f32(name)?;
    if shape.len() != D {
        return Err(HealError::Invalid(format!(
            "{}: tensor `{name}` has shape {shape:?}, expected rank {D}",
            plan.origin
        )));
    }
    let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), device);
    let p = Param::initialized(param_id_for(name), t);
    Ok(p.set_require_grad(trainable(name)))
}

impl<B: Backend> TrainModel<B> {
    /// Loads every tensor of `plan`; tensors for which `trainable(name)` is false do not require grad.
    pub fn from_plan(
        plan: &Plan,
        trainable: &dyn Fn(&str) -> bool,
        device: &B::Device,
    ) -> Result<Self> {
        let arch = &plan.arch;
        check_supported(arch)?;
        let att = arch.uniform_attention().unwrap().clone();
        let mut layers = Vec::with_capacity(arch.num_layers());
        for i in 0..arch.num_layers() {
            let p = format!("model.layers.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let bias = |s: &str| -> Result<Option<Param<Tensor<B, 1>>>> {
                if att.qkv_bias {
                    Ok(Some(load_param(plan, &n(s), trainable, device)?))
                } else {
                    Ok(None)
                }
            };
            layers.push(Block {
                input_norm: load_param(plan, &n("input_layernorm.weight"), trainable, device)?,
                q: load_param(plan, &n("self_attn.q_proj.weight"), trainable, device)?,
                k: load_param(plan, &n("self_attn.k_proj.weight"), trainable, device)?,
                v: load_param(plan, &n("self_attn.v_proj.weight"), trainable, device)?,
                o: load_param(plan, &n("self_attn.o_proj.weight"), trainable, device)?,
                q_bias: bias("self_attn.q_proj.bias")?,
                k_bias: bias("self_attn.k_proj.bias")?,
                v_bias: bias("self_attn.v_proj.bias")?,
                post_norm: load_param(
                    plan,
                    &n("post_attention_layernorm.weight"),
                    trainable,
                    device,
                )?,
                gate: load_param(plan, &n("mlp.gate_proj.weight"), trainable, device)?,
                up: load_param(plan, &n("mlp.up_proj.weight"), trainable, device)?,
                down: load_param(plan, &n("mlp.down_proj.weight"), trainable, device)?,
            });
        }
        let lm_head = if arch.tie_word_embeddings {
            None
        } else {
            Some(load_param(plan, "lm_head.weight", trainable, device)?)
        };
        Ok(TrainModel {
            embed: load_param(plan, "model.embed_tokens.weight", trainable, device)?,
            layers,
            norm: load_param(plan, "model.norm.weight", trainable, device)?,
            lm_head,
            dims: Dims {
                hidden: arch.hidden_size,
                heads: att.num_heads,
                kv_heads: att.num_kv_heads,
                head_dim: att.head_dim,
                vocab: arch.vocab_size,
                eps: arch.rms_norm_eps,
                rope_theta: arch.rope_theta,
            },
        })
    }

    /// Every parameter with its HF tensor name and rank.
    pub fn named_params(&self) -> Vec<(ParamId, String, usize)> {
        let mut out = vec![(self.embed.id, "model.embed_tokens.weight".to_string(), 2)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut push = |id: ParamId, s: &str, r: usize| out.push((id, format!("{p}.{s}"), r));
            push(l.input_norm.id, "input_layernorm.weight", 1);
            push(l.q.id, "self_attn.q_proj.weight", 2);
            push(l.k.id, "self_attn.k_proj.weight", 2);
            push(l.v.id, "self_attn.v_proj.weight", 2);
            push(l.o.id, "self_attn.o_proj.weight", 2);
            if let (Some(q), Some(k), Some(v)) = (&l.q_bias, &l.k_bias, &l.v_bias) {
                push(q.id, "self_attn.q_proj.bias", 1);
                push(k.id, "self_attn.k_proj.bias", 1);
                push(v.id, "self_attn.v_proj.bias", 1);
            }
            push(l.post_norm.id, "post_attention_layernorm.weight", 1);
            push(l.gate.id, "mlp.gate_proj.weight", 2);
            push(l.up.id, "mlp.up_proj.weight", 2);
            push(l.down.id, "mlp.down_proj.weight", 2);
        }
        out.push((self.norm.id, "model.norm.weight".into(), 1));
        if let Some(h) = &self.lm_head {
            out.push((h.id, "lm_head.weight".into(), 2));
        }
        out
    }

    /// Values of the tensor called `name` (HF layout) as f32.
    pub fn tensor_f32(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        fn get<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> (Vec<usize>, Vec<f32>) {
            let t = p.val();
            let shape = t.dims().to_vec();
            let v = t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            (shape, v)
        }
        if name == "model.embed_tokens.weight" {
            return Some(get(&self.embed));
        }
        if name == "model.norm.weight" {
            return Some(get(&self.norm));
        }
        if name == "lm_head.weight" {
            return self.lm_head.as_ref().map(get);
        }
        let (i, rest) = surgeon_formats::arch::split_layer_name(name)?;
        let l = self.layers.get(i)?;
        Some(match rest {
            "input_layernorm.weight" => get(&l.input_norm),
            "self_attn.q_proj.weight" => get(&l.q),
            "self_attn.k_proj.weight" => get(&l.k),
            "self_attn.v_proj.weight" => get(&l.v),
            "self_attn.o_proj.weight" => get(&l.o),
            "self_attn.q_proj.bias" => get(l.q_bias.as_ref()?),
            "self_attn.k_proj.bias" => get(l.k_bias.as_ref()?),
            "self_attn.v_proj.bias" => get(l.v_bias.as_ref()?),
            "post_attention_layernorm.weight" => get(&l.post_norm),
            "mlp.gate_proj.weight" => get(&l.gate),
            "mlp.up_proj.weight" => get(&l.up),
            "mlp.down_proj.weight" => get(&l.down),
            _ => return None,
        })
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (no cache, causal).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let d = &self.dims;
        let device = tokens.device();
        let x = self
            .embed
            .val()
            .select(0, tokens.reshape([b * t]))
            .reshape([b, t, d.hidden]);
        let (cos, sin) = rope_tables::<B>(t, d.head_dim, d.rope_theta, &device);
        // `tril_mask` is true strictly above the diagonal: the future positions to hide.
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device)
            .reshape([1, 1, t, t])
            .expand([b, d.heads, t, t]);
        let mut x = x;
        for l in &self.layers {
            x = l.forward(x, d, &cos, &sin, &mask);
        }
        let x = rms_norm(x, &self.norm.val(), d.eps);
        let head = match &self.lm_head {
            Some(h) => h.val(),
            None => self.embed.val(),
        };
        linear(x, &head)
    }
}

/// `x @ w^T` for `x: [b, t, in]`, `w: [out, in]`.
fn linear<B: Backend>(x: Tensor<B, 3>, w: &Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, t, i] = x.dims();
    let out = w.dims()[0];
    x.reshape([b * t, i])
        .matmul(w.clone().transpose())
        .reshape([b, t, out])
}

fn rms_norm<B: Backend>(x: Tensor<B, 3>, w: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let h = w.dims()[0];
    let inv = x
        .clone()
        .powi_scalar(2)
        .mean_dim(2)
        .add_scalar(eps)
        .sqrt()
        .recip();
    x * inv * w.clone().reshape([1, 1, h])
}

/// HF rotate-half RoPE tables `[t, head_dim]` (each frequency repeated in both halves).
fn rope_tables<B: Backend>(
    t: usize,
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * head_dim);
    let mut sin = Vec::with_capacity(t * head_dim);
    for pos in 0..t {
        for j in 0..head_dim {
            let f = 1.0 / theta.powf((2 * (j % half)) as f64 / head_dim as f64);
            let a = pos as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [t, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [t, head_dim]), device),
    )
}

fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
    let rot = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().reshape([1, 1, t, d]) + rot * sin.clone().reshape([1, 1, t, d])
}

impl<B: Backend> Block<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        d: &Dims,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
        mask: &Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (hd, nh, nkv) = (d.head_dim, d.heads, d.kv_heads);
        let hn = rms_norm(x.clone(), &self.input_norm.val(), d.eps);
        let add_bias = |y: Tensor<B, 3>, bias: &Option<Param<Tensor<B, 1>>>| match bias {
            Some(bb) => {
                let n = bb.dims()[0];
                y + bb.val().reshape([1, 1, n])
            }
            None => y,
        };
        let q = add_bias(linear(hn.clone(), &self.q.val()), &self.q_bias);
        let k = add_bias(linear(hn.clone(), &self.k.val()), &self.k_bias);
        let v = add_bias(linear(hn, &self.v.val()), &self.v_bias);
        let q = q.reshape([b, t, nh, hd]).swap_dims(1, 2);
        let k = k.reshape([b, t, nkv, hd]).swap_dims(1, 2);
        let v = v.reshape([b, t, nkv, hd]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let rep = nh / nkv;
        let (k, v) = if rep > 1 {
            (
                k.reshape([b, nkv, 1, t, hd])
                    .repeat_dim(2, rep)
                    .reshape([b, nh, t, hd]),
                v.reshape([b, nkv, 1, t, hd])
                    .repeat_dim(2, rep)
                    .reshape([b, nh, t, hd]),
            )
        } else {
            (k, v)
        };
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            .mask_fill(mask.clone(), -1.0e30);
        let att = softmax(scores, 3).matmul(v);
        let att = att.swap_dims(1, 2).reshape([b, t, nh * hd]);
        let x = x + linear(att, &self.o.val());
        let hn = rms_norm(x.clone(), &self.post_norm.val(), d.eps);
        let m = silu(linear(hn.clone(), &self.gate.val())) * linear(hn, &self.up.val());
        x + linear(m, &self.down.val())
    }
}

/// Softmax over `dim` from primitive ops. burn's fused `softmax`/`log_softmax` differ bitwise between
/// `Autodiff<B>` and `B` (autodiff decomposes them); these compute the same on both, so a teacher on
/// the inner backend and an identical student agree bitwise (KD loss exactly 0).
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let e = (x.clone() - x.max_dim(dim).detach()).exp();
    e.clone() / e.sum_dim(dim)
}

/// `log(softmax(x))` over `dim` from primitive ops (see [`softmax`]).
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let z = x.clone() - x.max_dim(dim).detach();
    z.clone() - z.exp().sum_dim(dim).log()
}
