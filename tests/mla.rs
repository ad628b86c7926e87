//! DeepSeek-V3 multi-head latent attention: the runtime against transformers'
//! `DeepseekV3ForCausalLM` on small random checkpoints (goldens by scripts/goldens/mla_goldens.py,
//! no torch needed here), generation with the compressed cache against the parallel forward, and
//! `convert-attention --to mla`: exact at full rank, its export loaded by transformers, bad requests
//! refused.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_convert::mla::{full_kv_rank, LatentNorm, MlaOptions, RopeSelect};
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::model::Llama;
use surgeon_distill::probe;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, AttentionKind, Family, Plan};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mla")
}

fn meta(case: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join(format!("{case}.json"))).unwrap())
        .unwrap()
}

#[test]
fn runtime_matches_transformers_deepseek_v3() {
    for (case, q_lora) in [("full_q", None), ("lora_q", Some(10))] {
        let plan = open_hf_dir(&fixtures().join(case)).unwrap();
        for l in &plan.arch.layers {
            let want = AttentionKind::Mla {
                kv_lora_rank: 12,
                q_lora_rank: q_lora,
                qk_rope_head_dim: 4,
            };
            assert_eq!(l.attention.kind, want, "{case}");
            assert_eq!((l.attention.head_dim, l.attention.v_head_dim), (12, 6));
        }
        // Per layer: the latent and the rotary key.
        assert_eq!(plan.arch.kv_cache_values_per_token(), 2 * (12 + 4));
        let m = meta(case);
        let want = read_f32s(&fixtures().join(format!("{case}_logits.bin")));
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let got = to_vec(model.forward(ids(&u32s(&m["tokens"]))));
        let d = max_diff(&got, &want);
        eprintln!("{case}: max |logit - transformers'| = {d:e}");
        assert!(d < 1e-4, "{case}: logits differ from transformers' by {d}");
        let greedy = u32s(&m["greedy"]);
        let opts = GenerateOptions {
            max_new_tokens: greedy.len(),
            ..Default::default()
        };
        let got = generate(&model, &u32s(&m["prompt"]), &opts, &mut |_| true).tokens;
        assert_eq!(got, greedy, "{case}: greedy tokens with the latent cache");
    }
}

#[test]
fn latent_cache_generation_equals_the_parallel_forward() {
    let plan = open_hf_dir(&fixtures().join("lora_q")).unwrap();
    let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
    let toks = u32s(&meta("lora_q")["tokens"]);
    let full = to_vec(model.forward(ids(&toks)));
    let mut cache = model.new_cache();
    let mut stepped = to_vec(model.forward_cached(ids(&toks[..6]), &mut cache));
    for i in 6..toks.len() {
        stepped.extend(to_vec(
            model.forward_cached(ids(&toks[i..i + 1]), &mut cache),
        ));
    }
    let d = max_diff(&full, &stepped);
    assert!(d < 1e-4, "cached steps differ from the forward by {d}");
    // The cache holds the latent and the rotary key per token and layer, nothing more.
    assert_eq!(cache.numel(), toks.len() * 2 * (12 + 4));
}

/// Attention inputs of `plan` on `tokens` (two windows), token by token.
fn stats(plan: &Plan, tokens: &[u32]) -> Vec<Vec<f32>> {
    let model = Llama::<B>::from_plan(plan, &Default::default()).unwrap();
    let windows: Vec<&[u32]> = tokens.chunks(tokens.len().div_ceil(2)).collect();
    probe::attention_inputs(&model, &windows).unwrap()
}

fn calibration_tokens() -> Vec<u32> {
    (0..96u32).map(|i| (i * 37 + 11) % 256).collect()
}

#[test]
fn full_rank_with_every_rotary_pair_is_exact_in_the_runtime() {
    // One key/value head: the shared rotary key is the original key.
    let base = surgeon_convert::regroup_kv_heads(&SyntheticSpec::tiny().plan(), 1).unwrap();
    let st = stats(&base, &calibration_tokens());
    let a = base.arch.layers[0].attention.clone();
    let toks = u32s(&meta("full_q")["tokens"]);
    let want = logits(&base, &toks);
    for q_rank in [None, Some(64)] {
        let opts = MlaOptions {
            kv_rank: full_kv_rank(&a, a.head_dim),
            rope_dim: a.head_dim,
            q_rank,
            rope_select: RopeSelect::TwoNorm,
            latent_norm: LatentNorm::Linear,
        };
        let out = surgeon_convert::to_mla(&base, &opts, &st).unwrap();
        assert_eq!(out.arch.family, Family::DeepseekV3);
        assert_eq!(out.arch.rope_theta, base.arch.rope_theta);
        let d = max_diff(&logits(&out, &toks), &want);
        eprintln!("q rank {q_rank:?}: max |logit - original| = {d:e}");
        assert!(d < 1e-4, "q rank {q_rank:?}: full-rank MLA differs by {d}");
    }
    // The fitted latent norm and a lower rank are approximations, not identities.
    let opts = MlaOptions {
        kv_rank: 8,
        rope_dim: 8,
        q_rank: None,
        rope_select: RopeSelect::High,
        latent_norm: LatentNorm::Fit,
    };
    let out = surgeon_convert::to_mla(&base, &opts, &st).unwrap();
    assert_eq!(out.arch.kv_cache_values_per_token(), 2 * (8 + 8));
    let d = max_diff(&logits(&out, &toks), &want);
    assert!(
        d > 1e-3 && d.is_finite(),
        "rank 8 of 16 with half RoPE: {d}"
    );
}

#[test]
fn export_matches_transformers_deepseek_v3() {
    let dir = fixtures().join("converted");
    let m = meta("converted");
    let plan = open_hf_dir(&dir).unwrap();
    assert_eq!(plan.arch.family, Family::DeepseekV3);
    let want = read_f32s(&fixtures().join("converted_logits.bin"));
    let d = max_diff(&logits(&plan, &u32s(&m["tokens"])), &want);
    eprintln!("converted: max |logit - transformers'| = {d:e}");
    assert!(
        d < 1e-4,
        "converted export: logits differ from transformers' by {d}"
    );
    // The committed export is what the converter makes today.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&surgeon(&[
        "synth",
        "--preset",
        "tiny",
        "--out",
        base.to_str().unwrap(),
    ]));
    std::fs::copy(dir.join("tokenizer.json"), base.join("tokenizer.json")).unwrap();
    let again = tmp.path().join("again");
    let calib = fixtures().join("calib.txt");
    let mut args = vec!["convert-attention", base.to_str().unwrap(), "--to", "mla"];
    let flags: Vec<String> = m["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    args.extend(flags.iter().map(String::as_str));
    args.extend([
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    ok(&surgeon(&args));
    let again = open_hf_dir(&again).unwrap();
    assert_eq!(again.arch, plan.arch);
    let d = max_diff(&logits(&again, &u32s(&m["tokens"])), &want);
    assert!(d < 1e-4, "reconverted: {d}");
}

#[test]
fn bad_mla_requests_are_refused_writing_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&surgeon(&[
        "synth",
        "--preset",
        "tiny",
        "--out",
        base.to_str().unwrap(),
    ]));
    let qwen = tmp.path().join("qwen");
    let spec = SyntheticSpec {
        family: Family::Qwen2,
        ..SyntheticSpec::tiny()
    };
    spec.write(&qwen, None).unwrap();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, "some text").unwrap();
    let out = tmp.path().join("out");
    for (model, flags, want) in [
        (
            &base,
            ["--kv-rank", "49", "--rope-dim", "8"],
            "--kv-rank 49 must be between 1 and 48",
        ),
        (
            &base,
            ["--kv-rank", "8", "--rope-dim", "7"],
            "--rope-dim 7 must be even",
        ),
        (
            &base,
            ["--kv-rank", "8", "--rope-dim", "18"],
            "at most the head size 16",
        ),
        (
            &base,
            ["--kv-rank", "0", "--rope-dim", "8"],
            "--kv-rank 0 must be between 1",
        ),
        (&qwen, ["--kv-rank", "8", "--rope-dim", "8"], "q/k/v biases"),
    ] {
        let mut args = vec!["convert-attention", model.to_str().unwrap(), "--to", "mla"];
        args.extend(flags);
        args.extend([
            "--calib",
            calib.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        fails(&surgeon(&args), want, &out);
    }
    let mut args = vec!["convert-attention", base.to_str().unwrap(), "--to", "mla"];
    args.extend(["--kv-rank", "8", "--rope-dim", "8", "--q-rank", "65"]);
    args.extend([
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    fails(
        &surgeon(&args),
        "--q-rank 65 must be between 1 and 64",
        &out,
    );
}
