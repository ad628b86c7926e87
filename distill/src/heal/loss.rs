//! Training objectives.
//!
//! KD convention: `kd = T^2 * mean_tokens KL(p_T || p_S)` with `p = softmax(z / T)` when
//! `scale_t2` is set (Hinton), plain `mean_tokens KL` otherwise. The gradient of the unscaled
//! per-token KL with respect to the student logits is `(p_S - p_T) / T`; with the `T^2` factor
//! it is `T * (p_S - p_T)` (each divided by the number of tokens, from the mean).
//!
//! [`kd_loss`] and [`lm_loss_fused`] compute the value and that gradient in one fused pass over
//! each row of the vocabulary on the host (one vectorised exponential per logit and side,
//! [`rows`]; the gradient is written over the student's logits, in their own buffer on the CPU
//! backend, and handed to autodiff by [`logit_loss`]; the teacher's are read where they lie).
//! [`kd_loss_device`] and [`lm_loss`] are the same losses in tensor
//! operations (autodiff differentiates their log-softmax), for backends where the logits should
//! not leave the device.
use super::logit_grad::logit_loss;
use crate::backend::CpuView;
use crate::model::log_softmax;
use crate::rows;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

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

/// Forward KL(teacher || student) at temperature `t`, averaged over tokens (see module docs),
/// fused on the host. Exactly 0 (value and gradient) when the logits are bitwise equal: both rows
/// go through the same arithmetic, so `log p_T - log p_S` is 0 in every term.
pub fn kd_loss<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    t: f64,
    scale_t2: bool,
) -> Tensor<B, 1> {
    let [b, n, v] = student.dims();
    assert_eq!(
        teacher.dims(),
        [b, n, v],
        "student and teacher logits differ in shape"
    );
    let z = CpuView::of(teacher);
    let rows = (b * n).max(1);
    // d(loss)/d(z_S): (p_S - p_T) / T per token, times T^2 when scaled, over the token count.
    let c = (if scale_t2 { t } else { 1.0 / t } / rows as f64) as f32;
    let v = v.max(1);
    // The student's logits become the gradient in place.
    logit_loss(student, |grad| {
        let kl: Vec<f64> = grad
            .par_chunks_mut(v)
            .zip(z.par_chunks(v))
            .map_init(
                || (Vec::new(), Vec::new()),
                |(es, pt), (g, z)| kd_row(g, z, t as f32, c, es, pt),
            )
            .collect();
        // Summed in order: the same value whatever the threads did.
        let kl: f64 = kl.iter().sum();
        let scale = if scale_t2 { t * t } else { 1.0 };
        scale * kl / rows as f64
    })
}

/// One token of [`kd_loss`]: `g` holds the student's logits and receives `c * (p_S - p_T)`;
/// returns `KL(p_T || p_S)`. `es` and `pt` are scratch rows.
fn kd_row(g: &mut [f32], z: &[f32], t: f32, c: f32, es: &mut Vec<f32>, pt: &mut Vec<f32>) -> f64 {
    // exp(x / t - max / t) of a row into `out`; returns the shift and the sum.
    let exps = |x: &[f32], out: &mut Vec<f32>| -> (f32, f64) {
        out.clear();
        out.extend(x.iter().map(|&x| x / t));
        let m = rows::max(out);
        (m, rows::exp_shifted(out, m))
    };
    let ((ms, ss), (mt, st)) = (exps(g, es), exps(z, pt));
    let (ls, lt) = (ss.ln() as f32, st.ln() as f32);
    let (is, it) = ((1.0 / ss) as f32, (1.0 / st) as f32);
    let mut kl = 0f64;
    for ((g, &z), (&es, &pt)) in g.iter_mut().zip(z).zip(es.iter().zip(pt.iter())) {
        let p = pt * it;
        // log p_T - log p_S, both sides computed alike.
        let d = (z / t - mt - lt) - (*g / t - ms - ls);
        kl += (p * d) as f64;
        *g = c * (es * is - p);
    }
    kl
}

/// [`lm_loss`] fused on the host: the value and its gradient `(softmax(z) - onehot) / tokens`
/// in one pass over each row of the vocabulary.
pub fn lm_loss_fused<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, n, v] = logits.dims();
    let targets: Vec<i64> = targets
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("int tensor data converts to i64");
    let rows = (b * n).max(1);
    let c = 1.0 / rows as f32;
    logit_loss(logits, |grad| {
        let nll: Vec<f64> = grad
            .par_chunks_mut(v.max(1))
            .zip(targets.par_iter())
            .map(|(g, &t)| ce_row(g, t as usize, c))
            .collect();
        let nll: f64 = nll.iter().sum();
        nll / rows as f64
    })
}

/// One token of [`lm_loss_fused`]: `g` holds the logits and receives `c * (p - onehot(t))`;
/// returns `-log p_t`.
fn ce_row(g: &mut [f32], t: usize, c: f32) -> f64 {
    let m = rows::max(g);
    let zt = g[t];
    let sum = rows::exp_shifted(g, m);
    let k = c * (1.0 / sum) as f32;
    for g in g.iter_mut() {
        *g *= k;
    }
    g[t] -= c;
    sum.ln() - (zt - m) as f64
}

/// [`kd_loss`] in tensor operations on the device (autodiff differentiates the log-softmaxes).
/// Exactly 0 when the logits are bitwise equal (both sides go through the same `log_softmax`).
pub fn kd_loss_device<B: Backend>(
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
