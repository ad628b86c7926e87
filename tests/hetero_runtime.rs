//! The runtime on heterogeneous models (per-layer MLP widths, KV groups, v/o head sizes, no-op
//! attention and MLP), each read back from the directory surgeon exports (native, nemotron-nas or
//! surgeon dialect): logits against transformers running that directory with
//! `trust_remote_code=True` (goldens by scripts/goldens/hetero_goldens.py, no torch needed here),
//! greedy generation with the KV cache against the full forward and transformers' `generate`, a KD
//! heal that exports the same dialect again, and shape errors that name layer and tensor.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::heal::{heal, Budget, DataSpec, HealConfig, LossKind};
use surgeon_distill::model::Llama;
use surgeon_formats::export::choose_export;
use surgeon_formats::synthetic::{SyntheticSpec, Variant};
use surgeon_formats::writer::WriteOptions;
use surgeon_formats::{open_hf_dir, write_model, Plan};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hetero")
}

fn variant_plan(v: Variant) -> Plan {
    let spec = SyntheticSpec::hetero();
    spec.plan_of(spec.variant_arch(v))
}

/// The variant as `surgeon synth --preset hetero --variant V` writes it, read back.
fn exported(v: Variant, dir: &Path) -> Plan {
    let spec = SyntheticSpec::hetero();
    spec.write_plan(&variant_plan(v), dir, None).unwrap();
    open_hf_dir(dir).unwrap()
}

struct Golden {
    meta: serde_json::Value,
    logits: Vec<f32>,
}

fn golden(v: Variant) -> Golden {
    let meta = std::fs::read(fixtures().join(format!("{}.json", v.name()))).unwrap();
    Golden {
        meta: serde_json::from_slice(&meta).unwrap(),
        logits: read_f32s(&fixtures().join(format!("{}_logits.bin", v.name()))),
    }
}

#[test]
fn logits_match_transformers_for_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    for v in Variant::ALL {
        let g = golden(v);
        let plan = exported(v, &tmp.path().join(v.name()));
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(tmp.path().join(v.name()).join("config.json")).unwrap(),
        )
        .unwrap();
        // The goldens were made from the dialect this export picks.
        assert_eq!(g.meta["model_type"], config["model_type"], "{v:?}");
        assert_eq!(
            g.meta["model_type"],
            choose_export(&plan.arch).format.model_type(),
            "{v:?}"
        );
        assert_eq!(plan.arch.layers, variant_plan(v).arch.layers, "{v:?}");
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let logits = to_vec(model.forward(ids(&u32s(&g.meta["tokens"]))));
        let d = max_diff(&logits, &g.logits);
        assert!(d < 1e-4, "{v:?}: logits differ from transformers' by {d}");
        eprintln!("{}: max |logit - transformers'| = {d:e}", v.name());
        // Not trivially equal: the variants really differ from the uniform model.
        if v != Variant::Uniform {
            let u = golden(Variant::Uniform).logits;
            assert!(
                max_diff(&logits, &u) > 1e-3,
                "{v:?} computes the uniform model"
            );
        }
    }
}

/// Greedy tokens after `prompt` by full forwards over the growing sequence (no cache).
fn greedy_without_cache(model: &Llama<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let vocab = model.vocab_size();
    for _ in 0..n {
        let logits = to_vec(model.forward(ids(&seq)));
        seq.push(argmax(&logits[logits.len() - vocab..]));
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn greedy_generation_with_the_cache_equals_full_forward_and_transformers() {
    for v in Variant::ALL {
        let g = golden(v);
        let model = Llama::<B>::from_plan(&variant_plan(v), &Default::default()).unwrap();
        let prompt = u32s(&g.meta["prompt"]);
        let want = u32s(&g.meta["greedy"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..Default::default()
        };
        let cached = generate(&model, &prompt, &opts, &mut |_| true).tokens;
        assert_eq!(cached, want, "{v:?}: greedy tokens with the cache");
        let full = greedy_without_cache(&model, &prompt, want.len());
        assert_eq!(full, want, "{v:?}: greedy tokens by full forwards");
    }
}

#[test]
fn cached_logits_equal_the_full_forward() {
    let model = Llama::<B>::from_plan(&variant_plan(Variant::Mixed), &Default::default()).unwrap();
    let tokens = [1u32, 17, 200, 3, 45, 99, 128, 7];
    let full = to_vec(model.forward(ids(&tokens)));
    let mut cache = model.new_cache();
    let mut stepped = to_vec(model.forward_cached(ids(&tokens[..3]), &mut cache));
    for t in &tokens[3..] {
        stepped.extend(to_vec(model.forward_cached(ids(&[*t]), &mut cache)));
    }
    assert_eq!(cache.len(), tokens.len());
    let d = max_diff(&full, &stepped);
    assert!(
        d < 1e-5,
        "cached logits differ from the full forward by {d}"
    );
}

#[test]
fn shapes_that_disagree_with_the_tensors_name_layer_and_tensor() {
    let mut plan = variant_plan(Variant::Mixed);
    // Layer 3 is standard; claim its values are half size.
    plan.arch.layers[3].attention.v_head_dim /= 2;
    let e = Llama::<B>::from_plan(&plan, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.3.self_attn.v_proj.weight"), "{e}");
    assert!(e.contains("model.layers.3.self_attn.o_proj.weight"), "{e}");
    // Layer 1 has no attention; a config that gives it one misses its tensors.
    let mut plan = variant_plan(Variant::Mixed);
    plan.arch.layers[1].attention = plan.arch.layers[3].attention.clone();
    let e = Llama::<B>::from_plan(&plan, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor `model.layers.1.input_layernorm.weight` is missing"),
        "{e}"
    );
}

/// KD-heals variant `v` (teacher: the uniform model) for 3 steps and checks that the healed model
/// changed, is written in the dialect `model_type` with its modeling code, runs, and writes again
/// unchanged.
fn heal_and_export_again(v: Variant, model_type: &str, code_file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let plan = exported(v, &tmp.path().join("student"));
    let teacher = variant_plan(Variant::Uniform);
    let docs: Vec<Vec<u32>> = (0..16)
        .map(|d| {
            (0..40)
                .map(|i| ((d * 131 + i * 17) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    let cfg = HealConfig {
        data: DataSpec::Tokens(docs),
        out: tmp.path().join("healed"),
        loss: LossKind::KdLm,
        budget: Budget::Steps(3),
        seq_len: 16,
        batch: 2,
        lr: 1e-2,
        ..Default::default()
    };
    let report = heal(&cfg, plan.clone(), Some(teacher)).unwrap();
    let dir = report.model_dir.unwrap();
    let healed = open_hf_dir(&dir).unwrap();
    assert_eq!(healed.arch.layers, plan.arch.layers, "{v:?}");
    let changed = plan
        .tensors
        .keys()
        .filter(|n| plan.load_f32(n).unwrap().1 != healed.load_f32(n).unwrap().1)
        .count();
    assert!(
        changed * 2 > plan.tensors.len(),
        "{v:?}: 3 steps at lr 1e-2 changed only {changed} of {} tensors",
        plan.tensors.len()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], model_type, "{v:?}");
    assert!(dir.join(code_file).is_file(), "{v:?}: {code_file}");
    // The healed model runs, and writes out again unchanged.
    Llama::<B>::from_plan(&healed, &Default::default()).unwrap();
    write_model(&healed, &tmp.path().join("again"), &WriteOptions::default()).unwrap();
    let again = open_hf_dir(&tmp.path().join("again")).unwrap();
    assert_eq!(again.arch, healed.arch, "{v:?}");
    for n in healed.tensors.keys() {
        assert_eq!(
            healed.load_f32(n).unwrap().1,
            again.load_f32(n).unwrap().1,
            "{v:?}: {n}"
        );
    }
}

#[test]
fn kd_heal_trains_a_mixed_model_and_exports_the_surgeon_dialect_again() {
    heal_and_export_again(Variant::Mixed, "surgeon", "modeling_surgeon.py");
}

#[test]
fn kd_heal_trains_a_nemotron_nas_model_and_exports_it_again() {
    heal_and_export_again(Variant::NoOpAttention, "nemotron-nas", "modeling_decilm.py");
}
