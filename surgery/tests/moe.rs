//! MoE construction on synthetic models: errors, partitions, dense equivalence, plans, export.
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{config, DType, Mlp, MoeRouting, Plan};
use surgeon_surgery::moe::*;

fn tiny() -> Plan {
    SyntheticSpec::tiny().plan()
}

fn opts(method: MoeMethod, e: usize, k: usize) -> MoeOptions {
    MoeOptions::new(method, e, k)
}

/// Fake calibration statistics of the right shapes for the data-driven methods.
fn stats_for(plan: &Plan, method: MoeMethod, e: usize) -> Option<SplitStats> {
    let layers: Vec<usize> = plan
        .arch
        .layers
        .iter()
        .map(|l| match l.mlp {
            Mlp::Dense { intermediate_size } => intermediate_size,
            _ => unreachable!(),
        })
        .collect();
    match method {
        MoeMethod::SplitCoactivation => {
            let t = 40;
            let features = layers
                .iter()
                .enumerate()
                .map(|(l, &i)| {
                    surgeon_formats::plan::random_normal(l as u64, i * t, 1.0)
                        .into_iter()
                        .map(|v| (v > 0.5) as u8 as f32)
                        .collect()
                })
                .collect();
            Some(SplitStats::Coactivation {
                features,
                tokens: t,
            })
        }
        MoeMethod::SplitImportance => Some(SplitStats::Importance {
            scores: layers
                .iter()
                .enumerate()
                .map(|(l, &i)| {
                    surgeon_formats::plan::random_normal(100 + l as u64, e * i, 1.0)
                        .into_iter()
                        .map(f32::abs)
                        .collect()
                })
                .collect(),
        }),
        _ => None,
    }
}

fn err(plan: &Plan, o: &MoeOptions) -> String {
    build(plan, o, None).err().expect("should fail").to_string()
}

#[test]
fn errors_are_one_line_and_clear() {
    let p = tiny();
    let e = err(&p, &opts(MoeMethod::SplitRandom, 3, 1));
    assert!(
        e.contains("`experts` 3 does not divide the FFN width 128 of layer 0"),
        "{e}"
    );
    let e = err(&p, &opts(MoeMethod::Upcycle, 4, 5));
    assert!(
        e.contains("`top_k` must be between 1 and `experts` = 4 (got 5)"),
        "{e}"
    );
    let e = err(&p, &opts(MoeMethod::Upcycle, 4, 0));
    assert!(e.contains("`top_k` must be between 1"), "{e}");
    let e = err(&p, &opts(MoeMethod::SplitRandom, 1, 1));
    assert!(e.contains("`experts` must be at least 2 (got 1)"), "{e}");
    let moe = upcycle(&p, &opts(MoeMethod::Upcycle, 4, 2)).unwrap();
    let e = err(&moe, &opts(MoeMethod::Upcycle, 4, 2));
    assert!(
        e.contains("already a mixture of experts (layer 0 has 4 experts)"),
        "{e}"
    );
    let e = err(&p, &opts(MoeMethod::SplitCoactivation, 4, 2));
    assert!(e.contains("needs neuron firing statistics"), "{e}");
    // Upcycling does not need E to divide the width.
    upcycle(&p, &opts(MoeMethod::Upcycle, 3, 2)).unwrap();
    for o in [
        opts(MoeMethod::SplitRandom, 3, 1),
        opts(MoeMethod::Upcycle, 4, 5),
        opts(MoeMethod::SplitRandom, 1, 1),
    ] {
        assert!(!err(&p, &o).contains('\n'));
    }
}

#[test]
fn partitions_cover_every_neuron_once_for_every_method() {
    let p = tiny();
    for method in [
        MoeMethod::SplitRandom,
        MoeMethod::SplitCluster,
        MoeMethod::SplitCoactivation,
        MoeMethod::SplitImportance,
    ] {
        for e in [2, 4, 8] {
            let s = stats_for(&p, method, e);
            let parts = partitions(&p, &opts(method, e, 2), s.as_ref()).unwrap();
            assert_eq!(parts.len(), 2);
            for layer in &parts {
                check_partition(layer, 128, e).unwrap();
                let mut all: Vec<usize> = layer.iter().flatten().copied().collect();
                all.sort_unstable();
                assert_eq!(all, (0..128).collect::<Vec<_>>(), "{method} e={e}");
                for set in layer {
                    assert_eq!(set.len(), 128 / e);
                    assert!(set.windows(2).all(|w| w[0] < w[1]));
                }
            }
        }
    }
}

fn matmul_t(x: &[f32], w: &[f32], out_dim: usize, in_dim: usize) -> Vec<f32> {
    // y = W x for W [out, in] row-major.
    (0..out_dim)
        .map(|o| {
            w[o * in_dim..(o + 1) * in_dim]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn swiglu(x: &[f32], gate: &[f32], up: &[f32], down: &[f32], h: usize, i: usize) -> Vec<f32> {
    let g = matmul_t(x, gate, i, h);
    let u = matmul_t(x, up, i, h);
    let a: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    matmul_t(&a, down, h, i)
}

fn values(plan: &Plan, name: &str) -> Vec<f32> {
    plan.load_f32(name).unwrap().1
}

#[test]
fn all_experts_at_weight_one_equal_the_dense_mlp() {
    let dense = tiny();
    let (h, i) = (64, 128);
    let xs: Vec<Vec<f32>> = (0..3)
        .map(|s| surgeon_formats::plan::random_normal(50 + s, h, 1.0))
        .collect();
    for method in [
        MoeMethod::SplitRandom,
        MoeMethod::SplitCluster,
        MoeMethod::SplitCoactivation,
        MoeMethod::SplitImportance,
    ] {
        for fold in [false, true] {
            let e = 8;
            let mut o = opts(method, e, 2);
            o.fold_scale = fold;
            let s = stats_for(&dense, method, e);
            let moe = build(&dense, &o, s.as_ref()).unwrap();
            for l in 0..2 {
                let d = |n: &str| values(&dense, &format!("model.layers.{l}.mlp.{n}.weight"));
                let (g, u, dn) = (d("gate_proj"), d("up_proj"), d("down_proj"));
                for x in &xs {
                    let want = swiglu(x, &g, &u, &dn, h, i);
                    let mut got = vec![0f32; h];
                    for x_e in 0..e {
                        let q = format!("model.layers.{l}.block_sparse_moe.experts.{x_e}");
                        let w = |n: &str| values(&moe, &format!("{q}.{n}.weight"));
                        let y = swiglu(x, &w("w1"), &w("w3"), &w("w2"), h, i / e);
                        // Folding multiplies w2 by E/K; undo it to compare with weight 1.
                        let f = if fold { 2.0 / e as f32 } else { 1.0 };
                        got.iter_mut().zip(&y).for_each(|(a, b)| *a += f * b);
                    }
                    let err = want
                        .iter()
                        .zip(&got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
                    assert!(
                        err <= 1e-5 * scale.max(1e-3),
                        "{method} fold={fold} layer {l}: max error {err} (scale {scale})"
                    );
                }
            }
        }
    }
}

#[test]
fn upcycled_experts_are_byte_copies_and_any_router_preserves_the_dense_mlp() {
    let dense = tiny();
    for router in [
        RouterInit::Random { std: 0.5 },
        RouterInit::Zeros,
        RouterInit::Given {
            label: "test rows".into(),
            rows: vec![surgeon_formats::plan::random_normal(9, 4 * 64, 1.0)],
        },
    ] {
        let mut o = opts(MoeMethod::Upcycle, 4, 2);
        o.router = router;
        let moe = upcycle(&dense, &o).unwrap();
        assert_eq!(moe.arch.family, surgeon_formats::Family::Mixtral);
        for l in 0..2 {
            let d = |n: &str| {
                dense.tensors[&format!("model.layers.{l}.mlp.{n}.weight")]
                    .materialize()
                    .unwrap()
            };
            for x in 0..4 {
                let q = format!("model.layers.{l}.block_sparse_moe.experts.{x}");
                let m = |n: &str| {
                    moe.tensors[&format!("{q}.{n}.weight")]
                        .materialize()
                        .unwrap()
                };
                assert_eq!(m("w1"), d("gate_proj"));
                assert_eq!(m("w2"), d("down_proj"));
                assert_eq!(m("w3"), d("up_proj"));
            }
            assert_eq!(
                moe.tensors[&format!("model.layers.{l}.block_sparse_moe.gate.weight")].shape(),
                vec![4, 64]
            );
        }
        // Attention, norms and embeddings are untouched.
        assert_eq!(
            moe.tensors["model.layers.1.self_attn.q_proj.weight"]
                .materialize()
                .unwrap(),
            dense.tensors["model.layers.1.self_attn.q_proj.weight"]
                .materialize()
                .unwrap()
        );
    }
}

#[test]
fn exported_configs_say_what_the_routing_is() {
    let dense = tiny();
    let up = upcycle(&dense, &opts(MoeMethod::Upcycle, 4, 2)).unwrap();
    let c = config::config_json(&up.arch, DType::F32).unwrap();
    assert_eq!(c["model_type"], "mixtral");
    assert_eq!(c["architectures"][0], "MixtralForCausalLM");
    assert_eq!(c["num_local_experts"], 4);
    assert_eq!(c["num_experts_per_tok"], 2);
    assert_eq!(c["intermediate_size"], 128);
    assert!(config::is_standard(&up.arch));

    let split = build(&dense, &opts(MoeMethod::SplitRandom, 8, 2), None).unwrap();
    assert_eq!(
        split.arch.layers[0].mlp,
        Mlp::Moe {
            num_experts: 8,
            top_k: 2,
            intermediate_size: 16,
            routing: MoeRouting::Scaled { scale: 4.0 }
        }
    );
    let c = config::config_json(&split.arch, DType::F32).unwrap();
    assert_eq!(c["intermediate_size"], 16);
    assert_eq!(c["surgeon"]["layers"][0]["mlp"]["routing"]["scale"], 4.0);
    assert!(!config::is_standard(&split.arch));
    let notes = c["surgeon"]["notes"].as_array().unwrap();
    assert!(notes
        .iter()
        .any(|n| n.as_str().unwrap().contains("multiplied by E/K = 4")));

    let mut o = opts(MoeMethod::SplitRandom, 8, 2);
    o.fold_scale = true;
    let folded = build(&dense, &o, None).unwrap();
    assert!(config::is_standard(&folded.arch));
    let c = config::config_json(&folded.arch, DType::F32).unwrap();
    assert!(c["surgeon"]["notes"][1]
        .as_str()
        .unwrap()
        .contains("folded into every expert's w2"));
}

#[test]
fn written_models_reopen_with_the_same_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let dense = tiny();
    for (name, o) in [
        ("up", opts(MoeMethod::Upcycle, 4, 2)),
        ("split", opts(MoeMethod::SplitCluster, 4, 1)),
    ] {
        let moe = build(&dense, &o, None).unwrap();
        let out = dir.path().join(name);
        surgeon_formats::write_model(&moe, &out, &Default::default()).unwrap();
        let back = surgeon_formats::open_hf_dir(&out).unwrap();
        assert_eq!(back.arch.layers, moe.arch.layers, "{name}");
        assert_eq!(back.arch.surgeon.notes, moe.arch.surgeon.notes);
        for (n, t) in &moe.tensors {
            assert_eq!(
                back.tensors[n].materialize().unwrap(),
                t.materialize().unwrap(),
                "{name}: {n}"
            );
        }
    }
}

#[test]
fn plans_snapshot() {
    let dense = tiny();
    let mut o = opts(MoeMethod::Upcycle, 4, 2);
    o.seed = 1;
    insta::assert_snapshot!("upcycle_e4_k2", upcycle(&dense, &o).unwrap().render());
    let mut o = opts(MoeMethod::SplitRandom, 4, 2);
    o.router = RouterInit::Zeros;
    insta::assert_snapshot!(
        "split_random_e4_k2",
        build(&dense, &o, None).unwrap().render()
    );
    let mut o = opts(MoeMethod::SplitCluster, 4, 1);
    o.fold_scale = true;
    insta::assert_snapshot!(
        "split_cluster_e4_k1_folded",
        build(&dense, &o, None).unwrap().render()
    );
}
