//! Blocked causal softmax attention against the full masked product it replaces; decoding products
//! split across threads against the single product.
use super::hedgehog_tests::plans;
use super::{Llama, Positions, QUERY_BLOCK};
use burn::tensor::{Distribution, Tensor};

type B = burn::backend::Flex;

/// The attention output before `o_proj`, computed the unblocked way: the full `[T, T]` softmax
/// weights (masked, every key) times the values repeated to every query head.
fn full_product(m: &Llama<B>, x: Tensor<B, 3>, pos: &Positions<B>) -> Tensor<B, 3> {
    let a = m.layers[0].self_attn().unwrap();
    let [b, t, _] = x.dims();
    let (_, _, v) = a.qkv(x.clone(), pos);
    let y = a.softmax_weights(x, pos).matmul(a.repeat_kv(v));
    y.swap_dims(1, 2)
        .reshape([b, t, a.num_heads * a.v_head_dim])
}

#[test]
fn blocked_attention_equals_the_full_masked_product() {
    // Three query blocks, the last one partial; windows shorter and longer than a block.
    let t = 2 * QUERY_BLOCK + 37;
    let device = Default::default();
    for window in [0, 5, QUERY_BLOCK + 9] {
        let mut m = Llama::<B>::from_plan(&plans(0).0, &device).unwrap();
        m.layers[0]
            .attention
            .as_mut()
            .unwrap()
            .self_attn
            .sliding_window = window;
        let hidden = m.layers[0].self_attn().unwrap().q_proj.weight.val().dims()[1];
        let x = Tensor::<B, 3>::random([2, t, hidden], Distribution::Normal(0.0, 1.0), &device);
        let pos = Positions::new(&m, 0..1, 0, t, &device);
        let a = m.layers[0].self_attn().unwrap();
        let got = a.heads(x.clone(), &pos, None);
        let want = full_product(&m, x, &pos);
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff <= 1e-5, "window {window}: max |diff| {diff}");
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
