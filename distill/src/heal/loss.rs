//! Training objectives.
//!
//! KD convention: `kd = T^2 * mean_tokens KL(p_T || p_S)` with `p = softmax(z / T)` when
//! `scale_t2` is set (Hinton), plain `mean_tokens KL` otherwise. The gradient of the unscaled
//! per-token KL with respect to the student logits is `(p_S - p_T) / T`; with the `T^2` factor
//! it is `T * (p_S - p_T)` (each divided by the number of tokens, from the mean).
use super::model::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Mean next-token cross-entropy of `logits: [b, t, V]` against `targets: [b, t]`.
pub fn lm_loss<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t] = targets.dims();
    let lp = log_softmax(logits, 2);
    lp.gather(2, targets.reshape([b, t, 1])).neg().mean()
}

/// Sum (not mean) of next-token negative log-likelihoods, for perplexity.
pub fn nll_sum<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t] = targets.dims();
    let lp = log_softmax(logits, 2);
    lp.gather(2, targets.reshape([b, t, 1])).neg().sum()
}

/// Forward KL(teacher || student) at temperature `t`, averaged over tokens (see module docs).
/// Exactly 0 when the logits are bitwise equal (both sides go through the same `log_softmax`).
pub fn kd_loss<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    t: f64,
    scale_t2: bool,
) -> Tensor<B, 1> {
    let ls = log_softmax(student.div_scalar(t), 2);
    let lt = log_softmax(teacher.div_scalar(t), 2);
    let pt = lt.clone().exp();
    let kl = (pt * (lt - ls)).sum_dim(2).mean();
    if scale_t2 {
        kl.mul_scalar(t * t)
    } else {
        kl
    }
}
