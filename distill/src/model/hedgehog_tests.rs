//! Hedgehog attention on a tiny synthetic Llama: the hybrid with a window at least the sequence
//! length is softmax attention, generation with the recurrent state reproduces the chunked
//! forward, attention rows are distributions, and the generation cache stops growing.
use super::hedgehog::CHUNK;
use super::Llama;
use burn::tensor::{Int, Tensor, TensorData};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{AttentionKind, Plan, Source, TensorEntry};

type B = burn::backend::Flex;

/// The tiny softmax model and the same weights with every layer converted to Hedgehog attention
/// (feature maps of 8, random values large enough that the features are far from uniform).
pub(crate) fn plans(window: usize) -> (Plan, Plan) {
    let base = SyntheticSpec::tiny().plan();
    let mut hh = base.clone();
    for l in &mut hh.arch.layers {
        l.attention.kind = AttentionKind::Hedgehog {
            feature_dim: 8,
            window,
        };
    }
    let (heads, d) = (4, 16);
    for i in 0..hh.arch.num_layers() {
        let p = format!("model.layers.{i}.self_attn");
        for (k, part) in ["feature_map_q", "feature_map_k"].iter().enumerate() {
            let source = Source::Random {
                shape: vec![heads, d, 8],
                seed: 100 + 2 * i as u64 + k as u64,
                mean: 0.0,
                std: 0.5,
            };
            hh.tensors
                .insert(format!("{p}.{part}.weight"), TensorEntry::new(source));
        }
        if window > 0 {
            let source = Source::Random {
                shape: vec![heads],
                seed: 200 + i as u64,
                mean: 0.0,
                std: 1.0,
            };
            hh.tensors
                .insert(format!("{p}.window_factors"), TensorEntry::new(source));
        }
    }
    hh.validate().unwrap();
    (base, hh)
}

fn model(plan: &Plan) -> Llama<B> {
    Llama::from_plan(plan, &Default::default()).unwrap()
}

fn tokens(n: usize) -> Vec<i64> {
    (0..n).map(|i| ((i * 37 + 11) % 256) as i64).collect()
}

fn ids(v: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [1, v.len()]),
        &Default::default(),
    )
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn window_covering_the_sequence_is_softmax_attention() {
    let t = 40;
    let (base, hh) = plans(t);
    let want = values(model(&base).forward(ids(&tokens(t))));
    let got = values(model(&hh).forward(ids(&tokens(t))));
    let d = max_diff(&want, &got);
    assert!(d <= 1e-5, "max |logit diff| {d}");
    // A shorter window brings in the linear terms: the logits change.
    let (_, short) = plans(8);
    let other = values(model(&short).forward(ids(&tokens(t))));
    assert!(max_diff(&want, &other) > 1e-3);
}

/// Logits of `n` tokens fed one call per piece of `pieces` (sizes), with the cache.
fn cached_logits(m: &Llama<B>, toks: &[i64], pieces: &[usize]) -> Vec<f32> {
    let mut cache = m.new_cache();
    let mut out = vec![];
    let mut at = 0;
    for &p in pieces {
        out.extend(values(m.forward_cached(ids(&toks[at..at + p]), &mut cache)));
        at += p;
    }
    assert_eq!(at, toks.len());
    out
}

#[test]
fn recurrent_generation_equals_the_chunked_forward() {
    // Longer than one chunk, so the parallel form folds keys into the state between chunks too.
    let t = CHUNK + 44;
    let toks = tokens(t);
    for window in [0, 1, 5, 64] {
        let (_, hh) = plans(window);
        let m = model(&hh);
        let want = values(m.forward(ids(&toks)));
        let mut pieces = vec![7, CHUNK + 2];
        pieces.extend(std::iter::repeat_n(1, t - 9 - CHUNK));
        let got = cached_logits(&m, &toks, &pieces);
        let d = max_diff(&want, &got);
        assert!(d <= 1e-4, "window {window}: max |logit diff| {d}");
    }
}

#[test]
fn attention_rows_are_causal_distributions() {
    for window in [0, 3] {
        let (_, hh) = plans(window);
        let m = model(&hh);
        let t = 20;
        let x = m.embed(ids(&tokens(t)));
        let att = m.layers[0].attention.as_ref().unwrap();
        let x = att.input_layernorm.forward(x);
        let pos = super::Positions::new(&m, 0..1, 0, t, &Default::default());
        let sa = &att.self_attn;
        let (q, k, _) = sa.qkv(x, &pos);
        let hh = sa.hedgehog.as_ref().unwrap();
        let a = values(hh.attention_weights(q, sa.repeat_kv(k)));
        for (r, row) in a.chunks(t).enumerate() {
            let i = r % t;
            assert!(row.iter().all(|&w| w >= 0.0), "negative weight in row {r}");
            assert!(
                row[i + 1..].iter().all(|&w| w == 0.0),
                "row {r} sees the future"
            );
            assert!(
                row[..=i].iter().all(|&w| w > 0.0),
                "row {r} drops a past key"
            );
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() <= 1e-5, "row {r} sums to {s}");
        }
    }
}

#[test]
fn generation_memory_stops_growing_with_the_window() {
    let (base, hh) = plans(4);
    let toks = tokens(60);
    let held = |m: &Llama<B>, n: usize| {
        let mut cache = m.new_cache();
        m.forward_cached(ids(&toks[..10]), &mut cache);
        for i in 10..n {
            m.forward_cached(ids(&toks[i..i + 1]), &mut cache);
        }
        cache.numel()
    };
    let m = model(&hh);
    // 2 layers x (3 window keys and values of 2 x 16 + state 4 x 16 x 16 + 4 x 16).
    let per_layer = 3 * 2 * 2 * 16 + 4 * 16 * 16 + 4 * 16;
    assert_eq!(held(&m, 20), 2 * per_layer);
    assert_eq!(held(&m, 60), 2 * per_layer);
    let soft = model(&base);
    assert_eq!(held(&soft, 60), 3 * held(&soft, 20));
}
