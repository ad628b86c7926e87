//! Key/value head regrouping on synthetic checkpoints: identity, group means, exact repetition.
use surgeon_convert::{regroup_kv_heads, Error};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::Plan;

/// 8 query heads over 4 key/value heads of size 4, with q/k/v biases (Qwen2-style).
fn model() -> Plan {
    let mut plan = SyntheticSpec {
        hidden_size: 32,
        num_heads: 8,
        num_kv_heads: 4,
        ..SyntheticSpec::tiny()
    }
    .plan();
    add_qkv_biases(&mut plan);
    plan
}

fn add_qkv_biases(plan: &mut Plan) {
    use surgeon_formats::{HostTensor, Source, TensorEntry};
    for l in 0..plan.arch.layers.len() {
        plan.arch.layers[l].attention.qkv_bias = true;
        let a = plan.arch.layers[l].attention.clone();
        for (p, n) in [("q", a.q_dim()), ("k", a.kv_dim()), ("v", a.kv_dim())] {
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + l as f32).sin()).collect();
            let t = HostTensor::from_f32(vec![n], &values);
            plan.tensors.insert(
                format!("model.layers.{l}.self_attn.{p}_proj.bias"),
                TensorEntry::new(Source::inline("bias", t)),
            );
        }
    }
    plan.validate().unwrap();
}

fn values(plan: &Plan, name: &str) -> (Vec<usize>, Vec<f32>) {
    plan.load_f32(name).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn same_count_is_the_identity() {
    let plan = model();
    let out = regroup_kv_heads(&plan, 4).unwrap();
    assert_eq!(out.arch, plan.arch);
    for name in plan.tensors.keys() {
        assert_eq!(
            bits(&values(&out, name).1),
            bits(&values(&plan, name).1),
            "{name}"
        );
    }
}

#[test]
fn fewer_heads_are_group_means_in_repeat_kv_order() {
    let plan = model();
    let out = regroup_kv_heads(&plan, 2).unwrap();
    let (d, h) = (4, 32);
    for l in 0..2 {
        assert_eq!(out.arch.layers[l].attention.num_kv_heads, 2);
        for proj in ["k_proj", "v_proj"] {
            let w = format!("model.layers.{l}.self_attn.{proj}.weight");
            let (shape, old) = values(&plan, &w);
            assert_eq!(shape, vec![4 * d, h]);
            let (shape, new) = values(&out, &w);
            assert_eq!(shape, vec![2 * d, h]);
            // New head g is the mean of old heads 2g and 2g+1 (each read by two query heads).
            for g in 0..2 {
                for i in 0..d * h {
                    let a = old[(2 * g) * d * h + i] as f64;
                    let b = old[(2 * g + 1) * d * h + i] as f64;
                    let want = ((a + b) / 2.0) as f32;
                    assert_eq!(new[g * d * h + i], want, "{w} head {g} element {i}");
                }
            }
            let bias = format!("model.layers.{l}.self_attn.{proj}.bias");
            let (_, old) = values(&plan, &bias);
            let (_, new) = values(&out, &bias);
            for g in 0..2 {
                for i in 0..d {
                    let want = ((old[2 * g * d + i] as f64 + old[(2 * g + 1) * d + i] as f64) / 2.0)
                        as f32;
                    assert_eq!(new[g * d + i], want, "{bias}");
                }
            }
        }
        // Queries and outputs are untouched.
        let q = format!("model.layers.{l}.self_attn.q_proj.weight");
        assert_eq!(bits(&values(&out, &q).1), bits(&values(&plan, &q).1));
    }
    assert!(out
        .arch
        .surgeon
        .history
        .last()
        .unwrap()
        .contains("4 -> 2 key/value heads"));
}

#[test]
fn more_heads_repeat_exactly_and_pool_back_to_the_original() {
    let plan = model();
    let mha = regroup_kv_heads(&plan, 8).unwrap();
    let k = "model.layers.1.self_attn.k_proj.weight";
    let (_, old) = values(&plan, k);
    let (shape, new) = values(&mha, k);
    assert_eq!(shape, vec![8 * 4, 32]);
    let head = 4 * 32;
    for q in 0..8 {
        let src = q / 2;
        assert_eq!(
            bits(&new[q * head..(q + 1) * head]),
            bits(&old[src * head..(src + 1) * head]),
            "query head {q} reads old kv head {src}"
        );
    }
    let back = regroup_kv_heads(&mha, 4).unwrap();
    for name in plan.tensors.keys() {
        assert_eq!(
            bits(&values(&back, name).1),
            bits(&values(&plan, name).1),
            "{name}"
        );
    }
    // Parameter count from the formula: k and v shrink or grow by (G' - G) * d * (h + 1) each.
    let per_layer = 2 * (8 - 4) * 4 * (32 + 1);
    assert_eq!(
        mha.parameter_count(),
        plan.parameter_count() + 2 * per_layer as u64
    );
}

#[test]
fn counts_that_do_not_divide_the_query_heads_are_refused() {
    let plan = model();
    for g in [0, 3, 5, 16] {
        let e = regroup_kv_heads(&plan, g).err().unwrap();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let m = e.to_string();
        assert!(m.contains("`kv_heads`") && m.contains("1, 2, 4, 8"), "{m}");
    }
}

#[test]
fn plan_snapshot() {
    let out = regroup_kv_heads(&model(), 1).unwrap();
    insta::assert_snapshot!(out.render());
}

#[test]
fn heterogeneous_layers_regroup_values_by_their_own_head_size_and_skip_no_op_attention() {
    use surgeon_formats::synthetic::Variant;
    let spec = SyntheticSpec::hetero();
    // Layer 0: 1 kv head, values of 8 per head (keys 16); layer 1: no attention.
    let plan = spec.plan_of(spec.variant_arch(Variant::Mixed));
    let out = regroup_kv_heads(&plan, 4).unwrap(); // validates shapes against the architecture
    assert!(out.arch.layers[1].attention.is_no_op());
    assert_eq!(out.arch.layers[0].attention.num_kv_heads, 4);
    for (proj, d) in [("k_proj", 16), ("v_proj", 8)] {
        let name = format!("model.layers.0.self_attn.{proj}.weight");
        let (old_shape, old) = values(&plan, &name);
        let (shape, new) = values(&out, &name);
        assert_eq!(shape, vec![4 * d, old_shape[1]], "{name}");
        // The single old head, repeated for each of the 4 new heads.
        for g in 0..4 {
            let rows = g * d * old_shape[1]..(g + 1) * d * old_shape[1];
            assert_eq!(bits(&new[rows]), bits(&old), "{name} head {g}");
        }
    }
}
