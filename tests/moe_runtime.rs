//! `surgeon moe` outputs through the burn runtime: upcycled models compute the dense model's logits,
//! a split with every expert active at weight 1 computes the dense model, calibration statistics
//! produce valid partitions, the aux-loss forward matches the plain forward, and the CLI's errors.
mod common;

use common::*;
use std::path::Path;
use surgeon_distill::burn;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::model::Llama;
use surgeon_distill::{moe_aux, moe_stats};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{Mlp, MoeRouting, Plan};
use surgeon_surgery::moe::{self as op, MoeMethod, MoeOptions, RouterInit, SplitStats};

/// A tiny synthetic model with larger weights than the default so that logits are not all ~0.
fn tiny() -> Plan {
    let mut p = SyntheticSpec::tiny().plan();
    for (name, t) in p.tensors.iter_mut() {
        if let surgeon_formats::Source::Random { std, .. } = &mut t.source {
            if !name.contains("norm") {
                *std = 0.2;
            }
        }
    }
    p
}

fn ids(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % vocab).collect()
}

fn routers(e: usize, h: usize) -> Vec<RouterInit> {
    vec![
        RouterInit::Random { std: 1.0 },
        RouterInit::Zeros,
        RouterInit::Given {
            label: "test".into(),
            rows: vec![surgeon_formats::plan::random_normal(5, e * h, 3.0)],
        },
    ]
}

#[test]
fn upcycled_tiny_model_has_the_dense_logits_for_any_router() {
    let dense = tiny();
    let x = ids(24, 256);
    let want = logits(&dense, &x);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(scale > 1e-2, "degenerate test model (max |logit| {scale})");
    for router in routers(4, 64) {
        let mut o = MoeOptions::new(MoeMethod::Upcycle, 4, 2);
        o.router = router.clone();
        let moe = op::upcycle(&dense, &o).unwrap();
        let d = max_diff(&want, &logits(&moe, &x));
        assert!(d < 1e-4, "{router:?}: max |dlogit| {d}");
    }
}

#[test]
fn split_with_all_experts_at_weight_one_has_the_dense_logits() {
    let dense = tiny();
    let x = ids(24, 256);
    let want = logits(&dense, &x);
    for method in [MoeMethod::SplitRandom, MoeMethod::SplitCluster] {
        // Zero router + top-k = E: every expert gets weight 1/E; routing scale E makes it 1.
        let mut o = MoeOptions::new(method, 4, 4);
        o.router = RouterInit::Zeros;
        let mut moe: Plan = op::build(&dense, &o, None).unwrap();
        for l in moe.arch.layers.iter_mut() {
            if let Mlp::Moe { routing, .. } = &mut l.mlp {
                *routing = MoeRouting::Scaled { scale: 4.0 };
            }
        }
        let d = max_diff(&want, &logits(&moe, &x));
        assert!(d < 1e-4, "{method}: max |dlogit| {d}");
        // With K = 1 the scale is E/K = 4: folding it into w2 (Mixtral routing) gives the same logits.
        let mut o = MoeOptions::new(method, 4, 1);
        o.router = RouterInit::Random { std: 1.0 };
        let scaled = op::build(&dense, &o, None).unwrap();
        o.fold_scale = true;
        let folded = op::build(&dense, &o, None).unwrap();
        let d = max_diff(&logits(&scaled, &x), &logits(&folded, &x));
        assert!(d < 1e-4, "{method}: folded vs scaled max |dlogit| {d}");
    }
}

#[test]
fn calibration_statistics_give_valid_partitions() {
    let dense = tiny();
    let model = Llama::<B>::from_plan(&dense, &Default::default()).unwrap();
    let data = ids(96, 256);
    let windows: Vec<&[u32]> = data.chunks(32).collect();
    let caps = moe_stats::capture_layers(&model, &windows, true).unwrap();
    assert_eq!(caps.len(), 2);
    for c in &caps {
        assert_eq!((c.tokens, c.width), (96, 128));
        assert_eq!(c.mlp_input.len(), 96 * 64);
        assert_eq!(c.activations.len(), 96 * 128);
    }
    let e = 4;
    let co = SplitStats::Coactivation {
        features: caps
            .iter()
            .map(|c| op::coactivation_features(&c.activations, c.tokens, 128, 0.1))
            .collect(),
        tokens: 96,
    };
    let imp = SplitStats::Importance {
        scores: caps
            .iter()
            .enumerate()
            .map(|(l, c)| {
                let (_, down) = dense
                    .load_f32(&format!("model.layers.{l}.mlp.down_proj.weight"))
                    .unwrap();
                let norms = op::column_norms(&down, 64, 128);
                op::importance_scores(&c.mlp_input, &c.activations, &norms, 96, 64, 128, e, 0).0
            })
            .collect(),
    };
    for (method, stats) in [
        (MoeMethod::SplitCoactivation, co),
        (MoeMethod::SplitImportance, imp),
    ] {
        let parts = op::partitions(&dense, &MoeOptions::new(method, e, 2), Some(&stats)).unwrap();
        for layer in &parts {
            op::check_partition(layer, 128, e).unwrap();
        }
        // Not the identity or random split: differs from split-random's partition.
        let rnd =
            op::partitions(&dense, &MoeOptions::new(MoeMethod::SplitRandom, e, 2), None).unwrap();
        assert_ne!(parts, rnd);
    }
    // Router rows from prompts: unit rows, one [E, h] per layer.
    let prompts: Vec<Vec<Vec<u32>>> = (0..e)
        .map(|x| vec![ids(5 + x, 256), ids(3, 200 + x as u32)])
        .collect();
    let rows = moe_stats::router_rows_hidden(&model, &prompts).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.len(), e * 64);
        for row in r.chunks(64) {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-4, "{n}");
        }
    }
    let emb = moe_stats::router_rows_embed(&dense, &prompts).unwrap();
    assert_eq!(emb.len(), e * 64);
    // The rows plug into the operator.
    let mut o = MoeOptions::new(MoeMethod::Upcycle, e, 2);
    o.router = RouterInit::Given {
        label: "hidden".into(),
        rows,
    };
    op::upcycle(&dense, &o).unwrap();
}

#[test]
fn aux_loss_forward_matches_the_plain_forward() {
    let dense = tiny();
    let mut o = MoeOptions::new(MoeMethod::SplitRandom, 8, 2);
    o.router = RouterInit::Random { std: 1.0 };
    let moe = op::build(&dense, &o, None).unwrap();
    let model = Llama::<B>::from_plan(&moe, &Default::default()).unwrap();
    let x = ids(16, 256);
    let t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(x.iter().map(|&v| v as i64).collect::<Vec<_>>(), [1, 16]),
        &Default::default(),
    );
    let plain = model
        .forward(t.clone())
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap();
    let (lg, router) = moe_aux::forward_with_router_logits(&model, t);
    let lg = lg.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    assert!(max_diff(&plain, &lg) < 1e-6);
    assert_eq!(router.len(), 2);
    assert_eq!(router[0].dims(), [16, 8]);
    let aux = moe_aux::load_balancing_loss(&router, 2)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()[0];
    // Between perfectly balanced (top_k) and collapsed (top_k * E).
    assert!((2.0..=16.0).contains(&aux), "{aux}");
}

fn surgeon(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .args(args)
        .output()
        .expect("run surgeon")
}

#[test]
fn cli_errors_and_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    SyntheticSpec::tiny().write(&model, None).unwrap();
    let m = model.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let err = |args: &[&str]| {
        let r = surgeon(args);
        assert!(!r.status.success(), "{args:?} should fail");
        let s = String::from_utf8_lossy(&r.stderr).trim().to_string();
        assert_eq!(s.lines().count(), 1, "{s}");
        s
    };
    let base = ["moe", m, "--out", o];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    let e = err(&with(&[
        "--experts",
        "3",
        "--top-k",
        "1",
        "--method",
        "split-random",
    ]));
    assert!(e.contains("does not divide the FFN width 128"), "{e}");
    let e = err(&with(&[
        "--experts",
        "4",
        "--top-k",
        "5",
        "--method",
        "upcycle",
    ]));
    assert!(
        e.contains("--top-k must be between 1 and --experts = 4"),
        "{e}"
    );
    let e = err(&with(&[
        "--experts",
        "1",
        "--top-k",
        "1",
        "--method",
        "upcycle",
    ]));
    assert!(e.contains("--experts must be at least 2"), "{e}");
    let e = err(&with(&[
        "--experts",
        "4",
        "--top-k",
        "2",
        "--method",
        "split-importance",
    ]));
    assert!(e.contains("needs calibration text (--data FILE)"), "{e}");
    let e = err(&with(&[
        "--experts",
        "4",
        "--top-k",
        "2",
        "--method",
        "upcycle",
        "--router",
        "hidden",
    ]));
    assert!(e.contains("needs --prompts FILE"), "{e}");

    // Upcycle for real, then try to upcycle the result.
    let r = surgeon(&with(&[
        "--experts",
        "4",
        "--top-k",
        "2",
        "--method",
        "upcycle",
    ]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(Path::new(o).join("config.json").is_file());
    let again = dir.path().join("again");
    let r = surgeon(&[
        "moe",
        o,
        "--out",
        again.to_str().unwrap(),
        "--experts",
        "2",
        "--top-k",
        "1",
        "--method",
        "upcycle",
    ]);
    let s = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && s.contains("already a mixture of experts"),
        "{s}"
    );

    let r = surgeon(&with(&[
        "--experts",
        "8",
        "--top-k",
        "2",
        "--method",
        "split-cluster",
        "--dry-run",
    ]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let plan = String::from_utf8_lossy(&r.stdout);
    assert!(
        plan.contains("moe 8 experts x 16, top-2, routing scaled x4"),
        "{plan}"
    );
}

/// Writes the benchmark's synthetic ~1.1B model to `$SURGEON_SYNTH_1B` (scripts/moe/bench.sh).
#[test]
#[ignore]
fn write_synthetic_1b() {
    let dir =
        std::env::var("SURGEON_SYNTH_1B").expect("set SURGEON_SYNTH_1B to the output directory");
    SyntheticSpec::llama_1b()
        .write(Path::new(&dir), Some(2_000_000_000))
        .unwrap();
}

/// SmolLM2-135M-Instruct (from its GGUF): the upcycled model (E=4, K=2) has the dense logits within 1e-4, for a
/// random (std 1) and a zero router.
#[test]
fn smollm2_upcycled_logits_equal_dense() {
    let dense = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let x: Vec<u32> = vec![
        1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253, 1528, 30,
    ];
    let want = logits(&dense, &x);
    for router in [RouterInit::Random { std: 1.0 }, RouterInit::Zeros] {
        let mut o = MoeOptions::new(MoeMethod::Upcycle, 4, 2);
        o.router = router.clone();
        let moe = op::upcycle(&dense, &o).unwrap();
        let d = max_diff(&want, &logits(&moe, &x));
        eprintln!("SmolLM2 upcycled E=4 K=2, router {router:?}: max |dlogit| {d:e}");
        assert!(d < 1e-4, "{router:?}: max |dlogit| {d}");
    }
}

/// A short healing run of a split model with the Switch load-balancing loss (stand-in until
/// `surgeon heal` trains MoE layers): LM loss + 0.01 * aux over `$SURGEON_MOE_HEAL_STEPS` (20) steps of
/// 128 tokens from `$SURGEON_MOE_HEAL_DATA`, AdamW lr 3e-4; prints held-out perplexity (first 512
/// tokens of `$SURGEON_MOE_HEAL_EVAL`, windows of 256) before and after. Model: `$SURGEON_MOE_HEAL_MODEL`.
#[test]
#[ignore]
fn heal_split_model_short() {
    use burn::module::AutodiffModule;
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use surgeon_distill::eval::{perplexity, read_text, EvalOptions};
    use surgeon_distill::heal::loss::nll_sum;
    use surgeon_distill::text;
    type A = burn::backend::Autodiff<B>;
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("set {k}"));
    let plan = surgeon_formats::open_model(&env("SURGEON_MOE_HEAL_MODEL")).unwrap();
    let steps: usize = std::env::var("SURGEON_MOE_HEAL_STEPS")
        .map(|s| s.parse().unwrap())
        .unwrap_or(20);
    let top_k = match plan.arch.layers[0].mlp {
        Mlp::Moe { top_k, .. } => top_k,
        _ => panic!("not an MoE model"),
    };
    let tok = text::load_tokenizer(&plan).unwrap();
    let train = text::encode(
        &tok,
        &read_text(Path::new(&env("SURGEON_MOE_HEAL_DATA"))).unwrap(),
    )
    .unwrap();
    let held = text::encode(
        &tok,
        &read_text(Path::new(&env("SURGEON_MOE_HEAL_EVAL"))).unwrap(),
    )
    .unwrap();
    let eval = EvalOptions {
        window: 256,
        max_tokens: Some(514),
        batch_size: Some(1),
        progress: false,
    };
    let dev = Default::default();
    let mut model = Llama::<A>::from_plan(&plan, &dev).unwrap();
    let before = perplexity(&model.valid(), &held, &eval).unwrap().ppl;
    eprintln!("held-out ppl before: {before:.3}");
    let mut optim = AdamWConfig::new().init();
    let seq = 128;
    let t0 = std::time::Instant::now();
    for step in 0..steps {
        let s = (step * (seq + 1)) % (train.len() - seq - 1);
        let w = &train[s..s + seq + 1];
        let inp: Vec<i64> = w[..seq].iter().map(|&x| x as i64).collect();
        let tgt: Vec<i64> = w[1..].iter().map(|&x| x as i64).collect();
        let inp = Tensor::<A, 2, Int>::from_data(TensorData::new(inp, [1, seq]), &dev);
        let tgt = Tensor::<A, 2, Int>::from_data(TensorData::new(tgt, [1, seq]), &dev);
        let (logits, router) = moe_aux::forward_with_router_logits(&model, inp);
        let lm = nll_sum(logits, tgt) / seq as f64;
        let aux = moe_aux::load_balancing_loss(&router, top_k);
        let (lmv, auxv) = (
            lm.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()[0],
            aux.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()[0],
        );
        let loss = lm + aux * 0.01;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-4, model, grads);
        eprintln!(
            "step {step}: lm {lmv:.4} aux {auxv:.4} ({:.1}s)",
            t0.elapsed().as_secs_f64()
        );
    }
    let after = perplexity(&model.valid(), &held, &eval).unwrap().ppl;
    eprintln!("held-out ppl before {before:.3} after {after:.3} ({steps} steps)");
    assert!(after < before);
}
