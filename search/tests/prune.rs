//! Sub-network extraction on a synthetic Llama (4 query heads over 2 KV groups, MLP 128, hidden
//! 64): the parent's spec is bitwise the parent, kept rows are the top-k by score in parent order,
//! parameter counts follow the formula, and bad specs name their field.
use surgeon_formats::importance::IMPORTANCE_FORMAT;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{ImportanceScores, LayerImportance, Plan};
use surgeon_search::{prune, AttentionSpec, MlpSpec, PruneSpec, UniformPrune};

fn parent() -> Plan {
    SyntheticSpec {
        num_layers: 3,
        ..SyntheticSpec::tiny()
    }
    .plan()
}

/// Scores with a known order: neuron `j` scores `(j * 37) % 128`, head `j` of layer `l`
/// `[0.3, 0.1, 0.4, 0.2][j]` (so group 1 wins, and head 0 beats head 1 in group 0), hidden channel
/// `c` scores `(c * 29) % 64`, layer `l` influence `[0.5, 0.1, 0.3][l]`.
fn scores(plan: &Plan) -> ImportanceScores {
    let a = &plan.arch;
    ImportanceScores {
        format: IMPORTANCE_FORMAT.into(),
        model: "synthetic".into(),
        tokens: 10,
        samples: 1,
        hidden: (0..a.hidden_size).map(|c| ((c * 29) % 64) as f64).collect(),
        block_influence: vec![0.5, 0.1, 0.3],
        layers: (0..a.num_layers())
            .map(|_| LayerImportance {
                mlp: (0..128).map(|j| ((j * 37) % 128) as f64).collect(),
                heads: vec![0.3, 0.1, 0.4, 0.2],
                num_kv_heads: 2,
            })
            .collect(),
    }
}

fn message(r: surgeon_search::Result<Plan>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn values(plan: &Plan, name: &str) -> Vec<f32> {
    plan.load_f32(name).unwrap().1
}

#[test]
fn parent_spec_is_the_parent_bitwise() {
    let p = parent();
    let s = scores(&p);
    let spec = PruneSpec::parent(&p.arch);
    for sc in [Some(&s), None] {
        let out = prune(&p, &spec, sc).unwrap();
        assert_eq!(out.arch, p.arch);
        assert_eq!(out.render(), p.render());
        assert_eq!(out.tensors.len(), p.tensors.len());
        for (name, t) in &p.tensors {
            let a = t.materialize().unwrap();
            let b = out.get(name).unwrap().materialize().unwrap();
            assert_eq!(a.data, b.data, "{name}");
        }
    }
}

#[test]
fn kept_rows_are_the_top_k_by_score_in_parent_order() {
    let p = parent();
    let s = scores(&p);
    let u = UniformPrune {
        intermediate_size: Some(3),
        heads_per_group: Some(1),
        kv_heads: Some(1),
        hidden_size: Some(2),
        keep_layers: None,
    };
    let out = prune(&p, &PruneSpec::uniform(&p.arch, &u), Some(&s)).unwrap();
    // Neurons: scores (j*37)%128 are a permutation of 0..128; the top 3 (125, 126, 127) are at
    // j = 38, 83, 121 (kept in that order).
    let top: Vec<usize> = (0..128).filter(|j| (j * 37) % 128 >= 125).collect();
    assert_eq!(top, vec![38, 83, 121]);
    // Hidden channels: (c*29)%64 is a permutation of 0..64; keep the two scoring 62 and 63.
    let hid: Vec<usize> = (0..64).filter(|c| (c * 29) % 64 >= 62).collect();
    assert_eq!(hid, vec![11, 22]);
    let (h, d) = (64, 16);
    let gate = &values(&p, "model.layers.1.mlp.gate_proj.weight");
    let want: Vec<f32> = top
        .iter()
        .flat_map(|&j| hid.iter().map(move |&c| gate[j * h + c]))
        .collect();
    assert_eq!(values(&out, "model.layers.1.mlp.gate_proj.weight"), want);
    // Heads: group 1 (0.4 + 0.2) beats group 0 (0.3 + 0.1); within it head 2 (0.4) beats head 3.
    let q = &values(&p, "model.layers.0.self_attn.q_proj.weight");
    let want: Vec<f32> = (2 * d..3 * d)
        .flat_map(|r| hid.iter().map(move |&c| q[r * h + c]))
        .collect();
    assert_eq!(values(&out, "model.layers.0.self_attn.q_proj.weight"), want);
    let k = &values(&p, "model.layers.0.self_attn.k_proj.weight");
    let want: Vec<f32> = (d..2 * d)
        .flat_map(|r| hid.iter().map(move |&c| k[r * h + c]))
        .collect();
    assert_eq!(values(&out, "model.layers.0.self_attn.k_proj.weight"), want);
    let o = &values(&p, "model.layers.0.self_attn.o_proj.weight");
    let want: Vec<f32> = hid
        .iter()
        .flat_map(|&c| (2 * d..3 * d).map(move |j| o[c * 4 * d + j]))
        .collect();
    assert_eq!(values(&out, "model.layers.0.self_attn.o_proj.weight"), want);
    let norm = values(&p, "model.norm.weight");
    let want: Vec<f32> = hid.iter().map(|&c| norm[c]).collect();
    assert_eq!(values(&out, "model.norm.weight"), want);
    assert_eq!(out.arch.hidden_size, 2);
    assert_eq!(out.arch.layers[0].attention.num_heads, 1);
    assert_eq!(out.arch.layers[0].attention.head_dim, 16);
}

#[test]
fn parameter_count_follows_the_formula() {
    let p = parent();
    let s = scores(&p);
    let (v, h, d) = (256u64, 48u64, 16u64);
    let u = UniformPrune {
        intermediate_size: Some(96),
        heads_per_group: Some(1),
        kv_heads: Some(2),
        hidden_size: Some(48),
        keep_layers: Some(vec![0, 2]),
    };
    let spec = PruneSpec::uniform(&p.arch, &u);
    let out = prune(&p, &spec, Some(&s)).unwrap();
    // Untied: embeddings and lm_head; per layer two norms, q (2 heads) k v (2 groups) o, 3 MLP.
    let layer = 2 * h + 4 * (2 * d * h) + 3 * 96 * h;
    let want = 2 * v * h + h + 2 * layer;
    assert_eq!(out.parameter_count(), want);
    assert_eq!(spec.parameter_count(&p.arch), want);
    assert_eq!(out.arch.parameter_count(), want);
    // Skipped halves lose their norm and projections too.
    let mut skip = PruneSpec::parent(&p.arch);
    skip.layers[1].attention = AttentionSpec::NoOp;
    skip.layers[2].mlp = MlpSpec::NoOp;
    let out = prune(&p, &skip, None).unwrap();
    let full = p.parameter_count();
    let attn = 64 + 2 * (64 * 64) + 2 * (32 * 64);
    let mlp = 64 + 3 * 128 * 64;
    assert_eq!(out.parameter_count(), full - attn - mlp);
    assert!(out.validate().is_ok());
}

#[test]
fn bad_specs_name_their_field() {
    let p = parent();
    let s = scores(&p);
    let err = |u: UniformPrune, sc: Option<&ImportanceScores>| {
        message(prune(&p, &PruneSpec::uniform(&p.arch, &u), sc))
    };
    let e = err(
        UniformPrune {
            heads_per_group: Some(3),
            ..Default::default()
        },
        Some(&s),
    );
    assert!(
        e.contains("`heads_per_group` 3") && e.contains("2 query heads"),
        "{e}"
    );
    let e = err(
        UniformPrune {
            kv_heads: Some(3),
            ..Default::default()
        },
        Some(&s),
    );
    assert!(e.contains("`kv_heads` 3"), "{e}");
    let e = err(
        UniformPrune {
            hidden_size: Some(65),
            ..Default::default()
        },
        Some(&s),
    );
    assert!(e.contains("`hidden_size` 65"), "{e}");
    let e = err(
        UniformPrune {
            intermediate_size: Some(64),
            ..Default::default()
        },
        None,
    );
    assert!(e.contains("`scores`"), "{e}");
    let e = err(
        UniformPrune {
            keep_layers: Some(vec![0, 3]),
            ..Default::default()
        },
        None,
    );
    assert!(e.contains("`source` 3"), "{e}");
    let mut wrong = s.clone();
    wrong.layers[1].mlp.pop();
    let e = message(prune(&p, &PruneSpec::parent(&p.arch), Some(&wrong)));
    assert!(e.contains("`layers[1].mlp`"), "{e}");
}
