//! Reading and writing Hugging Face checkpoints: round trips, re-sharding, dtype conversion and
//! every kind of bad input, each with an error that names the file and the tensor or field.
use std::path::Path;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::writer::WriteOptions;
use surgeon_formats::{open_hf_dir, open_model, write_model, DType, Plan};

fn tiny(dir: &Path, dtype: DType) -> Plan {
    let spec = SyntheticSpec {
        dtype,
        ..SyntheticSpec::tiny()
    };
    spec.write(dir, None).unwrap();
    open_hf_dir(dir).unwrap()
}

fn bytes_of(plan: &Plan, name: &str) -> Vec<u8> {
    plan.tensors[name].materialize().unwrap().data
}

fn opts() -> WriteOptions {
    WriteOptions::default()
}

#[test]
fn write_then_read_is_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::tiny();
    let generated = spec.plan();
    let plan = tiny(&tmp.path().join("m"), DType::F32);
    assert_eq!(plan.tensors.len(), generated.tensors.len());
    for name in generated.tensors.keys() {
        assert_eq!(bytes_of(&plan, name), bytes_of(&generated, name), "{name}");
    }
    assert_eq!(plan.arch, {
        let mut a = generated.arch.clone();
        a.torch_dtype = Some(DType::F32);
        a
    });
}

#[test]
fn resharding_keeps_every_tensor_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tiny(&tmp.path().join("m"), DType::BF16);
    let out = tmp.path().join("sharded");
    let report = write_model(
        &plan,
        &out,
        &WriteOptions {
            shard_size: 40_000,
            ..opts()
        },
    )
    .unwrap();
    assert!(report.shards.len() > 2, "{:?}", report.shards);
    assert_eq!(
        report.bytes_copied, report.bytes,
        "unchanged bytes are copied"
    );
    assert!(out.join("model.safetensors.index.json").is_file());
    let again = open_hf_dir(&out).unwrap();
    for name in plan.tensors.keys() {
        assert_eq!(bytes_of(&again, name), bytes_of(&plan, name), "{name}");
    }
    // And back into one file.
    let one = tmp.path().join("one");
    write_model(&again, &one, &opts()).unwrap();
    let again = open_hf_dir(&one).unwrap();
    for name in plan.tensors.keys() {
        assert_eq!(bytes_of(&again, name), bytes_of(&plan, name), "{name}");
    }
}

#[test]
fn f32_to_bf16_to_f32_keeps_bf16_values_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    // Values generated in bf16 are bf16-representable; store them as f32 first.
    let bf = tiny(&tmp.path().join("bf16"), DType::BF16);
    let mut as_f32 = bf.clone();
    as_f32.set_dtype(DType::F32);
    write_model(&as_f32, &tmp.path().join("f32"), &opts()).unwrap();
    let f32_model = open_hf_dir(&tmp.path().join("f32")).unwrap();
    let mut down = f32_model.clone();
    down.set_dtype(DType::BF16);
    write_model(&down, &tmp.path().join("bf16b"), &opts()).unwrap();
    let mut up = open_hf_dir(&tmp.path().join("bf16b")).unwrap();
    up.set_dtype(DType::F32);
    write_model(&up, &tmp.path().join("f32b"), &opts()).unwrap();
    let back = open_hf_dir(&tmp.path().join("f32b")).unwrap();
    for name in bf.tensors.keys() {
        assert_eq!(bytes_of(&back, name), bytes_of(&f32_model, name), "{name}");
    }
    let cfg = std::fs::read_to_string(tmp.path().join("bf16b/config.json")).unwrap();
    assert!(cfg.contains("\"torch_dtype\": \"bfloat16\""));
}

#[test]
fn carries_tokenizer_files_and_writes_card_and_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    tiny(&src, DType::F32);
    std::fs::write(src.join("tokenizer.json"), "{\"x\":1}").unwrap();
    std::fs::write(src.join("generation_config.json"), "{\"eos_token_id\":2}").unwrap();
    let plan = open_hf_dir(&src).unwrap();
    let out = tmp.path().join("out");
    write_model(
        &plan,
        &out,
        &WriteOptions {
            description: "surgeon convert m".into(),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        "{\"x\":1}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
        "{\"eos_token_id\":2}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("surgeon convert m"), "{card}");
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let header = surgeon_formats::safetensors_file::parse_header(Path::new("x"), &st).unwrap();
    assert!(header.metadata["surgeon"].contains("surgeon convert m"));
    assert_eq!(header.metadata["format"], "pt");
}

// ---- bad input -------------------------------------------------------------------------------

fn model_dir(tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("m");
    tiny(&dir, DType::F32);
    dir
}

fn open_err(dir: &Path) -> String {
    match open_model(dir.to_str().unwrap()) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the safetensors header of `dir/model.safetensors` with `edit`.
fn edit_header(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("model.safetensors: tensor `"), "{e}");
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn header_length_beyond_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("model.safetensors: header length"), "{e}");
}

#[test]
fn header_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("model.safetensors: header is not JSON"), "{e}");
}

#[test]
fn overlapping_and_out_of_range_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    edit_header(&dir, |h| {
        let a = h["model.norm.weight"]["data_offsets"].clone();
        let b = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        // Point one norm at the other's bytes.
        h["model.norm.weight"]["data_offsets"] = b;
        let _ = a;
    });
    let e = open_err(&dir);
    assert!(e.contains("overlaps"), "{e}");

    let dir2 = tmp.path().join("m2");
    tiny(&dir2, DType::F32);
    edit_header(&dir2, |h| {
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([u64::MAX - 8, u64::MAX]);
    });
    let e = open_err(&dir2);
    assert!(
        e.contains("tensor `model.norm.weight`: data offsets"),
        "{e}"
    );
}

#[test]
fn tensor_in_index_missing_from_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tiny(&tmp.path().join("m"), DType::F32);
    let out = tmp.path().join("sharded");
    write_model(
        &plan,
        &out,
        &WriteOptions {
            shard_size: 50_000,
            ..opts()
        },
    )
    .unwrap();
    let index_path = out.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let first_shard = index["weight_map"]["model.norm.weight"].clone();
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_shard;
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = open_err(&out);
    assert!(
        e.contains("tensor `model.layers.9.mlp.up_proj.weight`: named in model.safetensors.index.json but missing from its shard"),
        "{e}"
    );
}

#[test]
fn shape_disagreeing_with_config_lists_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("checkpoint does not match config.json (6 problems)"),
        "{e}"
    );
    assert!(
        e.contains("tensor `model.layers.1.mlp.down_proj.weight` has shape [64, 128] but the config implies [64, 96]"),
        "{e}"
    );
}

#[test]
fn unknown_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    edit_header(&dir, |h| {
        h["model.norm.weight"]["dtype"] = serde_json::json!("F8_E4M3");
        h["model.norm.weight"]["shape"] = serde_json::json!([256]);
    });
    let e = open_err(&dir);
    assert!(
        e.contains("tensor `model.norm.weight`: unsupported dtype F8_E4M3"),
        "{e}"
    );
}

#[test]
fn missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = open_err(&dir);
    assert!(e.ends_with("missing config.json"), "{e}");
}

#[test]
fn existing_output_and_output_inside_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let plan = open_hf_dir(&dir).unwrap();
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let e = write_model(&plan, &out, &opts()).unwrap_err().to_string();
    assert!(e.contains("already exists (use `force`"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );

    let inside = dir.join("sub");
    let e = write_model(&plan, &inside, &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("is inside the input"), "{e}");
    assert!(!inside.exists());

    // --force never replaces a folder surgeon did not write (issue 21)...
    let force = WriteOptions {
        force: true,
        ..opts()
    };
    let e = write_model(&plan, &out, &force).unwrap_err().to_string();
    assert!(e.contains("was not written by surgeon"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    // ...but replaces surgeon's own output wholesale.
    let ours = tmp.path().join("ours");
    write_model(&plan, &ours, &opts()).unwrap();
    std::fs::write(ours.join("extra.txt"), "old").unwrap();
    write_model(&plan, &ours, &force).unwrap();
    assert!(!ours.join("extra.txt").exists());
    assert!(ours.join("model.safetensors").is_file());
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("surgeon-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn hub_id_resolves_from_cache_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = cache.join("models--org--tiny/snapshots").join(sha);
    std::fs::create_dir_all(cache.join("models--org--tiny/refs")).unwrap();
    std::fs::write(cache.join("models--org--tiny/refs/main"), sha).unwrap();
    SyntheticSpec::tiny().write(&snap, None).unwrap();
    let found = surgeon_formats::hub::resolve_in_cache(&cache, "org/tiny").unwrap();
    let plan = open_hf_dir(&found).unwrap();
    assert_eq!(plan.arch.num_layers(), 2);
}

#[test]
fn plan_rendering_snapshot() {
    let plan = SyntheticSpec::tiny().plan();
    insta::assert_snapshot!(plan.render());
}

#[test]
fn inspect_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tiny(&tmp.path().join("m"), DType::BF16);
    let mut s = surgeon_formats::inspect::summarize(&plan, true);
    s.source = "tiny".into();
    insta::assert_snapshot!(s.to_text());
    let json = serde_json::to_value(&s).unwrap();
    for key in [
        "model_type",
        "num_layers",
        "hidden_size",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "vocab_size",
        "tied_embeddings",
        "parameters",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    assert_eq!(json["parameters"], plan.arch.parameter_count());
}
