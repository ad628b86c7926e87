//! Blocked causal softmax attention, fused on the host (the CPU backend, with and without autodiff),
//! against the full masked product it replaces; the fused operation's gradients against those of
//! the tensor operations; decoding products split across threads against the single product.
use super::hedgehog_tests::plans;
use super::{host_attention_grad, Llama, Positions, ScoreRule, QUERY_BLOCK};
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};

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
        let autodiff = blocked_minus_full::<Autodiff<B>>(t, window);
        assert!(
            autodiff <= 1e-5,
            "fused under autodiff, window {window}: max |diff| {autodiff}"
        );
    }
}

#[test]
fn decoding_products_split_across_threads_keep_every_bit() {
    let device = Default::default();
    let w = Tensor::<B, 2>::random([1000, 96], Distribution::Normal(0.0, 1.0), &device);
    let x = Tensor::<B, 2>::random([1, 96], Distribution::Normal(0.0, 1.0), &device);
    let in_pool = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| super::product(x.clone(), w.clone(), None))
    };
    let want = in_pool(1);
    assert_eq!(want.dims(), [1, 1000]);
    let gemm = crate::rows::host_f32(x.clone().matmul(w.clone().transpose()));
    let diff = relative_diff(&crate::rows::host_f32(want.clone()), &gemm);
    assert!(diff <= 1e-6, "against flex's GEMM: relative |diff| {diff}");
    let want = want.into_data();
    for threads in [2, 3] {
        assert_eq!(in_pool(threads).into_data(), want, "{threads} threads");
    }
}

/// Max |fused - tensor ops| relative to the largest tensor-ops value, over the output and the
/// gradients of the queries, keys and values of `sum(output * w)` for random `w`: two sequences,
/// three key heads of two query heads each, `t` queries after `start` cached positions.
fn fused_minus_tensor_ops<A: AutodiffBackend>(start: usize, t: usize, rule: ScoreRule) -> f32 {
    let device = Default::default();
    let (d, dv, tk) = (16, 8, start + t);
    let normal = Distribution::Normal(0.0, 1.0);
    let inputs = [
        Tensor::<A, 5>::random([2, 3, 2, t, d], normal, &device).into_data(),
        Tensor::<A, 4>::random([2, 3, tk, d], normal, &device).into_data(),
        Tensor::<A, 4>::random([2, 3, tk, dv], normal, &device).into_data(),
    ];
    let w = Tensor::<A, 5>::random([2, 3, 2, t, dv], normal, &device);
    let mask = super::causal_mask::<A>(start, t, rule.window, &device);
    let run = |fused: bool| -> Vec<Vec<f32>> {
        let q = Tensor::<A, 5>::from_data(inputs[0].clone(), &device).require_grad();
        let k = Tensor::<A, 4>::from_data(inputs[1].clone(), &device).require_grad();
        let v = Tensor::<A, 4>::from_data(inputs[2].clone(), &device).require_grad();
        let qkv = (q.clone(), k.clone(), v.clone());
        let y = match fused {
            true => host_attention_grad::fused(qkv, start, rule).expect("the CPU backend"),
            false => super::blocked_attention(qkv.0, qkv.1, qkv.2, &mask, start, rule),
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        let host = |x: TensorData| x.convert::<f32>().into_vec::<f32>().unwrap();
        vec![
            host(y.into_data()),
            host(q.grad(&grads).unwrap().into_data()),
            host(k.grad(&grads).unwrap().into_data()),
            host(v.grad(&grads).unwrap().into_data()),
        ]
    };
    let (got, want) = (run(true).concat(), run(false).concat());
    relative_diff(&got, &want)
}

/// `max |got - want|` over `max |want|`.
pub(crate) fn relative_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "compared lengths");
    let largest = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / largest
}

#[test]
fn fused_attention_gradients_equal_the_tensor_ops_gradients() {
    type Balanced = Autodiff<B, BalancedCheckpointing>;
    let rule = |window, softcap| ScoreRule {
        scale: 0.25,
        softcap,
        window,
    };
    // Several blocks (the last partial), sliding windows shorter and longer than a block, queries
    // continuing a cache, a soft-cap, and burn's balanced checkpointing.
    let cases = [
        (0, 2 * 64 + 37, rule(0, None)),
        (0, 2 * 64 + 37, rule(5, None)),
        (40, 70, rule(100, None)),
        (0, 100, rule(0, Some(3.0))),
    ];
    for (start, t, rule) in cases {
        let diff = fused_minus_tensor_ops::<Autodiff<B>>(start, t, rule);
        assert!(
            diff <= 1e-5,
            "start {start}, t {t}, {rule:?}: relative |diff| {diff}"
        );
    }
    let diff = fused_minus_tensor_ops::<Balanced>(16, 80, rule(0, None));
    assert!(
        diff <= 1e-5,
        "balanced checkpointing: relative |diff| {diff}"
    );
}

/// Max |fused - tensor ops| relative to the largest tensor-ops value, over layer 0's attention
/// output (before `o_proj`) and the gradient of `sum(output * w)` with respect to its input, for
/// `t` positions without a cache: the fused path takes the projections as they lie and applies
/// RoPE itself (forward and backward), the reference goes heads first through tensor ops.
fn projections_path_minus_tensor_ops<A: AutodiffBackend>(
    t: usize,
    window: usize,
    softcap: Option<f64>,
) -> f32 {
    let device = Default::default();
    let mut m = Llama::<A>::from_plan(&plans(0).0, &device).unwrap();
    let sa = &mut m.layers[0].attention.as_mut().unwrap().self_attn;
    (sa.sliding_window, sa.softcap) = (window, softcap);
    let a = m.layers[0].self_attn().unwrap();
    let hidden = a.q_proj.weight.val().dims()[1];
    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<A, 3>::random([2, t, hidden], normal, &device).into_data();
    let pos = Positions::new(&m, 0..1, 0, t, &device);
    let dv = a.v_head_dim;
    let w = Tensor::<A, 3>::random([2, t, a.num_heads * dv], normal, &device);
    let run = |fused: bool| -> Vec<f32> {
        let x = Tensor::<A, 3>::from_data(x.clone(), &device).require_grad();
        let y = match fused {
            true => a.heads(x.clone(), &pos, None),
            false => {
                let (q, k, v) = a.qkv(x.clone(), &pos);
                let [b, h, _, d] = q.dims();
                let g = k.dims()[1];
                let q = q.reshape([b, g, h / g, t, d]);
                let mask = super::causal_mask::<A>(0, t, window, &device);
                super::blocked_attention(q, k, v, &mask, 0, a.score_rule())
                    .reshape([b, h, t, dv])
                    .swap_dims(1, 2)
                    .reshape([b, t, h * dv])
            }
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        let host = |x: TensorData| x.convert::<f32>().into_vec::<f32>().unwrap();
        let mut all = host(y.into_data());
        all.extend(host(x.grad(&grads).unwrap().into_data()));
        all
    };
    relative_diff(&run(true), &run(false))
}

#[test]
fn attention_on_the_projections_matches_the_tensor_ops_with_gradients() {
    for (t, window, softcap) in [(2 * 64 + 37, 0, None), (100, 7, None), (80, 0, Some(2.0))] {
        let diff = projections_path_minus_tensor_ops::<Autodiff<B>>(t, window, softcap);
        assert!(
            diff <= 1e-5,
            "t {t}, window {window}, softcap {softcap:?}: relative |diff| {diff}"
        );
    }
}
