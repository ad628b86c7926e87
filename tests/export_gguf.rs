//! `surgeon export-gguf`: re-import equals the source (bitwise for f32/f16/bf16, within the
//! quantisation's step otherwise), the files match what the PyPI `gguf` reader read from them
//! (tests/fixtures/gguf/export_tiny.json, scripts/goldens/gguf_export_goldens.py), outputs are never
//! overwritten without --force and never when they are an input, and SmolLM2 exports with its
//! tokenizer, pre-tokenizer name, merges and chat template intact.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use surgeon_formats::gguf::{GgmlType, GgufFile};
use surgeon_formats::{open_model, Plan};

fn surgeon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .env("RAYON_NUM_THREADS", "2")
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

/// The synthetic tiny model in `dtype` with the test tokenizer.
fn tiny(dir: &Path, dtype: &str) -> PathBuf {
    let m = dir.join(format!("tiny-{dtype}"));
    if !m.exists() {
        ok(surgeon(&[
            "synth",
            "--preset",
            "tiny",
            "--dtype",
            dtype,
            "--out",
            m.to_str().unwrap(),
        ]));
        for (from, to) in [
            ("tiny_tokenizer.json", "tokenizer.json"),
            ("tiny_tokenizer_config.json", "tokenizer_config.json"),
        ] {
            std::fs::copy(fixtures().join(from), m.join(to)).unwrap();
        }
    }
    m
}

fn export(model: &Path, ty: &str, out: &Path) {
    ok(surgeon(&[
        "export-gguf",
        model.to_str().unwrap(),
        "--type",
        ty,
        "--name",
        "tiny",
        "--out",
        out.to_str().unwrap(),
    ]));
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every tensor of `back` against `src`: bitwise, or within `tol(block_amax)` per 32-value block.
fn compare(src: &Plan, back: &Plan, tol: Option<f32>) {
    assert_eq!(src.arch.layers, back.arch.layers);
    assert_eq!(src.tensors.len(), back.tensors.len());
    for name in src.tensors.keys() {
        let (s1, a) = src.load_f32(name).unwrap();
        let (s2, b) = back.load_f32(name).unwrap();
        assert_eq!(s1, s2, "{name}");
        match tol {
            None => assert!(bits(&a) == bits(&b), "{name} differs"),
            Some(_) if s1.len() == 1 => assert!(bits(&a) == bits(&b), "{name} (f32 norm)"),
            Some(t) => {
                for (i, (x, y)) in a.chunks(32).zip(b.chunks(32)).enumerate() {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let lo = x.iter().fold(f32::MAX, |m, &v| m.min(v));
                    let hi = x.iter().fold(f32::MIN, |m, &v| m.max(v));
                    // Half a step, plus the f16 rounding of the block scale (2^-11 relative) times
                    // the largest code.
                    let step = (2.0 * amax).max(hi - lo) * t + amax / 1024.0 + 1e-7;
                    for (p, q) in x.iter().zip(y) {
                        assert!((p - q).abs() <= step, "{name} block {i}: {p} vs {q}");
                    }
                }
            }
        }
    }
}

#[test]
fn float_types_reimport_bitwise() {
    let d = tempfile::tempdir().unwrap();
    for ty in ["f32", "f16", "bf16"] {
        let m = tiny(d.path(), ty);
        let out = d.path().join(format!("tiny.{ty}.gguf"));
        export(&m, ty, &out);
        let src = open_model(m.to_str().unwrap()).unwrap();
        let back = open_model(out.to_str().unwrap()).unwrap();
        compare(&src, &back, None);
        // Matrices are stored in the chosen type, norms in F32.
        let g = GgufFile::open(&out).unwrap();
        let want = match ty {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            _ => GgmlType::BF16,
        };
        assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().ggml_type, want);
        assert_eq!(
            g.tensor("blk.0.attn_norm.weight").unwrap().ggml_type,
            GgmlType::F32
        );
    }
}

#[test]
fn quantised_types_reimport_within_a_step() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), "f32");
    let src = open_model(m.to_str().unwrap()).unwrap();
    // Half a quantisation step of the block range, plus the f16 scale rounding (in compare).
    // Q4_0 maps the block's largest magnitude to -8, so the other sign reaches only 7/8 of it:
    // up to one full step (amax / 8) there.
    for (ty, levels) in [("q8_0", 254.0), ("q4_0", 8.0), ("q4_1", 15.0)] {
        let out = d.path().join(format!("tiny.{ty}.gguf"));
        export(&m, ty, &out);
        let back = open_model(out.to_str().unwrap()).unwrap();
        compare(&src, &back, Some(0.5 / levels));
    }
}

/// A synthetic model whose rows are whole 256-value super-blocks, with the test tokenizer.
fn k_quant_model(dir: &Path) -> PathBuf {
    let m = dir.join("k-model");
    surgeon_formats::synthetic::SyntheticSpec {
        hidden_size: 256,
        num_layers: 8,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 512,
        ..surgeon_formats::synthetic::SyntheticSpec::tiny()
    }
    .write(&m, None)
    .unwrap();
    for (from, to) in [
        ("tiny_tokenizer.json", "tokenizer.json"),
        ("tiny_tokenizer_config.json", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixtures().join(from), m.join(to)).unwrap();
    }
    m
}

#[test]
fn k_quant_mixes_follow_llama_cpp_and_reimport_close() {
    let d = tempfile::tempdir().unwrap();
    let m = k_quant_model(d.path());
    let src = open_model(m.to_str().unwrap()).unwrap();
    for (ty, base, frac) in [
        ("q4_k_m", GgmlType::Q4_K, 1.0 / 10.0),
        ("q5_k_m", GgmlType::Q5_K, 1.0 / 20.0),
        ("q6_k", GgmlType::Q6_K, 1.0 / 40.0),
    ] {
        let out = d.path().join(format!("k.{ty}.gguf"));
        export(&m, ty, &out);
        let g = GgufFile::open(&out).unwrap();
        let ty_of = |n: &str| g.tensor(n).unwrap().ggml_type;
        let mix = ty != "q6_k";
        // 8 layers: llama.cpp's use_more_bits picks layers 0 (first eighth), 7 (last eighth), 3
        // and 6 (every third in between) for Q6_K value and down projections.
        for l in 0..8 {
            let more = mix && [0, 3, 6, 7].contains(&l);
            let want = if more { GgmlType::Q6_K } else { base };
            assert_eq!(
                ty_of(&format!("blk.{l}.attn_v.weight")),
                want,
                "{ty} layer {l}"
            );
            assert_eq!(
                ty_of(&format!("blk.{l}.ffn_down.weight")),
                want,
                "{ty} layer {l}"
            );
            assert_eq!(
                ty_of(&format!("blk.{l}.attn_q.weight")),
                base,
                "{ty} layer {l}"
            );
            assert_eq!(ty_of(&format!("blk.{l}.attn_norm.weight")), GgmlType::F32);
        }
        let out_ty = if mix { GgmlType::Q6_K } else { base };
        assert_eq!(ty_of("output.weight"), out_ty, "{ty}");
        assert_eq!(ty_of("token_embd.weight"), base, "{ty}");
        // Re-import: every 256-value super-block within a fraction of its range.
        let back = open_model(out.to_str().unwrap()).unwrap();
        for name in src.tensors.keys() {
            let (_, a) = src.load_f32(name).unwrap();
            let (_, b) = back.load_f32(name).unwrap();
            for (x, y) in a.chunks(256).zip(b.chunks(256)) {
                let lo = x.iter().fold(f32::MAX, |m, &v| m.min(v));
                let hi = x.iter().fold(f32::MIN, |m, &v| m.max(v));
                let worst = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= (hi - lo) * frac + 1e-6, "{ty} {name}: {worst}");
            }
        }
    }
    // Rows of 64 values are not whole super-blocks: Q4_K falls back to Q5_0 as in llama.cpp.
    let tiny = tiny(d.path(), "f32");
    let out = d.path().join("tiny.q4_k.gguf");
    export(&tiny, "q4_k", &out);
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q5_0
    );
}

/// What llama.cpp's Python reader (`gguf` 0.19) read from these exports, recorded by
/// scripts/goldens/gguf_export_goldens.py: the same bytes now, and surgeon reads the same values.
#[test]
fn files_match_the_gguf_py_golden() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("export_tiny.json")).unwrap(),
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let files = golden["files"].as_object().unwrap();
    assert_eq!(files.len(), 6);
    for (ty, want) in files {
        let m = tiny(d.path(), want["source_dtype"].as_str().unwrap());
        let out = d.path().join(format!("tiny.{ty}.gguf"));
        export(&m, ty, &out);
        let bytes = std::fs::read(&out).unwrap();
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, want["sha256"], "{ty}: the file changed");
        let g = GgufFile::open(&out).unwrap();
        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(g.tensors().len(), tensors.len(), "{ty}");
        for t in g.tensors() {
            let w = &tensors[&t.name];
            assert_eq!(
                format!("{:?}", t.ggml_type),
                w["type"].as_str().unwrap(),
                "{ty} {}",
                t.name
            );
            let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
            assert_eq!(t.hf_shape(), shape);
            let v = g.dequantize_tensor(t).unwrap();
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let sumsq: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            assert!(close(sum, w["sum"].as_f64().unwrap()), "{ty} {}", t.name);
            assert!(
                close(sumsq, w["sumsq"].as_f64().unwrap()),
                "{ty} {}",
                t.name
            );
            for (i, f) in w["first"].as_array().unwrap().iter().enumerate() {
                assert_eq!(v[i], f.as_f64().unwrap() as f32, "{ty} {}", t.name);
            }
        }
        let meta = &want["metadata"];
        assert_eq!(meta["general.architecture"], "llama");
        assert_eq!(meta["tokenizer.ggml.pre"], "smollm");
        assert_eq!(meta["tokenizer.ggml.tokens.len"], 256);
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
        assert_eq!(
            g.get_str("tokenizer.chat_template").unwrap(),
            meta["tokenizer.chat_template"].as_str()
        );
    }
}

#[test]
fn never_overwrites_without_force_nor_an_input() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), "f16");
    let out = d.path().join("tiny.gguf");
    export(&m, "f16", &out);
    let before = std::fs::read(&out).unwrap();
    let o = surgeon(&[
        "export-gguf",
        m.to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("already exists (use --force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // Its own input, even with --force.
    let o = surgeon(&[
        "export-gguf",
        out.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("is an input of this export"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // With --force, replaced; no temporary file is left beside it.
    ok(surgeon(&[
        "export-gguf",
        m.to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]));
    assert_ne!(std::fs::read(&out).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("surgeon-tmp")),
        "{names:?}"
    );
    // A directory is not a file name; an unknown type names the supported ones.
    let o = surgeon(&[
        "export-gguf",
        m.to_str().unwrap(),
        "--out",
        d.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a directory"));
    let o = surgeon(&[
        "export-gguf",
        m.to_str().unwrap(),
        "--type",
        "q2_k",
        "--out",
        d.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("supported: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k"),
        "{e}"
    );
    assert!(!d.path().join("x.gguf").exists());
}

/// The real model: SmolLM2 (Q4_1 GGUF) -> surgeon plan (f32) -> Q8_0 GGUF. The tokenizer metadata
/// equals the original file's, and the q/k matrices are back in llama.cpp's row order (compared with
/// the original file's own tensors, in its order, within Q8_0's step plus Q4_1's).
#[test]
fn smollm2_exports_with_its_tokenizer_and_rope_order() {
    let src_path = surgeon_formats::gguf::smollm2_gguf_path().unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("smollm2.q8_0.gguf");
    ok(surgeon(&[
        "export-gguf",
        src_path.to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]));
    let a = GgufFile::open(&src_path).unwrap();
    let b = GgufFile::open(&out).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
    ] {
        let (x, y) = (a.get(key), b.get(key));
        assert!(x.is_some(), "{key} missing in the source");
        match (x.unwrap().as_f64(), y.and_then(|v| v.as_f64())) {
            (Some(p), Some(q)) => assert_eq!(p, q, "{key}"),
            _ => assert_eq!(x, y, "{key}"),
        }
    }
    assert_eq!(b.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    for name in [
        "blk.0.attn_q.weight",
        "blk.29.attn_k.weight",
        "blk.5.ffn_down.weight",
    ] {
        let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(tb.ggml_type, GgmlType::Q8_0);
        assert_eq!(ta.dims, tb.dims);
        let (x, y) = (
            a.dequantize_tensor(ta).unwrap(),
            b.dequantize_tensor(tb).unwrap(),
        );
        // Q8_0 of the dequantised Q4_1 values: within half a Q8_0 step of each block.
        for (i, (p, q)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = p.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (u, v) in p.iter().zip(q) {
                assert!(
                    (u - v).abs() <= amax / 254.0 + amax / 1024.0 + 1e-7,
                    "{name} block {i}"
                );
            }
        }
    }
    // Re-import: the same architecture and tokenizer as the source plan.
    let src = open_model(src_path.to_str().unwrap()).unwrap();
    let back = open_model(out.to_str().unwrap()).unwrap();
    assert_eq!(src.arch.layers, back.arch.layers);
    assert_eq!(
        src.files["tokenizer.json"].read().unwrap(),
        back.files["tokenizer.json"].read().unwrap()
    );
}
