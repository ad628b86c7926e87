//! Load-balancing auxiliary loss for routed MoE layers (Switch Transformer, arXiv 2101.03961; the
//! form of transformers' `load_balancing_loss_func` used by Mixtral), for healing.
//!
//! Healing calls [`forward_with_router_logits`] instead of `Llama::forward`, then adds
//! `coef * load_balancing_loss(&router_logits, top_k)` to the language-modelling loss (Mixtral's
//! `router_aux_loss_coef` is 0.02 in released configs, 0.001 by default in transformers).
use crate::model::Llama;
use crate::probe::RouterLogits;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

/// Logits `[B, T, V]` (same as [`Llama::forward`]) and, for every MoE layer in order, its router
/// logits `[B*T, E]` (the router applied to the MLP input; [`RouterLogits`]). Dense layers
/// contribute nothing.
pub fn forward_with_router_logits<B: Backend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
) -> (Tensor<B, 3>, Vec<Tensor<B, 2>>) {
    let mut p = RouterLogits::default();
    let logits = model.forward_probed(tokens, &mut p);
    (logits, p.logits)
}

/// Switch-style load-balancing loss, summed over layers as in transformers (logits of all layers are
/// concatenated): with `p` = softmax of the router logits over the E experts,
/// `loss = E * sum_e (mean over tokens of [e is among the token's top-k]) * (mean over tokens of p[e])`.
/// Perfectly balanced routing gives `top_k`; fully collapsed routing gives `top_k * E`.
/// Gradients flow through `p` only (the top-k choice is piecewise constant). Returns a scalar
/// `[1]`; zero when there are no MoE layers.
pub fn load_balancing_loss<B: Backend>(
    router_logits: &[Tensor<B, 2>],
    top_k: usize,
) -> Tensor<B, 1> {
    let Some(first) = router_logits.first() else {
        return Tensor::zeros([1], &Default::default());
    };
    let device = first.device();
    let all = Tensor::cat(router_logits.to_vec(), 0);
    let [n, e] = all.dims();
    let probs = activation::softmax(all, 1);
    let idx = probs.clone().detach().topk_with_indices(top_k, 1).1;
    let counts = Tensor::<B, 2>::zeros([n, e], &device).scatter(
        1,
        idx,
        Tensor::ones([n, top_k], &device),
        IndexingUpdateOp::Add,
    );
    let tokens_per_expert = counts.mean_dim(0); // [1, E], sums to top_k
    let prob_per_expert = probs.mean_dim(0); // [1, E], sums to 1
    (tokens_per_expert * prob_per_expert).sum() * (e as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    type B = burn::backend::Flex;

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn balanced_and_collapsed_values() {
        let d = Default::default();
        // 4 tokens, 4 experts, each token strongly prefers a different expert: balanced.
        let mut v = vec![0f32; 16];
        for i in 0..4 {
            v[i * 4 + i] = 20.0;
        }
        let bal = Tensor::<B, 2>::from_data(TensorData::new(v, [4, 4]), &d);
        let l = scalar(load_balancing_loss(&[bal], 1));
        assert!((l - 1.0).abs() < 1e-4, "{l}");
        // All tokens prefer expert 0: collapsed, loss -> E.
        let mut v = vec![0f32; 16];
        for i in 0..4 {
            v[i * 4] = 20.0;
        }
        let col = Tensor::<B, 2>::from_data(TensorData::new(v, [4, 4]), &d);
        let l = scalar(load_balancing_loss(&[col], 1));
        assert!((l - 4.0).abs() < 1e-3, "{l}");
        // Uniform logits, top-2: f = 2/E per expert (ties are broken but counts still sum to 2 per token).
        let uni = Tensor::<B, 2>::zeros([8, 4], &d);
        let l = scalar(load_balancing_loss(&[uni], 2));
        assert!((l - 2.0).abs() < 1e-4, "{l}");
    }

    #[test]
    fn gradient_pushes_towards_balance() {
        type A = burn::backend::Autodiff<B>;
        let d = Default::default();
        let mut v = vec![0f32; 16];
        for i in 0..4 {
            v[i * 4] = 2.0;
        }
        let x = Tensor::<A, 2>::from_data(TensorData::new(v, [4, 4]), &d).require_grad();
        let loss = load_balancing_loss(std::slice::from_ref(&x), 1);
        let g = loss.backward();
        let gx = x
            .grad(&g)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap();
        // The overloaded expert 0's logit gets a positive gradient (descent lowers it).
        for i in 0..4 {
            assert!(gx[i * 4] > 0.0, "{gx:?}");
        }
    }
}
