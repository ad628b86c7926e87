//! Blocked causal softmax attention, in tensor operations (under autodiff) and fused on the host
//! (the CPU backend), against the full masked product it replaces; decoding products split across
//! threads against the single product.
use super::hedgehog_tests::plans;
use super::{Llama, Positions, QUERY_BLOCK};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

type B = burn::backend::Flex;

/// The attention output before `o_proj`, computed the unblocked way: the full `[T, T]` softmax
/// weights (masked, every key) times the values repeated to every query head.
fn full_product<B: Backend>(m: &Llama<B>, x: Tensor<B, 3>, pos: &Positions<B>) -> Tensor<B, 3> {
    let a = m.layers[0].self_attn().unwrap();
    let [b, t, _] = x.dims();
    let (_, _, v) = a.qkv(x.clone(), pos);
    let y = a.softmax_weights(x, pos).matmul(a.repeat_kv(v));
    y.swap_dims(1, 2)
        .reshape([b, t, a.num_heads * a.v_head_dim])
}

/// Max |blocked - full| of layer 0's attention on random input of `t` positions, one sequence
/// starting at 0 and one continuing a cache of `t` positions, for sliding window `window`.
fn blocked_minus_full<B: Backend>(t: usize, window: usize) -> f32 {
    use burn::tensor::ElementConversion;
    let device = Default::default();
    let mut m = Llama::<B>::from_plan(&plans(0).0, &device).unwrap();
    m.layers[0]
        .attention
        .as_mut()
        .unwrap()
        .self_attn
        .sliding_window = window;
    let a = m.layers[0].self_attn().unwrap();
    let hidden = a.q_proj.weight.val().dims()[1];
    let x = Tensor::<B, 3>::random([2, 2 * t, hidden], Distribution::Normal(0.0, 1.0), &device);
    let pos = Positions::new(&m, 0..1, 0, 2 * t, &device);
    let want = full_product(&m, x.clone(), &pos);
    let mut slot = super::LayerCache::default();
    let first = Positions::new(&m, 0..1, 0, t, &device);
    let first = a.heads(x.clone().narrow(1, 0, t), &first, Some(&mut slot));
    let second = Positions::new(&m, 0..1, t, t, &device);
    let second = a.heads(x.narrow(1, t, t), &second, Some(&mut slot));
    let got = Tensor::cat(vec![first, second], 1);
    (got - want).abs().max().into_scalar().elem()
}

#[test]
fn blocked_attention_equals_the_full_masked_product() {
    // Three query blocks, the last one partial; windows shorter and longer than a block; the second
    // half of the sequence continues the cache of the first.
    let t = QUERY_BLOCK + 37;
    for window in [0, 5, QUERY_BLOCK + 9] {
        let host = blocked_minus_full::<B>(t, window);
        assert!(
            host <= 1e-5,
            "fused on the host, window {window}: max |diff| {host}"
        );
        let tensor = blocked_minus_full::<Autodiff<B>>(t, window);
        assert!(
            tensor <= 1e-5,
            "tensor ops, window {window}: max |diff| {tensor}"
        );
    }
}

#[test]
fn decoding_products_split_across_threads_keep_every_bit() {
    let device = Default::default();
    let w = Tensor::<B, 2>::random([1000, 96], Distribution::Normal(0.0, 1.0), &device);
    let x = Tensor::<B, 2>::random([1, 96], Distribution::Normal(0.0, 1.0), &device);
    let want = x.clone().matmul(w.clone().transpose()).into_data();
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got = pool.install(|| super::product(x.clone(), w.clone(), None));
        assert_eq!(got.dims(), [1, 1000]);
        assert_eq!(got.into_data(), want, "{threads} threads");
    }
}
