//! Runtime checks on small synthetic models.
use burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::burn;
use surgeon_distill::model::Llama;
use surgeon_distill::Error;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{Family, HostTensor, Mlp, MoeRouting, Plan, Source, TensorEntry};

type B = burn::backend::Flex;

fn ids(v: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Tensor::from_data(
        TensorData::new(v.clone(), [1, v.len()]),
        &Default::default(),
    )
}

fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn load(plan: &Plan) -> Llama<B> {
    Llama::from_plan(plan, &Default::default()).unwrap()
}

fn set(plan: &mut Plan, name: &str, shape: Vec<usize>, values: &[f32]) {
    let e = TensorEntry::new(Source::inline("test", HostTensor::from_f32(shape, values)));
    plan.tensors.insert(name.to_string(), e);
}

fn kv_cache_matches_full(plan: &Plan) {
    let model = load(plan);
    let toks = tokens(13, plan.arch.vocab_size);
    let full = to_vec(model.forward(ids(&toks)));
    let mut cache = model.new_cache();
    let mut inc = to_vec(model.forward_cached(ids(&toks[..5]), &mut cache));
    for i in 5..toks.len() {
        inc.extend(to_vec(
            model.forward_cached(ids(&toks[i..i + 1]), &mut cache),
        ));
    }
    assert_eq!(cache.len(), toks.len());
    let d = max_diff(&full, &inc);
    assert!(d < 1e-4, "kv-cache logits differ by {d}");
}

#[test]
fn kv_cache_generation_equals_full_forward() {
    kv_cache_matches_full(&SyntheticSpec::tiny().plan());
}

#[test]
fn qwen2_biases_tied_embeddings_and_sliding_window() {
    let mut spec = SyntheticSpec::tiny();
    spec.family = Family::Qwen2;
    spec.tie_word_embeddings = true;
    let mut plan = spec.plan();
    assert!(plan.arch.layers[0].attention.qkv_bias);
    assert!(!plan.tensors.contains_key("lm_head.weight"));
    kv_cache_matches_full(&plan);
    plan.arch.sliding_window = Some(4);
    kv_cache_matches_full(&plan);
}

#[test]
fn sliding_window_limits_what_a_layer_sees() {
    let mut spec = SyntheticSpec::tiny();
    spec.num_layers = 1;
    let mut plan = spec.plan();
    let toks = tokens(12, plan.arch.vocab_size);
    let no_window = to_vec(load(&plan).forward(ids(&toks)));
    plan.arch.sliding_window = Some(64);
    let wide = to_vec(load(&plan).forward(ids(&toks)));
    assert_eq!(
        no_window, wide,
        "a window longer than the sequence changes nothing"
    );
    plan.arch.sliding_window = Some(4);
    let model = load(&plan);
    let a = to_vec(model.forward(ids(&toks)));
    let mut toks2 = toks.clone();
    toks2[0] = (toks2[0] + 1) % plan.arch.vocab_size as u32;
    let b = to_vec(model.forward(ids(&toks2)));
    let v = plan.arch.vocab_size;
    // With one layer, position p sees p-3..=p only: positions >= 4 ignore token 0.
    assert!(max_diff(&a[..4 * v], &b[..4 * v]) > 1e-6);
    assert_eq!(&a[4 * v..], &b[4 * v..]);
}

#[test]
fn gqa_equals_mha_with_repeated_kv_heads() {
    let spec = SyntheticSpec::tiny(); // 4 heads, 2 kv heads
    let gqa = spec.plan();
    let mut mha = gqa.clone();
    let a = gqa.arch.layers[0].attention.clone();
    let (h, g, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let r = h / g;
    for l in mha.arch.layers.iter_mut() {
        l.attention.num_kv_heads = h;
    }
    for i in 0..gqa.arch.layers.len() {
        for p in ["k_proj", "v_proj"] {
            let name = format!("model.layers.{i}.self_attn.{p}.weight");
            let (shape, w) = gqa.load_f32(&name).unwrap();
            let hidden = shape[1];
            let mut out = Vec::with_capacity(h * d * hidden);
            for head in 0..h {
                let kv = head / r; // HF repeat_kv order
                out.extend_from_slice(&w[kv * d * hidden..(kv + 1) * d * hidden]);
            }
            set(&mut mha, &name, vec![h * d, hidden], &out);
        }
    }
    let toks = tokens(9, gqa.arch.vocab_size);
    let x = to_vec(load(&gqa).forward(ids(&toks)));
    let y = to_vec(load(&mha).forward(ids(&toks)));
    let diff = max_diff(&x, &y);
    assert!(diff < 1e-5, "GQA vs MHA differ by {diff}");
}

/// Layer 1 becomes an MoE of `e` copies of its dense MLP with a random router.
fn moe_of_copies(dense: &Plan, e: usize, top_k: usize, routing: MoeRouting) -> Plan {
    let mut moe = dense.clone();
    let i = 1;
    let Mlp::Dense { intermediate_size } = dense.arch.layers[i].mlp.clone() else {
        unreachable!()
    };
    moe.arch.layers[i].mlp = Mlp::Moe {
        num_experts: e,
        top_k,
        intermediate_size,
        routing,
    };
    let hsz = dense.arch.hidden_size;
    let p = format!("model.layers.{i}");
    for (hf, w) in [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")] {
        let entry = moe.tensors.remove(&format!("{p}.mlp.{hf}.weight")).unwrap();
        for x in 0..e {
            moe.tensors.insert(
                format!("{p}.block_sparse_moe.experts.{x}.{w}.weight"),
                entry.clone(),
            );
        }
    }
    let router: Vec<f32> = (0..e * hsz)
        .map(|k| ((k * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    set(
        &mut moe,
        &format!("{p}.block_sparse_moe.gate.weight"),
        vec![e, hsz],
        &router,
    );
    moe
}

#[test]
fn moe_with_identical_experts_equals_dense() {
    let dense = SyntheticSpec::tiny().plan();
    let moe = moe_of_copies(&dense, 4, 2, MoeRouting::Mixtral);
    let toks = tokens(10, dense.arch.vocab_size);
    let x = to_vec(load(&dense).forward(ids(&toks)));
    let m = load(&moe);
    let y = to_vec(m.forward(ids(&toks)));
    let diff = max_diff(&x, &y);
    assert!(
        diff < 1e-5,
        "MoE of identical experts differs from dense by {diff}"
    );
    kv_cache_matches_full(&moe);
    // Scaled routing multiplies the expert sum: scale 1 equals Mixtral routing.
    let scaled = moe_of_copies(&dense, 4, 2, MoeRouting::Scaled { scale: 1.0 });
    let z = to_vec(load(&scaled).forward(ids(&toks)));
    assert!(max_diff(&y, &z) < 1e-6);
    // Names of the MoE parameters are HF's.
    let names: Vec<String> = m.param_names().into_iter().map(|(_, n)| n).collect();
    assert!(names.contains(&"model.layers.1.block_sparse_moe.experts.3.w2.weight".to_string()));
}

#[test]
fn mismatched_plans_give_errors() {
    let mut plan = SyntheticSpec::tiny().plan();
    set(
        &mut plan,
        "model.layers.1.self_attn.k_proj.weight",
        vec![3, 64],
        &[0.0; 192],
    );
    plan.tensors.remove("model.layers.0.mlp.up_proj.weight");
    let err = Llama::<B>::from_plan(&plan, &Default::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight") || msg.contains("k_proj"),
        "{msg}"
    );

    let mut plan = SyntheticSpec::tiny().plan();
    plan.arch.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    let err = Llama::<B>::from_plan(&plan, &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}

#[test]
fn names_and_export_round_trip() {
    let plan = SyntheticSpec::tiny().plan();
    let model = load(&plan);
    let mut names: Vec<String> = model.param_names().into_iter().map(|(_, n)| n).collect();
    let mut expected: Vec<String> = plan
        .arch
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    let exported = model.to_plan(&plan).unwrap();
    for name in &expected {
        assert_eq!(
            plan.load_f32(name).unwrap(),
            exported.load_f32(name).unwrap(),
            "{name}"
        );
    }
    let toks = tokens(6, plan.arch.vocab_size);
    let a = to_vec(model.forward(ids(&toks)));
    let b = to_vec(load(&exported).forward(ids(&toks)));
    assert_eq!(a, b);
}

#[test]
fn llama3_rope_scaling_changes_only_low_frequencies() {
    use surgeon_distill::model::Rope;
    let plain = Rope::new(64, 500000.0, None, 8192).unwrap();
    let s = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let scaled = Rope::new(64, 500000.0, Some(&s), 8192).unwrap();
    assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
    let last = plain.inv_freq.len() - 1;
    assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
}

#[test]
fn perplexity_scores_non_overlapping_windows() {
    use surgeon_distill::eval::{perplexity, windows, EvalOptions};
    let toks = tokens(23, 256);
    let w = windows(&toks, 5, Some(20));
    // 20 tokens in windows of 6: 6 + 6 + 6 + 2.
    assert_eq!(
        w.iter().map(|w| w.len()).collect::<Vec<_>>(),
        vec![6, 6, 6, 2]
    );
    assert_eq!(windows(&toks, 5, Some(19)).last().unwrap().len(), 6); // a 1-token tail is dropped

    let plan = SyntheticSpec::tiny().plan();
    let model = load(&plan);
    let opts = EvalOptions {
        window: 5,
        max_tokens: Some(20),
        ..Default::default()
    };
    let r = perplexity(&model, &toks, &opts).unwrap();
    assert_eq!((r.tokens, r.windows), (16, 4));
    // Same number from the logits directly.
    let mut total = 0f64;
    for win in &w {
        let logits = to_vec(model.forward(ids(&win[..win.len() - 1])));
        let v = plan.arch.vocab_size;
        for (p, &target) in win[1..].iter().enumerate() {
            let row = &logits[p * v..(p + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            total += lse - row[target as usize] as f64;
        }
    }
    assert!(
        (r.nll - total / 16.0).abs() < 1e-5,
        "{} vs {}",
        r.nll,
        total / 16.0
    );
    assert!((r.ppl - r.nll.exp()).abs() < 1e-9);
    // Batching equal-length windows gives the same result.
    let batched = perplexity(
        &model,
        &toks,
        &EvalOptions {
            batch_size: Some(3),
            ..opts.clone()
        },
    )
    .unwrap();
    // On the CPU backend to the bit: each row's logits do not depend on the batch, and the
    // values are summed in the same order.
    assert_eq!(batched.nll.to_bits(), r.nll.to_bits());
    let zero = EvalOptions {
        batch_size: Some(0),
        ..opts.clone()
    };
    assert!(perplexity(&model, &toks, &zero).is_err());
    // Out-of-vocabulary ids are an error, not a panic.
    assert!(perplexity(&model, &[1, 2, 999], &opts).is_err());
}

#[test]
fn jsonl_text_field_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"text\": \"b\", \"id\": 2}\n").unwrap();
    assert_eq!(surgeon_distill::eval::read_text(&p).unwrap(), "a\n\nb");
    std::fs::write(&p, "{\"body\": \"a\"}\n").unwrap();
    assert!(surgeon_distill::eval::read_text(&p).is_err());
}

#[test]
fn sampling_is_seeded_and_respects_top_p() {
    use rand::SeedableRng;
    use surgeon_distill::generate::{sample, GenerateOptions};
    let logits = [0.0f32, 3.0, 1.0, 2.9];
    let greedy = GenerateOptions::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    assert_eq!(sample(&logits, &greedy, &mut rng), 1);
    let hot = GenerateOptions {
        temperature: 1.0,
        top_p: 0.4,
        ..Default::default()
    };
    for _ in 0..50 {
        assert_eq!(
            sample(&logits, &hot, &mut rng),
            1,
            "top-p 0.4 keeps only the best token (p = 0.48)"
        );
    }
    let wide = GenerateOptions {
        temperature: 1.0,
        ..Default::default()
    };
    let draw = |seed| {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..20)
            .map(|_| sample(&logits, &wide, &mut r))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert!(draw(7).iter().any(|&t| t != 1));
}
