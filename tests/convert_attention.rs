//! `surgeon convert-attention` on the real model (SmolLM2: 9 query heads over 3 key/value heads):
//! to multi-head attention the function is unchanged; to one key/value head (MQA) it changes, and
//! healing by distillation from the original runs on the result.
mod common;

use common::*;
use std::path::Path;
use std::process::Output;

const PROMPT: [u32; 12] = [1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253];

/// Logits of `plan` over the prompt.
fn logits(plan: &surgeon_formats::Plan) -> Vec<f32> {
    common::logits(plan, &PROMPT)
}

fn ok(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    e
}

#[test]
fn smollm2_to_mha_keeps_logits_and_mqa_heals() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let want = logits(&plan);

    let mha = surgeon_convert::regroup_kv_heads(&plan, 9).unwrap();
    assert!(mha
        .arch
        .layers
        .iter()
        .all(|l| l.attention.num_kv_heads == 9));
    let got = logits(&mha);
    let diff = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "max |logit diff| {diff}");

    let mqa = surgeon_convert::regroup_kv_heads(&plan, 1).unwrap();
    // The KV cache shrinks by G/H: 30 layers x 3 kv heads x (64 + 64) x 2 bytes, then 1 head.
    assert_eq!(2 * plan.arch.kv_cache_values_per_token(), 23_040);
    assert_eq!(2 * mha.arch.kv_cache_values_per_token(), 3 * 23_040);
    assert_eq!(2 * mqa.arch.kv_cache_values_per_token(), 23_040 / 3);
    let changed = logits(&mqa);
    assert!(want.iter().zip(&changed).any(|(a, b)| a != b));

    // End to end: the CLI writes the MQA model as a standard Llama, and KD healing runs on it.
    let dir = tempfile::tempdir().unwrap();
    let gguf = surgeon_formats::gguf::smollm2_gguf_path().unwrap();
    let gguf = gguf.to_str().unwrap();
    let out = dir.path().join("mqa");
    let out_s = out.to_str().unwrap();
    ok(&surgeon(&[
        "convert-attention",
        gguf,
        "--to",
        "gqa",
        "--kv-heads",
        "1",
        "--out",
        out_s,
    ]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    let text = dir.path().join("train.txt");
    std::fs::write(&text, TEXT.repeat(8)).unwrap();
    let healed = dir.path().join("healed");
    ok(&surgeon(&[
        "heal",
        out_s,
        "--teacher",
        gguf,
        "--data",
        text.to_str().unwrap(),
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch",
        "1",
        "--out",
        healed.to_str().unwrap(),
    ]));
    let metrics = std::fs::read_to_string(healed.join("metrics.csv")).unwrap();
    assert!(metrics.lines().count() >= 3, "{metrics}");
    assert!(Path::new(&healed.join("config.json")).exists());

    // A count that does not divide the 9 query heads names the choices.
    let e = surgeon(&[
        "convert-attention",
        gguf,
        "--to",
        "gqa",
        "--kv-heads",
        "2",
        "--out",
        dir.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    let e = String::from_utf8_lossy(&e.stderr);
    assert!(
        e.contains("--kv-heads 2 must divide the 9 query heads") && e.contains("1, 3, 9"),
        "{e}"
    );
    assert!(!dir.path().join("bad").exists());
}

const TEXT: &str = "The interpreter reads a statement, compiles it to bytecode and runs it. \
Names are bound in namespaces; a function call creates a new local namespace. Modules are \
objects too, and importing one runs its code once. Exceptions unwind the stack until a handler \
matches their class. ";
