//! DeepSeek-V3 multi-head latent attention: the runtime against transformers'
//! `DeepseekV3ForCausalLM` on small random checkpoints (goldens by scripts/goldens/mla_goldens.py,
//! no torch needed here), generation with the compressed cache against the parallel forward.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::model::Llama;
use surgeon_formats::{open_hf_dir, AttentionKind};

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
