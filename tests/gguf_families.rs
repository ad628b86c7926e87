//! GGUF import of the families beyond Llama: the Gemma, Qwen3-MoE and Phi-3 fixtures of
//! tests/families.rs laid out as llama.cpp's converter lays them out (Gemma norms stored as `1 + w`
//! under its sandwich-norm names, stacked experts, fused Phi-3 projections), made by
//! scripts/goldens/gguf_families_goldens.py. The import must give the fixture's tensors back and
//! the model llama.cpp reads from the file: what a GGUF cannot say (the attention scale, the layer
//! pattern, Gemma 3's local RoPE base) is what llama.cpp hard-codes, and the goldens are
//! transformers' logits for the fixture with exactly those settings.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_formats::{open_hf_dir, open_model, Family, Plan};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families")
}

fn tokens(name: &str) -> Vec<u32> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join(format!("{name}.json"))).unwrap())
            .unwrap();
    u32s(&meta["tokens"])
}

/// Every tensor of `got` equals the fixture's: bitwise, except Gemma's norms (`gemma_norms`), which
/// went through llama.cpp's `w + 1` in f32 and come back as `(w + 1) - 1` (within an ulp of `1 + w`).
fn assert_same_tensors(name: &str, got: &Plan, want: &Plan, gemma_norms: bool) {
    let names = |p: &Plan| p.tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{name}");
    let mut norms = 0;
    for t in want.tensors.keys() {
        let (gs, g) = got.load_f32(t).unwrap();
        let (ws, w) = want.load_f32(t).unwrap();
        assert_eq!(gs, ws, "{name} {t}");
        if gemma_norms && t.ends_with("norm.weight") {
            norms += 1;
            for (a, b) in g.iter().zip(&w) {
                assert!((a - b).abs() <= f32::EPSILON * (1.0 + b).abs(), "{t}");
            }
            assert_ne!(g, w.iter().map(|x| x + 1.0).collect::<Vec<_>>(), "{t}");
        } else {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g), bits(&w), "{name} {t} not bitwise equal");
        }
    }
    assert_eq!(norms > 0, gemma_norms, "{name}: Gemma norms checked");
}

#[test]
fn gemma_ggufs_import_to_the_fixture_tensors_and_llamacpps_model() {
    for (name, family, full) in [
        ("gemma2", Family::Gemma2, vec![false, true, false, true]),
        ("gemma3", Family::Gemma3, vec![false, false, false]),
    ] {
        let want = open_hf_dir(&fixtures().join(name)).unwrap();
        let path = fixtures().join(format!("{name}.gguf"));
        let got = open_model(path.to_str().unwrap()).unwrap();
        assert_eq!(got.arch.family, family, "{name}");
        assert_same_tensors(name, &got, &want, true);
        let a = &got.arch;
        let layer_full: Vec<bool> = a
            .layers
            .iter()
            .map(|l| l.attention.full_attention)
            .collect();
        assert_eq!(layer_full, full, "{name}: llama.cpp's layer pattern");
        for (l, w) in a.layers.iter().zip(&want.arch.layers) {
            let mut l = l.clone();
            l.attention.full_attention = w.attention.full_attention;
            assert_eq!(&l, w, "{name}");
        }
        let head_dim = a.layers[0].attention.head_dim as f64;
        assert_eq!(a.gemma.query_pre_attn_scalar, Some(head_dim), "{name}");
        let g = &want.arch.gemma;
        assert_eq!(a.gemma.attn_logit_softcapping, g.attn_logit_softcapping);
        assert_eq!(a.gemma.final_logit_softcapping, g.final_logit_softcapping);
        assert_eq!(a.gemma.rope_local_theta, g.rope_local_theta);
        assert_eq!(
            (a.rope_theta, &a.rope_scaling, a.sliding_window),
            (
                want.arch.rope_theta,
                &want.arch.rope_scaling,
                want.arch.sliding_window
            ),
            "{name}"
        );
        assert_eq!(
            (a.hidden_act.as_str(), a.tie_word_embeddings),
            (want.arch.hidden_act.as_str(), want.arch.tie_word_embeddings)
        );
        let golden = read_f32s(&fixtures().join(format!("{name}_gguf_logits.bin")));
        let d = max_diff(&logits(&got, &tokens(name)), &golden);
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
    }
}

/// Qwen3-MoE as llama.cpp stores it (`qwen3moe`: stacked `ffn_*_exps`, router `ffn_gate_inp`,
/// q/k rows not permuted; llama.cpp always renormalises the top-k weights, as the fixture does) and
/// Phi-3 (fused `attn_qkv` and gate/up `ffn_up`, split as its safetensors are): the fixture's
/// tensors bitwise, its architecture and transformers' logits.
#[test]
fn qwen3_moe_and_phi3_ggufs_import_to_the_fixtures() {
    for (name, family) in [("qwen3_moe", Family::Qwen3Moe), ("phi3", Family::Phi3)] {
        let want = open_hf_dir(&fixtures().join(name)).unwrap();
        let path = fixtures().join(format!("{name}.gguf"));
        let got = open_model(path.to_str().unwrap()).unwrap();
        assert_eq!(got.arch.family, family);
        assert_same_tensors(name, &got, &want, false);
        assert_eq!(got.arch.layers, want.arch.layers, "{name}");
        assert_eq!(got.arch.sliding_window, want.arch.sliding_window, "{name}");
        let golden = read_f32s(&fixtures().join(format!("{name}_logits.bin")));
        let d = max_diff(&logits(&got, &tokens(name)), &golden);
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
    }
}

/// `surgeon import-gguf` writes the Gemma 2, Qwen3-MoE and Phi-3 models as checkpoints of their
/// class that read back with the same logits (the writer materialises the norms' `- 1`, the
/// experts, and Phi-3's fused tensors).
#[test]
fn import_gguf_writes_checkpoints_with_the_same_logits() {
    for (name, family, golden) in [
        ("gemma2", Family::Gemma2, "gemma2_gguf_logits.bin"),
        ("qwen3_moe", Family::Qwen3Moe, "qwen3_moe_logits.bin"),
        ("phi3", Family::Phi3, "phi3_logits.bin"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        let gguf = fixtures().join(format!("{name}.gguf"));
        ok(&surgeon(&[
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], family.model_type(), "{name}");
        let back = open_hf_dir(&out).unwrap();
        assert_eq!(back.arch.family, family);
        let golden = read_f32s(&fixtures().join(golden));
        let d = max_diff(&logits(&back, &tokens(name)), &golden);
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
    }
}

/// A GGUF file is the input, not its folder: an import may write beside it (the bench scripts
/// import SmolLM2 into the cache folder that holds its GGUF), but never over it.
#[test]
fn import_gguf_writes_beside_its_file_and_never_over_it() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("phi3.gguf");
    std::fs::copy(fixtures().join("phi3.gguf"), &gguf).unwrap();
    let beside = tmp.path().join("phi3-hf");
    ok(&surgeon(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        beside.to_str().unwrap(),
    ]));
    assert!(beside.join("config.json").is_file());
    let before = std::fs::read(&gguf).unwrap();
    for out in [gguf.clone(), tmp.path().to_path_buf()] {
        let o = surgeon(&[
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert!(!o.status.success(), "{} was accepted", out.display());
    }
    assert_eq!(std::fs::read(&gguf).unwrap(), before);
}

/// A GGUF of an architecture surgeon does not import names it and lists those it does.
#[test]
fn an_unsupported_gguf_architecture_is_named_with_the_supported_ones() {
    let bytes = std::fs::read(fixtures().join("qwen3.gguf")).unwrap();
    // Every `qwen3` (the architecture and its key prefix) becomes the same-length `qwen9`.
    let mut renamed = bytes.clone();
    for i in 0..renamed.len().saturating_sub(5) {
        if &renamed[i..i + 5] == b"qwen3" {
            renamed[i + 4] = b'9';
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen9.gguf");
    std::fs::write(&path, renamed).unwrap();
    let out = tmp.path().join("out");
    fails(
        &surgeon(&[
            "import-gguf",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
        "unsupported architecture `qwen9` (supported: llama, qwen3, qwen3moe, phi3, gemma2, gemma3)",
        &out,
    );
}
