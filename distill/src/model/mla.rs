//! DeepSeek-V3 multi-head latent attention, as transformers' `DeepseekV3Attention` computes it.
//!
//! Queries: `q_proj(x)`, or `q_b_proj(q_a_layernorm(q_a_proj(x)))` with `q_lora_rank`; each head
//! `[non-rotary (qk_nope_head_dim) | rotary (qk_rope_head_dim)]`. Keys and values:
//! `kv_a_proj_with_mqa(x)` = `[latent (kv_lora_rank) | rotary key (qk_rope_head_dim)]`; the latent
//! passes `kv_a_layernorm` (always, eps 1e-6) and `kv_b_proj`, which gives every head its
//! non-rotary key and its value (per head: key rows, then value rows); the one rotary key is shared
//! by all heads. Rotary features are stored in interleaved pairs (`x0, x1`), (`x2, x3`), ...:
//! de-interleaving them (even features, then odd ones) and applying the rotate-half rotary
//! embedding is what `apply_rotary_pos_emb_interleave` computes, bit for bit the same layout out.
//! Scores are scaled by `qk_head_dim^-0.5` (times yarn's `mscale_all_dim` factor squared).
//!
//! The cache keeps what DeepSeek-V3 caches: per token the normalised latent and the rotary key
//! after RoPE (`kv_lora_rank + qk_rope_head_dim` numbers), in [`LayerCache::buffer`] as `[B, 1, n, R]`
//! and `[B, 1, n, r]`; keys and values are expanded from it at every step.
use super::{
    apply_rope, causal_attention, heads_first, KvBuffer, LayerCache, Linear, Positions, RmsNorm,
    ScoreRule, VarBuilder,
};
use crate::error::{Error, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use surgeon_formats::{Attention, AttentionKind};

/// `eps` of `q_a_layernorm` and `kv_a_layernorm` (transformers builds them with the default).
pub const LATENT_NORM_EPS: f64 = 1e-6;

/// How queries are projected: one matrix, or a low-rank pair with a norm between.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum QueryProj<B: Backend> {
    /// `q_proj`.
    Full(Linear<B>),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank(LowRankQuery<B>),
}

/// Queries through a low-rank bottleneck (`q_lora_rank`) with an RMSNorm in it.
#[derive(Module, Debug)]
pub struct LowRankQuery<B: Backend> {
    pub q_a_proj: Linear<B>,
    pub q_a_layernorm: RmsNorm<B>,
    pub q_b_proj: Linear<B>,
}

impl<B: Backend> QueryProj<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            QueryProj::Full(q) => q.forward(x),
            QueryProj::LowRank(q) => q
                .q_b_proj
                .forward(q.q_a_layernorm.forward(q.q_a_proj.forward(x))),
        }
    }
}

/// One layer's latent attention (HF `self_attn` of a DeepSeek-V3 layer).
#[derive(Module, Debug)]
pub struct Mla<B: Backend> {
    pub q: QueryProj<B>,
    pub kv_a_proj_with_mqa: Linear<B>,
    pub kv_a_layernorm: RmsNorm<B>,
    pub kv_b_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Multiplier of the scores.
    pub scaling: f64,
}

/// The latent-attention sizes of `a`, or an error when it is not latent attention.
fn sizes(a: &Attention) -> Result<(usize, Option<usize>, usize)> {
    match a.kind {
        AttentionKind::Mla {
            kv_lora_rank,
            q_lora_rank,
            qk_rope_head_dim,
        } => Ok((kv_lora_rank, q_lora_rank, qk_rope_head_dim)),
        _ => Err(Error::Unsupported(
            "latent attention loaded for another kind".into(),
        )),
    }
}

impl<B: Backend> Mla<B> {
    /// Loads the projections and norms under `vb` (HF `self_attn`); `rope_scaling` sets the
    /// score scale (yarn's `mscale_all_dim`).
    pub fn load(
        vb: &mut VarBuilder<'_, '_, B>,
        a: &Attention,
        rope_scaling: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let (kv_lora_rank, q_lora_rank, rope) = sizes(a)?;
        let q = match q_lora_rank {
            None => QueryProj::Full(Linear::load(&mut vb.pp("q_proj"), false)?),
            Some(_) => QueryProj::LowRank(LowRankQuery {
                q_a_proj: Linear::load(&mut vb.pp("q_a_proj"), false)?,
                q_a_layernorm: RmsNorm::load(&mut vb.pp("q_a_layernorm"), LATENT_NORM_EPS)?,
                q_b_proj: Linear::load(&mut vb.pp("q_b_proj"), false)?,
            }),
        };
        Ok(Mla {
            q,
            kv_a_proj_with_mqa: Linear::load(&mut vb.pp("kv_a_proj_with_mqa"), false)?,
            kv_a_layernorm: RmsNorm::load(&mut vb.pp("kv_a_layernorm"), LATENT_NORM_EPS)?,
            kv_b_proj: Linear::load(&mut vb.pp("kv_b_proj"), false)?,
            o_proj: Linear::load(&mut vb.pp("o_proj"), false)?,
            num_heads: a.num_heads,
            kv_lora_rank,
            qk_nope_head_dim: a.head_dim - rope,
            qk_rope_head_dim: rope,
            v_head_dim: a.v_head_dim,
            scaling: (a.head_dim as f64).powf(-0.5) * yarn_mscale_squared(rope_scaling),
        })
    }

    /// The attention's output before `o_proj`, heads concatenated: `[B, T, num_heads * v_head_dim]`.
    /// With `cache`, the latents and rotary keys of earlier positions are read from it and the new
    /// ones appended.
    pub fn heads(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, r) = (self.num_heads, self.qk_rope_head_dim);
        let (cos, sin) = pos.rope(r);
        let q =
            heads_first(
                self.q
                    .forward(x.clone())
                    .reshape([b, t, h, self.qk_nope_head_dim + r]),
            );
        let q_rot = apply_rope(
            deinterleave(q.clone().narrow(3, self.qk_nope_head_dim, r)),
            cos,
            sin,
        );
        let q = match self.qk_nope_head_dim {
            0 => q_rot,
            n => Tensor::cat(vec![q.narrow(3, 0, n), q_rot], 3),
        };
        let (latent, k_rot) = self.compress(x, pos);
        let (latent, k_rot) = match cache {
            Some(slot) => KvBuffer::append(&mut slot.buffer, latent, k_rot),
            None => (latent, k_rot),
        };
        let (k, v) = self.expand(latent, k_rot);
        let rule = ScoreRule {
            scale: self.scaling,
            softcap: None,
            window: 0,
        };
        let d = q.dims()[3];
        let y = causal_attention(q.reshape([b, h, 1, t, d]), k, v, pos, rule);
        y.reshape([b, h, t, self.v_head_dim])
            .swap_dims(1, 2)
            .reshape([b, t, h * self.v_head_dim])
    }

    /// What the cache holds for tokens `x` `[B, T, h]`: the normalised latent `[B, 1, T, R]` and
    /// the rotary key after RoPE `[B, 1, T, r]`.
    pub fn compress(&self, x: Tensor<B, 3>, pos: &Positions<B>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (rank, r) = (self.kv_lora_rank, self.qk_rope_head_dim);
        let ckv = self.kv_a_proj_with_mqa.forward(x);
        let latent = self
            .kv_a_layernorm
            .forward(ckv.clone().narrow(2, 0, rank))
            .unsqueeze_dim::<4>(1);
        let (cos, sin) = pos.rope(r);
        let k_rot = apply_rope(
            deinterleave(ckv.narrow(2, rank, r).unsqueeze_dim::<4>(1)),
            cos,
            sin,
        );
        (latent, k_rot)
    }

    /// Keys `[B, H, n, nope + r]` and values `[B, H, n, dv]` from latents `[B, 1, n, R]` and rotary
    /// keys `[B, 1, n, r]`.
    pub fn expand(
        &self,
        latent: Tensor<B, 4>,
        k_rot: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, _, n, _] = latent.dims();
        let (h, nope, dv, r) = (
            self.num_heads,
            self.qk_nope_head_dim,
            self.v_head_dim,
            self.qk_rope_head_dim,
        );
        let kv = heads_first(self.kv_b_proj.forward(latent).reshape([b, n, h, nope + dv]));
        let v = kv.clone().narrow(3, nope, dv);
        let k_rot = k_rot.expand([b, h, n, r]);
        let k = match nope {
            0 => k_rot,
            _ => Tensor::cat(vec![kv.narrow(3, 0, nope), k_rot], 3),
        };
        (k, v)
    }
}

/// Interleaved rotary pairs `[.., (x0, x1), (x2, x3), ..]` to rotate-half layout
/// `[.., x0, x2, .., x1, x3, ..]` (last dimension).
pub fn deinterleave<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, r] = x.dims();
    x.reshape([b, h, t, r / 2, 2])
        .swap_dims(3, 4)
        .reshape([b, h, t, r])
}

/// yarn's extra score factor `mscale(factor, mscale_all_dim)^2` (transformers'
/// `yarn_apply_mscale`), 1 without yarn scaling.
pub fn yarn_mscale_squared(rope_scaling: Option<&serde_json::Value>) -> f64 {
    let Some(s) = rope_scaling.filter(|s| !s.is_null()) else {
        return 1.0;
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let all_dim = s
        .get("mscale_all_dim")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let factor = s.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0);
    if kind == "default" || all_dim == 0.0 || factor <= 1.0 {
        return 1.0;
    }
    let m = 0.1 * all_dim * factor.ln() + 1.0;
    m * m
}

/// The attention half of a DeepSeek-V3 layer: `input_layernorm` and the latent `self_attn`.
#[derive(Module, Debug)]
pub struct MlaBlock<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Mla<B>,
}
