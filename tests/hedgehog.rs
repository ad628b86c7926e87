//! `surgeon convert-attention --to hedgehog`: the export (surgeon dialect, modeling code shipped)
//! against transformers running it with `trust_remote_code=True` (goldens by
//! scripts/goldens/hedgehog_goldens.py, no torch needed here), and the runtime on the real model
//! (SmolLM2): a window covering the sequence reproduces the original, generation with the
//! recurrent state reproduces the chunked forward.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::model::Llama;
use surgeon_formats::synthetic::{SyntheticSpec, Variant};
use surgeon_formats::{open_hf_dir, AttentionKind, Plan};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hedgehog")
}

fn surgeon(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .args(args)
        .output()
        .expect("run surgeon");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The golden case converted exactly as the script does it, read back from its export.
fn converted(case: &str, flags: &[String], tmp: &Path) -> Plan {
    let base = tmp.join("base");
    if !base.exists() {
        let spec = SyntheticSpec::hetero();
        let plan = spec.plan_of(spec.variant_arch(Variant::Uniform));
        spec.write_plan(&plan, &base, None).unwrap();
    }
    let out = tmp.join(case);
    let mut args = vec![
        "convert-attention",
        base.to_str().unwrap(),
        "--to",
        "hedgehog",
    ];
    args.extend(flags.iter().map(String::as_str));
    args.extend(["--out", out.to_str().unwrap()]);
    surgeon(&args);
    for code in ["modeling_surgeon.py", "configuration_surgeon.py"] {
        assert!(out.join(code).exists(), "{case}: {code} not shipped");
    }
    open_hf_dir(&out).unwrap()
}

#[test]
fn export_matches_transformers_remote_code() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["hybrid", "linear"] {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures().join(format!("{case}.json"))).unwrap(),
        )
        .unwrap();
        let want: Vec<f32> = std::fs::read(fixtures().join(format!("{case}_logits.bin")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let flags: Vec<String> = meta["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        let plan = converted(case, &flags, tmp.path());
        assert_eq!(meta["model_type"], "surgeon");
        let kinds: Vec<bool> = plan
            .arch
            .layers
            .iter()
            .map(|l| matches!(l.attention.kind, AttentionKind::Hedgehog { .. }))
            .collect();
        let want_kinds = match case {
            "hybrid" => vec![true, false, true, false],
            _ => vec![true; 4],
        };
        assert_eq!(kinds, want_kinds, "{case}");
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let logits = to_vec(model.forward(ids(&u32s(&meta["tokens"]))));
        let d = max_diff(&logits, &want);
        assert!(d < 1e-4, "{case}: logits differ from transformers' by {d}");
        eprintln!("{case}: max |logit - transformers'| = {d:e}");
        let prompt = u32s(&meta["prompt"]);
        let greedy = u32s(&meta["greedy"]);
        let opts = GenerateOptions {
            max_new_tokens: greedy.len(),
            ..Default::default()
        };
        let got = generate(&model, &prompt, &opts, &mut |_| true).tokens;
        assert_eq!(
            got, greedy,
            "{case}: greedy tokens with the recurrent state"
        );
    }
}

fn smollm2() -> Plan {
    surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"))
}

const TEXT: [u32; 12] = [1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253];

fn hedgehog(plan: &Plan, window: usize) -> Plan {
    let opts = surgeon_convert::HedgehogOptions {
        window,
        ..Default::default()
    };
    surgeon_convert::to_hedgehog(plan, &opts).unwrap()
}

#[test]
fn smollm2_window_over_the_sequence_is_the_original() {
    let plan = smollm2();
    let toks: Vec<u32> = TEXT.iter().cycle().take(40).copied().collect();
    let want = to_vec(
        Llama::<B>::from_plan(&plan, &Default::default())
            .unwrap()
            .forward(ids(&toks)),
    );
    let hh = hedgehog(&plan, 64);
    assert!(hh
        .arch
        .layers
        .iter()
        .all(|l| l.attention.kind != AttentionKind::Softmax));
    let model = Llama::<B>::from_plan(&hh, &Default::default()).unwrap();
    let got = to_vec(model.forward(ids(&toks)));
    let d = max_diff(&want, &got);
    eprintln!("window 64 over 40 tokens: max |logit diff| {d:e}");
    assert!(d <= 1e-4, "max |logit diff| {d}");
}

#[test]
fn smollm2_recurrent_generation_equals_the_forward() {
    let hh = hedgehog(&smollm2(), 8);
    let model = Llama::<B>::from_plan(&hh, &Default::default()).unwrap();
    let toks: Vec<u32> = TEXT.iter().cycle().take(30).copied().collect();
    let full = to_vec(model.forward(ids(&toks)));
    let mut cache = model.new_cache();
    let mut stepped = to_vec(model.forward_cached(ids(&toks[..10]), &mut cache));
    for i in 10..toks.len() {
        stepped.extend(to_vec(
            model.forward_cached(ids(&toks[i..i + 1]), &mut cache),
        ));
    }
    let d = max_diff(&full, &stepped);
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!(
        "window 8, 30 tokens: max |logit diff| recurrent vs chunked {d:e} (max |logit| {scale})"
    );
    // 30 layers of float32 rounding in a different order (state sums vs one block): relative to the
    // logits' size. The tiny model's test (distill) holds the same at 1e-4 absolute.
    assert!(
        d <= 1e-4 * scale,
        "max |logit diff| {d}, max |logit| {scale}"
    );
}

/// LoLCATs' stage 2 through LoRA (issue 17): adapters on q/k/v/o of converted layers train and
/// merge into those projections, and the healed model still exports through the surgeon
/// remote-code class, feature maps and MLPs untouched.
#[test]
fn lora_heals_converted_layers_and_exports_through_remote_code() {
    use surgeon_distill::heal::{heal, Budget, DataSpec, HealConfig};
    let tmp = tempfile::tempdir().unwrap();
    let plan = hedgehog(&SyntheticSpec::tiny().plan(), 4);
    let docs: Vec<Vec<u32>> = (0..16u32)
        .map(|i| (0..40u32).map(|j| 3 + (i * 31 + j * 7) % 250).collect())
        .collect();
    let out = tmp.path().join("stage2");
    let cfg = HealConfig {
        data: DataSpec::Tokens(docs),
        out: out.clone(),
        train: "lora:r=4,alpha=8,targets=q+k+v+o".parse().unwrap(),
        budget: Budget::Steps(3),
        seq_len: 16,
        batch: 2,
        lr: 1e-2,
        ..Default::default()
    };
    let report = heal(&cfg, plan.clone(), None).unwrap();
    assert_eq!(report.trainable_tensors.len(), 2 * 4);
    assert!(out.join("modeling_surgeon.py").exists());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_ne!(config["architectures"][0], "LlamaForCausalLM", "{config}");
    let healed = open_hf_dir(&out).unwrap();
    assert!(healed
        .arch
        .layers
        .iter()
        .all(|l| matches!(l.attention.kind, AttentionKind::Hedgehog { .. })));
    assert_eq!(healed.tensors.len(), plan.tensors.len());
    for name in plan.tensors.keys() {
        let same = healed.load_f32(name).unwrap() == plan.load_f32(name).unwrap();
        let adapted = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .any(|p| name.contains(&format!(".{p}.")));
        assert_eq!(!same, adapted, "{name}");
    }
}
