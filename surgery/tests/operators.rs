//! Structural surgery on synthetic checkpoints: plans (snapshots), parameter counts, bytes on disk.
mod common;

use common::*;
use surgeon_formats::arch::{layer_tensors, split_layer_name};
use surgeon_formats::Source;
use surgeon_surgery::*;

#[test]
fn solar_32_to_48_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(32), &dir.path().join("in"));
    let up = upscale_solar(&plan, 48).unwrap();
    up.validate().unwrap();
    assert_eq!(up.arch.num_layers(), 48);
    insta::assert_snapshot!("solar_32_to_48", up.render());
}

#[test]
fn slices_match_solar_and_copy_sources() {
    let plan = small_spec(32).plan();
    let a = upscale_solar(&plan, 48).unwrap();
    let b = upscale(&plan, &parse_slices("0..24,8..32").unwrap()).unwrap();
    assert_eq!(a.render(), b.render());
    // New layer 24 is old layer 8; layer 23 is old 23; layer 47 is old 31.
    for (new, old) in [(0, 0), (23, 23), (24, 8), (47, 31)] {
        for (name, _) in layer_tensors(new, &a.arch.layers[new], 16) {
            let (_, rest) = split_layer_name(&name).unwrap();
            let src = format!("model.layers.{old}.{rest}");
            assert_eq!(
                bytes_of(&a, &name),
                bytes_of(&plan, &src),
                "{name} <- {src}"
            );
        }
    }
    assert!(a.arch.surgeon.new_layers.is_empty());
    assert_eq!(
        a.arch.surgeon.history,
        vec!["upscale: depth up-scaling 32 -> 48 layers, slices 0..24,8..32".to_string()]
    );
}

#[test]
fn upscale_parameter_count_follows_formula() {
    for (n, s) in [(32, 48), (8, 10), (5, 6)] {
        let plan = small_spec(n).plan();
        let p = plan.arch.parameter_count();
        assert_eq!(plan.parameter_count(), p);
        let p_layer: u64 = layer_tensors(0, &plan.arch.layers[0], plan.arch.hidden_size)
            .iter()
            .map(|(_, sh)| sh.iter().product::<usize>() as u64)
            .sum();
        let up = upscale_solar(&plan, s).unwrap();
        let want = p + (s - n) as u64 * p_layer;
        assert_eq!(up.arch.parameter_count(), want, "{n} -> {s}");
        assert_eq!(up.parameter_count(), want, "{n} -> {s}");
    }
    // Tied embeddings too (P_layer measured as what dropping one layer removes).
    let plan = surgeon_formats::synthetic::SyntheticSpec {
        tie_word_embeddings: true,
        ..small_spec(4)
    }
    .plan();
    let p_layer = plan.parameter_count() - drop_layers(&plan, &[0]).unwrap().parameter_count();
    let up = upscale(&plan, &[0..3, 1..4]).unwrap();
    assert_eq!(up.parameter_count(), plan.parameter_count() + 2 * p_layer);
}

#[test]
fn upscaled_tensors_are_bitwise_copies_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(8), &dir.path().join("in"));
    let slices = [0..6, 2..8, 3..4];
    let up = upscale(&plan, &slices).unwrap();
    let out = roundtrip(&up, &dir.path().join("out"));
    assert_eq!(out.arch.num_layers(), 13);
    assert_eq!(out.arch.surgeon.history, up.arch.surgeon.history);
    let map: Vec<usize> = slices.iter().flat_map(|r| r.clone()).collect();
    for name in out.tensors.keys() {
        let src = match split_layer_name(name) {
            Some((k, rest)) => format!("model.layers.{}.{rest}", map[k]),
            None => name.clone(),
        };
        assert_eq!(
            stored_bytes(&out, name),
            stored_bytes(&plan, &src),
            "{name} <- {src}"
        );
    }
    assert_eq!(out.tensors.len(), up.tensors.len());
}

#[test]
fn expand_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(8), &dir.path().join("in"));
    let ex = expand_even(&plan, 2).unwrap();
    ex.validate().unwrap();
    assert_eq!(ex.arch.surgeon.new_layers, vec![4, 9]);
    insta::assert_snapshot!("expand_8_plus_2", ex.render());
}

#[test]
fn expanded_blocks_are_identity_copies_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(6), &dir.path().join("in"));
    let ex = expand(&plan, &[4, 0]).unwrap();
    // Old 0, new(0), old 1..4, new(4), old 5.
    let map = [0, 0, 1, 2, 3, 4, 4, 5];
    assert_eq!(ex.arch.surgeon.new_layers, vec![1, 6]);
    let out = roundtrip(&ex, &dir.path().join("out"));
    assert_eq!(out.arch.surgeon.new_layers, vec![1, 6]);
    assert_eq!(out.arch.num_layers(), 8);
    for name in out.tensors.keys() {
        let Some((k, rest)) = split_layer_name(name) else {
            assert_eq!(stored_bytes(&out, name), stored_bytes(&plan, name));
            continue;
        };
        let got = stored_bytes(&out, name);
        let zeroed = [1, 6].contains(&k)
            && (rest == "self_attn.o_proj.weight" || rest == "mlp.down_proj.weight");
        if zeroed {
            assert!(got.iter().all(|&b| b == 0), "{name} should be zero");
            let src = format!("model.layers.{}.{rest}", map[k]);
            assert_eq!(got.len(), stored_bytes(&plan, &src).len(), "{name}");
        } else {
            let src = format!("model.layers.{}.{rest}", map[k]);
            assert_eq!(got, stored_bytes(&plan, &src), "{name} <- {src}");
            assert!(got.iter().any(|&b| b != 0), "{name} must not be zero");
        }
    }
}

#[test]
fn expand_zeroes_every_expert_w2_in_moe_layers() {
    let plan = moe_plan(small_spec(4).plan(), 3);
    let ex = expand_even(&plan, 2).unwrap();
    ex.validate().unwrap();
    assert_eq!(ex.arch.surgeon.new_layers, vec![2, 5]);
    let mut zeroed = vec![];
    for (name, e) in &ex.tensors {
        if matches!(e.source, Source::Zeros { .. }) {
            zeroed.push(name.as_str());
        }
    }
    let mut want = vec![];
    for k in [2, 5] {
        want.push(format!("model.layers.{k}.self_attn.o_proj.weight"));
        for e in 0..3 {
            want.push(format!(
                "model.layers.{k}.block_sparse_moe.experts.{e}.w2.weight"
            ));
        }
    }
    want.sort();
    assert_eq!(zeroed, want);
    // The router and w1/w3 are copied.
    assert_eq!(
        bytes_of(&ex, "model.layers.5.block_sparse_moe.gate.weight"),
        bytes_of(&plan, "model.layers.3.block_sparse_moe.gate.weight")
    );
    assert_eq!(
        bytes_of(&ex, "model.layers.5.block_sparse_moe.experts.1.w3.weight"),
        bytes_of(&plan, "model.layers.3.block_sparse_moe.experts.1.w3.weight")
    );
    assert!(ex.arch.surgeon.history[0].contains("expert w2"));
}

#[test]
fn drop_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(8), &dir.path().join("in"));
    let d = drop_layers(&plan, &[5, 1]).unwrap();
    d.validate().unwrap();
    assert_eq!(d.arch.num_layers(), 6);
    insta::assert_snapshot!("drop_1_5_of_8", d.render());
}

#[test]
fn drop_renumbers_and_keeps_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = written(&small_spec(5), &dir.path().join("in"));
    let d = drop_layers(&plan, &[0, 3]).unwrap();
    let out = roundtrip(&d, &dir.path().join("out"));
    let map = [1, 2, 4];
    assert_eq!(out.arch.num_layers(), 3);
    for name in out.tensors.keys() {
        let src = match split_layer_name(name) {
            Some((k, rest)) => format!("model.layers.{}.{rest}", map[k]),
            None => name.clone(),
        };
        assert_eq!(
            stored_bytes(&out, name),
            stored_bytes(&plan, &src),
            "{name}"
        );
    }
}

#[test]
fn new_layers_follow_later_surgery() {
    let plan = small_spec(4).plan();
    let ex = expand_even(&plan, 2).unwrap(); // 0 1 [1] 2 3 [3]
    assert_eq!(ex.arch.surgeon.new_layers, vec![2, 5]);
    let d = drop_layers(&ex, &[0]).unwrap();
    assert_eq!(d.arch.surgeon.new_layers, vec![1, 4]);
    let up = upscale(&d, &[0..5, 1..2]).unwrap();
    assert_eq!(up.arch.surgeon.new_layers, vec![1, 4, 5]);
    assert_eq!(up.arch.surgeon.history.len(), 3);
}

#[test]
fn layer_types_follow_the_layers() {
    let mut plan = small_spec(4).plan();
    let types: Vec<serde_json::Value> = (0..4).map(|i| format!("t{i}").into()).collect();
    plan.arch
        .extra
        .insert("layer_types".into(), serde_json::Value::Array(types));
    let d = drop_layers(&plan, &[1]).unwrap();
    assert_eq!(
        d.arch.extra["layer_types"],
        serde_json::json!(["t0", "t2", "t3"])
    );
}

#[test]
fn errors_are_one_line_and_specific() {
    let plan = small_spec(8).plan();
    let msg = |e: Error| {
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        m
    };
    // Layer indices out of range.
    let e = err(drop_layers(&plan, &[2, 8]));
    assert!(matches!(e, Error::LayerOutOfRange { layer: 8, n: 8 }));
    assert_eq!(
        msg(e),
        "layer 8 is out of range: the model has 8 layers (0..8)"
    );
    assert!(matches!(
        expand(&plan, &[9]),
        Err(Error::LayerOutOfRange { layer: 9, n: 8 })
    ));
    let e = err(upscale(&plan, &[0..6, 4..9]));
    assert_eq!(
        msg(e),
        "slice 4..9 is out of range: the model has 8 layers (0..8)"
    );
    // Empty or reversed slices.
    assert!(matches!(
        upscale(&plan, &[0..4, 4..4]),
        Err(Error::EmptySlice { at: 4 })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = err(upscale(&plan, &[0..2, 6..2]));
    assert!(msg(reversed).contains("6..2 is reversed"));
    assert!(msg(err(upscale(&plan, &[]))).contains("no slices"));
    // P not dividing n.
    let e = err(expand_even(&plan, 3));
    assert!(matches!(e, Error::NotDivisible { n: 8, p: 3 }));
    assert_eq!(
        msg(e),
        "cannot add 3 blocks to 8 layers evenly: 3 does not divide 8 (give `positions`)"
    );
    assert!(matches!(
        expand(&plan, &[1, 1]),
        Err(Error::DuplicateLayer { layer: 1 })
    ));
    // Dropping every layer.
    let all: Vec<usize> = (0..8).collect();
    let e = err(drop_layers(&plan, &all));
    assert_eq!(msg(e), "cannot drop all 8 layers: at least one must remain");
    assert!(matches!(
        drop_layers(&plan, &[3, 3]),
        Err(Error::DuplicateLayer { layer: 3 })
    ));
    // S invalid: odd, <= n, >= 2n.
    for s in [11, 8, 4, 16, 20] {
        let e = err(upscale_solar(&plan, s));
        assert!(matches!(e, Error::InvalidTarget { n: 8, .. }), "{s}");
        assert_eq!(
            msg(e),
            format!("cannot up-scale 8 layers to {s}: SOLAR needs an even target between 8 and 16 (exclusive), e.g. 12")
        );
    }
}

fn err<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}
