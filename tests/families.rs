//! Model families beyond Llama, from small random checkpoints that transformers made (Qwen3 with
//! its per-head q/k norms and explicit head_dim, Qwen3-MoE with and without `norm_topk_prob`,
//! Phi-3 with fused projections, a sliding window, and LongRoPE past its pretraining length):
//! surgeon's logits and greedy generation against transformers' (goldens by
//! scripts/goldens/families_goldens.py, no torch needed here), a write/read round trip that keeps
//! each family's tensor names, and the structural operators keeping their invariants and class.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::model::Llama;
use surgeon_formats::writer::WriteOptions;
use surgeon_formats::{open_hf_dir, write_model, Family, Plan};
use surgeon_surgery::moe::{upcycle, MoeMethod, MoeOptions};

const FIXTURES: [(&str, Family); 8] = [
    ("qwen3", Family::Qwen3),
    ("qwen3-tied", Family::Qwen3),
    ("qwen3_moe", Family::Qwen3Moe),
    ("qwen3_moe-unnormalized", Family::Qwen3Moe),
    ("phi3", Family::Phi3),
    ("phi3-longrope", Family::Phi3),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3),
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families")
}

struct Golden {
    plan: Plan,
    meta: serde_json::Value,
    logits: Vec<f32>,
}

fn golden(name: &str) -> Golden {
    let meta = std::fs::read(fixtures().join(format!("{name}.json"))).unwrap();
    Golden {
        plan: open_hf_dir(&fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}")),
        meta: serde_json::from_slice(&meta).unwrap(),
        logits: read_f32s(&fixtures().join(format!("{name}_logits.bin"))),
    }
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Tensor names in a written `model.safetensors`, sorted.
fn stored_names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    names
}

fn write(plan: &Plan, dir: &Path) {
    let opts = WriteOptions {
        progress: false,
        ..Default::default()
    };
    write_model(plan, dir, &opts).unwrap();
}

#[test]
fn logits_match_transformers_for_every_family() {
    for (name, family) in FIXTURES {
        let g = golden(name);
        assert_eq!(g.plan.arch.family, family, "{name}");
        let a = &g.plan.arch.layers[0].attention;
        assert_eq!(a.qk_norm, family.has_qk_norm(), "{name}: q/k norms read");
        // Qwen's and Gemma's fixtures have an explicit head_dim of twice hidden / heads.
        let explicit = family != Family::Phi3;
        assert_eq!(
            a.head_dim,
            if explicit { 32 } else { 16 },
            "{name}: head_dim"
        );
        let got = logits(&g.plan, &u32s(&g.meta["tokens"]));
        let d = max_diff(&got, &g.logits);
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
        eprintln!("{name}: max |logit - transformers'| = {d:e}");
    }
}

#[test]
fn greedy_generation_with_the_cache_equals_transformers() {
    for (name, _) in FIXTURES {
        let g = golden(name);
        let model = Llama::<B>::from_plan(&g.plan, &Default::default()).unwrap();
        let want = u32s(&g.meta["greedy"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..Default::default()
        };
        let got = generate(&model, &u32s(&g.meta["prompt"]), &opts, &mut |_| true).tokens;
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn written_checkpoints_keep_each_familys_class_and_tensor_names() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, _) in FIXTURES {
        let g = golden(name);
        let out = tmp.path().join(name);
        write(&g.plan, &out);
        let (src, dst) = (config(&fixtures().join(name)), config(&out));
        assert_eq!(dst["architectures"], src["architectures"], "{name}");
        assert_eq!(dst["model_type"], src["model_type"], "{name}");
        if !src["head_dim"].is_null() {
            assert_eq!(dst["head_dim"], src["head_dim"], "{name}");
        }
        assert_eq!(
            stored_names(&out),
            stored_names(&fixtures().join(name)),
            "{name}"
        );
        let back = open_hf_dir(&out).unwrap();
        assert_eq!(back.arch.layers, g.plan.arch.layers, "{name}");
        assert_eq!(
            logits(&back, &[1, 5, 9]),
            logits(&g.plan, &[1, 5, 9]),
            "{name}"
        );
    }
}

#[test]
fn expand_keeps_logits_and_upscale_keeps_the_class() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = [1, 17, 100, 3, 45, 99];
    for (name, _) in FIXTURES {
        let g = golden(name);
        let want = logits(&g.plan, &tokens);
        // One new block per 2 layers (per layer for Gemma 3's 3).
        let layers = g.plan.arch.num_layers();
        let add = if layers.is_multiple_of(2) { 2 } else { layers };
        let expanded = surgeon_surgery::expand_even(&g.plan, add).unwrap();
        assert_eq!(
            logits(&expanded, &tokens),
            want,
            "{name}: expand is an identity"
        );
        let up = surgeon_surgery::upscale(&g.plan, &[0..2, 1..2]).unwrap();
        for (op, plan) in [("expand", &expanded), ("upscale", &up)] {
            let out = tmp.path().join(format!("{name}-{op}"));
            write(plan, &out);
            let c = config(&out);
            assert_eq!(c["architectures"][0], g.meta["class"], "{name} {op}");
            assert!(c.get("auto_map").is_none(), "{name} {op}: no remote code");
            assert_eq!(open_hf_dir(&out).unwrap().arch.layers, plan.arch.layers);
        }
    }
}

#[test]
fn upcycling_qwen3_gives_qwen3_moe_with_the_same_logits() {
    let g = golden("qwen3");
    let tokens = [1, 17, 100, 3, 45, 99];
    let moe = upcycle(&g.plan, &MoeOptions::new(MoeMethod::Upcycle, 4, 2)).unwrap();
    assert_eq!(moe.arch.family, Family::Qwen3Moe);
    let d = max_diff(&logits(&moe, &tokens), &logits(&g.plan, &tokens));
    assert!(
        d < 1e-4,
        "copies of one MLP compute that MLP (max diff {d})"
    );
    let tmp = tempfile::tempdir().unwrap();
    write(&moe, tmp.path().join("m").as_path());
    let c = config(&tmp.path().join("m"));
    assert_eq!(c["architectures"][0], "Qwen3MoeForCausalLM");
    assert_eq!(c["norm_topk_prob"], true);
    let names = stored_names(&tmp.path().join("m"));
    assert!(names.contains(&"model.layers.0.mlp.experts.3.down_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.1.mlp.gate.weight".to_string()));
    assert!(
        !names.iter().any(|n| n.contains("block_sparse_moe")),
        "{names:?}"
    );
}

/// A split Qwen3 (scaled routing) is no standard class: it is exported in the surgeon dialect,
/// whose shipped modeling code (q/k norms included) transformers ran for the golden.
#[test]
fn split_qwen3_in_the_surgeon_dialect_matches_transformers_remote_code() {
    let g = golden("qwen3");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("qwen3-split.json")).unwrap())
            .unwrap();
    let want = read_f32s(&fixtures().join("qwen3-split_logits.bin"));
    let mut opts = MoeOptions::new(MoeMethod::SplitRandom, 4, 2);
    opts.seed = 0;
    let split = surgeon_surgery::moe::split(&g.plan, &opts, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("split");
    write(&split, &out);
    assert_eq!(config(&out)["model_type"], meta["model_type"]);
    let back = open_hf_dir(&out).unwrap();
    assert_eq!(back.arch.family, Family::Qwen3Moe);
    let d = max_diff(&logits(&back, &u32s(&meta["tokens"])), &want);
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
}

/// The Qwen3 fixture as llama.cpp lays it out (`general.architecture` qwen3: `attn_q_norm`,
/// `attention.key_length`, q/k rows not permuted) imports to the same model.
#[test]
fn a_qwen3_gguf_imports_to_the_same_model() {
    let g = golden("qwen3");
    let path = fixtures().join("qwen3.gguf");
    let plan = surgeon_formats::open_model(path.to_str().unwrap()).unwrap();
    assert_eq!(plan.arch.family, Family::Qwen3);
    assert_eq!(plan.arch.layers, g.plan.arch.layers);
    let d = max_diff(&logits(&plan, &u32s(&g.meta["tokens"])), &g.logits);
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
}

/// Every Gemma departure from Llama is exercised by its golden: turning one off moves the logits
/// well past the 1e-4 the goldens allow.
#[test]
fn every_gemma_feature_moves_the_logits() {
    type Edit = fn(&mut surgeon_formats::ModelArch);
    let edits: [(&str, &str, Edit); 6] = [
        ("gemma2", "sliding window", |a| a.sliding_window = None),
        ("gemma2", "attention soft-capping", |a| {
            a.gemma.attn_logit_softcapping = None
        }),
        ("gemma2", "final soft-capping", |a| {
            a.gemma.final_logit_softcapping = None
        }),
        ("gemma2", "query_pre_attn_scalar", |a| {
            a.gemma.query_pre_attn_scalar = None
        }),
        ("gemma3", "local RoPE base", |a| {
            a.gemma.rope_local_theta = None
        }),
        ("gemma3", "global layers", |a| {
            a.layers
                .iter_mut()
                .for_each(|l| l.attention.full_attention = false)
        }),
    ];
    for (name, what, edit) in edits {
        let g = golden(name);
        let mut plan = g.plan.clone();
        edit(&mut plan.arch);
        let d = max_diff(&logits(&plan, &u32s(&g.meta["tokens"])), &g.logits);
        assert!(d > 1e-3, "{name} without its {what}: logits moved only {d}");
    }
}

/// LLaMA Pro blocks on Gemma: the zeroed `o_proj` and `down_proj` feed the post-norms, and an
/// RMSNorm of zeros is zeros, so each new block adds exactly nothing (bitwise, checked by
/// `expand_keeps_logits_and_upscale_keeps_the_class`); here the new blocks' shapes.
#[test]
fn gemma_expansion_zeroes_the_projections_before_the_post_norms() {
    let g = golden("gemma2");
    let expanded = surgeon_surgery::expand_even(&g.plan, 2).unwrap();
    let new = &expanded.arch.surgeon.new_layers;
    assert_eq!(new.len(), 2);
    for &l in new {
        for t in ["self_attn.o_proj", "mlp.down_proj"] {
            let (_, v) = expanded
                .load_f32(&format!("model.layers.{l}.{t}.weight"))
                .unwrap();
            assert!(v.iter().all(|&x| x == 0.0), "layer {l} {t}");
        }
        // A copy keeps its source's layer type (the window and RoPE base follow it).
        assert_eq!(
            expanded.arch.layers[l].attention,
            expanded.arch.layers[l - 1].attention
        );
    }
}

/// Vocabulary extension adds stored rows; the runtime scales old and new rows alike, so a new
/// token initialised from its pieces embeds as the mean of the pieces' scaled embeddings, and the
/// old tokens' logits (the tied matrix gains columns) are unchanged.
#[test]
fn vocabulary_extension_honours_gemmas_embedding_scale() {
    use surgeon_formats::{Op, Source, TensorEntry};
    use surgeon_surgery::vocab::{new_rows, Init};
    let g = golden("gemma2");
    let name = "model.embed_tokens.weight";
    let entry = g.plan.tensors[name].clone();
    let v = g.plan.arch.vocab_size;
    let rows = new_rows(&entry.source, v, &[vec![3, 45]], 0, Init::ZipTie, 0).unwrap();
    let mut plan = g.plan.clone();
    let source = Source::op(Op::Concat {
        inputs: vec![entry.source.clone(), rows],
        dim: 0,
    });
    plan.tensors
        .insert(name.into(), TensorEntry { source, ..entry });
    plan.arch.vocab_size = v + 1;
    let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
    let e = |t: u32| to_vec(model.embed(ids(&[t])));
    let mean: Vec<f32> = e(3).iter().zip(e(45)).map(|(a, b)| (a + b) / 2.0).collect();
    let d = max_diff(&e(v as u32), &mean);
    assert!(d < 1e-5, "new row vs mean of scaled pieces: {d}");
    let scale = (g.plan.arch.hidden_size as f32).sqrt();
    let (_, stored) = g.plan.load_f32(name).unwrap();
    let h = g.plan.arch.hidden_size;
    assert!(
        max_diff(
            &e(3),
            &stored[3 * h..4 * h]
                .iter()
                .map(|x| x * scale)
                .collect::<Vec<_>>()
        ) < 1e-6
    );
    let tokens = [1, 17, 100, 3];
    let old = logits(&g.plan, &tokens);
    let new = logits(&plan, &tokens);
    let kept: Vec<f32> = new.chunks(v + 1).flat_map(|r| r[..v].to_vec()).collect();
    assert_eq!(kept, old);
}

/// Operators whose result no Gemma class describes (or whose computation drops Gemma's) refuse
/// with the family and the reason, before anything is written.
#[test]
fn gemma_refusals_name_the_family_and_the_reason() {
    let g = golden("gemma2");
    let Err(e) = upcycle(&g.plan, &MoeOptions::new(MoeMethod::Upcycle, 4, 2)) else {
        panic!("upcycled a gemma2 model");
    };
    let e = e.to_string();
    assert!(
        e.contains("gemma2") && e.contains("mixture-of-experts"),
        "{e}"
    );
    let opts = surgeon_convert::HedgehogOptions {
        feature_dim: 8,
        ..Default::default()
    };
    let Err(e) = surgeon_convert::to_hedgehog(&g.plan, &opts) else {
        panic!("converted a gemma2 model to hedgehog");
    };
    let e = e.to_string();
    assert!(e.contains("gemma2") && e.contains("soft-capping"), "{e}");
    // Layers of different widths: no Gemma2ForCausalLM, and the surgeon dialect has no Gemma.
    let mut plan = g.plan.clone();
    plan.arch.layers[0].mlp = surgeon_formats::Mlp::Dense {
        intermediate_size: 48,
    };
    let e = surgeon_formats::config::config_json(&plan.arch, surgeon_formats::DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemma2") && e.contains("MLPs differ"), "{e}");
}

/// GQA -> MHA on Gemma 3 (key norms shared by all heads): duplicated key/value heads compute the
/// same attention, so the logits stay, and the result is still Gemma3ForCausalLM.
#[test]
fn gemma3_kv_heads_regroup_exactly() {
    let g = golden("gemma3");
    let mha = surgeon_convert::regroup_kv_heads(&g.plan, 4).unwrap();
    let tokens = u32s(&g.meta["tokens"]);
    let d = max_diff(&logits(&mha, &tokens), &g.logits);
    assert!(d < 1e-4, "{d}");
    let c = surgeon_formats::config::config_json(&mha.arch, surgeon_formats::DType::F32).unwrap();
    assert_eq!(c["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(c["num_key_value_heads"], 4);
}

/// CLOVER's value-output decomposition rotates `v_proj` rows and `o_proj` columns per head; the
/// product each head adds is unchanged, so Gemma's post-attention norm sees the same input.
#[test]
fn clover_values_on_gemma2_keep_logits_and_the_class() {
    let g = golden("gemma2");
    let opts = surgeon_convert::CloverOptions::default();
    let (out, _) = surgeon_convert::clover(&g.plan, &opts, None).unwrap();
    let d = max_diff(&logits(&out, &u32s(&g.meta["tokens"])), &g.logits);
    assert!(d < 1e-4, "{d}");
    let c = surgeon_formats::config::config_json(&out.arch, surgeon_formats::DType::F32).unwrap();
    assert_eq!(c["architectures"][0], "Gemma2ForCausalLM");
}
