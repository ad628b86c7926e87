//! Gemma 2 / Gemma 3 pieces of the decoder, as transformers computes them: the tanh-approximated
//! GELU of GeGLU, soft-capping of attention scores and logits, and the Gemma-specific settings of
//! a loaded layer ((1 + w) norms, the attention scale, per-layer sliding window).
use super::SelfAttention;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use surgeon_formats::{Attention, ModelArch};

/// `gelu_pytorch_tanh`: `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
    let inner =
        (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(sqrt_2_over_pi);
    x.mul_scalar(0.5) * (inner.tanh() + 1.0)
}

/// `c * tanh(x / c)` (Gemma's attention and final logit soft-capping).
pub fn softcap<B: Backend, const D: usize>(x: Tensor<B, D>, c: f64) -> Tensor<B, D> {
    x.div_scalar(c).tanh().mul_scalar(c)
}

/// The factor of Gemma's embeddings: sqrt(hidden) rounded to the embedding's stored dtype, as
/// transformers multiplies by `embed_scale.to(weight.dtype)` (55.4256 becomes 55.5 in bf16).
pub fn embed_scale(hidden_size: usize, dtype: surgeon_formats::DType) -> f32 {
    let s = (hidden_size as f64).sqrt() as f32;
    match dtype {
        surgeon_formats::DType::BF16 => half::bf16::from_f32(s).to_f32(),
        surgeon_formats::DType::F16 => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// The sliding window of layer attention `a` (0: none): a Gemma `full_attention` layer ignores
/// the model's window.
pub fn layer_window(arch: &ModelArch, a: &Attention) -> usize {
    match a.full_attention {
        true => 0,
        false => arch.sliding_window.unwrap_or(0),
    }
}

/// Gemma's attention settings on a loaded layer: `q . k / sqrt(query_pre_attn_scalar)`, scores
/// soft-capped, q/k norms of the (1 + w) kind, a sliding layer's local RoPE base (Gemma 3).
pub fn configure_attention<B: Backend>(
    att: &mut SelfAttention<B>,
    arch: &ModelArch,
    a: &Attention,
) {
    let g = &arch.gemma;
    att.local_rope = !a.full_attention && g.rope_local_theta.is_some();
    if let Some(s) = g.query_pre_attn_scalar {
        att.scale = 1.0 / s.sqrt();
    }
    att.softcap = g.attn_logit_softcapping;
    let offset = arch.family.norm_offset();
    for norm in [&mut att.q_norm, &mut att.k_norm].into_iter().flatten() {
        norm.offset = offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RmsNorm;
    use burn::module::Param;
    use burn::tensor::TensorData;
    type B = burn::backend::Flex;

    /// LLaMA Pro on Gemma rests on this: a zeroed projection followed by a (1 + w) post-norm
    /// still adds exactly zero to the residual stream.
    #[test]
    fn a_gemma_norm_of_zeros_is_zeros() {
        let dev = Default::default();
        let norm = RmsNorm::<B> {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::from([0.5f32, -0.3, 2.0]),
                &dev,
            )),
            eps: 1e-6,
            offset: 1.0,
        };
        let out = norm.forward(Tensor::<B, 2>::zeros([2, 3], &dev));
        assert!(out
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0));
        let one = norm.forward(Tensor::<B, 2>::from_data(
            TensorData::from([[1f32, 1.0, 1.0]]),
            &dev,
        ));
        let got = one.into_data().to_vec::<f32>().unwrap();
        for (g, w) in got.iter().zip([1.5f32, 0.7, 3.0]) {
            assert!((g - w / (1.0f32 + 1e-6).sqrt()).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn embed_scale_is_rounded_to_the_embedding_dtype() {
        use surgeon_formats::DType;
        assert_eq!(embed_scale(3072, DType::BF16), 55.5);
        assert_eq!(embed_scale(3072, DType::F32), 3072f32.sqrt());
        assert_eq!(embed_scale(64, DType::BF16), 8.0);
    }

    #[test]
    fn gelu_tanh_and_softcap_match_their_formulas() {
        let dev = Default::default();
        let xs = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let x = Tensor::<B, 1>::from_data(TensorData::from(xs), &dev);
        let g = gelu_tanh(x.clone()).into_data().to_vec::<f32>().unwrap();
        let c = softcap(x, 2.0).into_data().to_vec::<f32>().unwrap();
        for (i, &v) in xs.iter().enumerate() {
            let v = v as f64;
            let want = 0.5
                * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
            assert!((g[i] as f64 - want).abs() < 1e-6, "gelu {v}");
            assert!(
                (c[i] as f64 - 2.0 * (v / 2.0).tanh()).abs() < 1e-6,
                "softcap {v}"
            );
        }
    }
}
