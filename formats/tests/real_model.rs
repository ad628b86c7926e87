//! The real model, SmolLM2-135M-Instruct, imported from its GGUF (run scripts/fetch-smollm2.sh once).
use sha2::{Digest, Sha256};
use surgeon_formats::gguf::smollm2_gguf_path;
use surgeon_formats::{open_hf_dir, open_model, write_model, DType, WriteOptions};

fn smollm2() -> surgeon_formats::Plan {
    let path = smollm2_gguf_path().unwrap_or_else(|e| panic!("{e}"));
    open_model(path.to_str().unwrap()).unwrap()
}

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

#[test]
fn smollm2_import_reports_the_published_shape() {
    let plan = smollm2();
    let s = surgeon_formats::inspect::summarize(&plan, false);
    assert_eq!(s.parameters, 134_515_008);
    assert_eq!(plan.arch.parameter_count(), 134_515_008);
    assert_eq!(s.num_layers, 30);
    assert_eq!(s.num_heads, 9);
    assert_eq!(s.num_kv_heads, 3);
    assert_eq!(s.hidden_size, 576);
    assert_eq!(s.intermediate_size, 1536);
    assert_eq!(s.vocab_size, 49152);
    assert!(s.tied_embeddings);
    assert_eq!(plan.arch.rope_theta, 100000.0);
    assert!(plan.files.contains_key("tokenizer.json"));
    assert!(plan.files.contains_key("tokenizer_config.json"));
}

#[test]
fn smollm2_q_and_k_are_in_hf_rotate_half_order() {
    // Goldens: transformers' own GGUF loader (scripts/goldens/rope_goldens.py).
    let plan = smollm2();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/gguf/smollm2_rope.json"
    ))
    .unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    for t in golden["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let (shape, values) = plan.load_f32(name).unwrap();
        assert_eq!(serde_json::json!(shape), t["shape"], "{name}");
        assert_eq!(sha256_f32(&values), t["sha256"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn smollm2_import_writes_a_loadable_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plan = smollm2();
    plan.set_dtype(DType::BF16);
    let out = tmp.path().join("smollm2");
    let report = write_model(&plan, &out, &WriteOptions::default()).unwrap();
    assert_eq!(report.parameters, 134_515_008);
    let again = open_hf_dir(&out).unwrap();
    assert_eq!(again.parameter_count(), 134_515_008);
    assert!(out.join("tokenizer.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    // Norms are stored as f32 in the GGUF: bf16 rounding of them is what the writer did.
    let (_, a) = plan.load_f32("model.norm.weight").unwrap();
    let (_, b) = again.load_f32("model.norm.weight").unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
}
