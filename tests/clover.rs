//! `surgeon clover` on the real model (SmolLM2: 9 query heads over 3 key/value heads of 64, with
//! massive activations): at full rank, weights-only or whitened by calibration inputs, the runtime's
//! logits are unchanged; pruning a quarter of the value directions data-aware stays closer to the
//! original than weights-only; the CLI exports the pruned model through the heterogeneous dialect
//! (or, with --pad, as a standard Llama computing the same function) and refuses bad requests
//! writing nothing.
mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use surgeon_convert::{clover, CloverOptions, InputStats, VoRank};
use surgeon_distill::calibrate::{self, Calibration};
use surgeon_distill::BackendKind;
use surgeon_formats::Plan;

const PROMPT: [u32; 12] = [1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253];

/// Logits of `plan` over the prompt.
fn logits(plan: &surgeon_formats::Plan) -> Vec<f32> {
    common::logits(plan, &PROMPT)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Mean over positions of KL(p || q) of the next-token distributions.
fn mean_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
    let logp = |row: &[f32]| {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        row.iter()
            .map(|&x| x as f64 - m - z.ln())
            .collect::<Vec<f64>>()
    };
    let rows = p.len() / vocab;
    let mut kl = 0.0;
    for (a, b) in p.chunks(vocab).zip(q.chunks(vocab)) {
        let (la, lb) = (logp(a), logp(b));
        kl += la
            .iter()
            .zip(&lb)
            .map(|(x, y)| x.exp() * (x - y))
            .sum::<f64>();
    }
    kl / rows as f64
}

fn failure(o: &Output) -> String {
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn smollm2_clover_keeps_logits_and_prunes_data_aware() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let want = logits(&plan);
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("calib.txt");
    std::fs::write(&text, TEXT.repeat(6)).unwrap();
    let mut cal = Calibration::new(&text);
    cal.max_tokens = 256;
    let (moments, tokens) =
        calibrate::attention_input_moments(&plan, &cal, BackendKind::Cpu).unwrap();
    assert!(tokens > 100 && moments.iter().all(|m| m.tokens == tokens));
    let stats: Vec<InputStats> = moments
        .into_iter()
        .map(|m| InputStats {
            tokens: m.tokens,
            sum_outer: m.sum_outer,
            sum: m.sum,
        })
        .collect();

    // Full rank, either basis: the same function.
    for st in [None, Some(&stats[..])] {
        let (full, report) = clover(&plan, &CloverOptions::default(), st).unwrap();
        assert_eq!(report.heads.len(), 30 * 3);
        assert!(report
            .heads
            .iter()
            .all(|h| h.singular_values.windows(2).all(|w| w[0] >= w[1])));
        let diff = max_diff(&want, &logits(&full));
        assert!(
            diff <= 1e-4,
            "data-aware {}: max |logit diff| {diff}",
            st.is_some()
        );
    }

    // A quarter of the value directions pruned: whitening by the inputs keeps the model much
    // closer to the original (massive activations make weights-only SVD drop what matters).
    let quarter = CloverOptions {
        rank: VoRank::Prune(0.25),
        ..Default::default()
    };
    let (aware, _) = clover(&plan, &quarter, Some(&stats)).unwrap();
    let (plain, _) = clover(&plan, &quarter, None).unwrap();
    assert_eq!(aware.arch.layers[0].attention.v_head_dim, 48);
    let vocab = plan.arch.vocab_size;
    let kl_aware = mean_kl(&want, &logits(&aware), vocab);
    let kl_plain = mean_kl(&want, &logits(&plain), vocab);
    eprintln!("KL to the original after pruning 25%: data-aware {kl_aware:.4}, weights-only {kl_plain:.4}");
    assert!(kl_aware < kl_plain, "{kl_aware} vs {kl_plain}");

    cli(dir.path(), &text, &aware);
}

/// The command line: pruned export (heterogeneous dialect), --pad (standard Llama, same function
/// as the unpadded pruned model), and refusals that write nothing.
fn cli(dir: &Path, text: &Path, aware: &Plan) {
    let gguf = surgeon_formats::gguf::smollm2_gguf_path().unwrap();
    let gguf = gguf.to_str().unwrap();
    let text = text.to_str().unwrap();
    let pruned = dir.join("pruned");
    let plot = dir.join("spectrum.svg");
    let report = ok(&surgeon(&[
        "clover",
        gguf,
        "--prune-vo",
        "0.25",
        "--calib",
        text,
        "--max-tokens",
        "256",
        "--plot",
        plot.to_str().unwrap(),
        "--out",
        pruned.to_str().unwrap(),
    ]));
    assert!(report.contains("keeps 48/64 directions"), "{report}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("layer 29") && svg.contains("sigma"), "{svg}");
    assert!(
        report.contains("KV cache per token at 16 bits 23,040 -> 20,160 bytes"),
        "{report}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pruned.join("config.json")).unwrap())
            .unwrap();
    assert_ne!(config["architectures"][0], "LlamaForCausalLM", "{config}");
    let back = surgeon_formats::open_hf_dir(&pruned).unwrap();
    assert_eq!(back.arch.layers[5].attention.v_head_dim, 48);
    assert_eq!(back.arch.layers[5].attention.head_dim, 64);
    // The same calibration through the CLI gives the model computed above.
    let diff = max_diff(&logits(aware), &logits(&back));
    assert!(
        diff <= 1e-4,
        "exported pruned model: max |logit diff| {diff}"
    );
    let inspect = ok(&surgeon(&["inspect", pruned.to_str().unwrap()]));
    assert!(
        inspect.contains(
            "clover: value-output SVD per KV head (data-aware on 256 calibration tokens)"
        ) && inspect.contains("KV cache values per token 11520 -> 10080"),
        "{inspect}"
    );

    let padded = dir.join("padded");
    ok(&surgeon(&[
        "clover",
        gguf,
        "--prune-vo",
        "0.25",
        "--calib",
        text,
        "--max-tokens",
        "256",
        "--pad",
        "--out",
        padded.to_str().unwrap(),
    ]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(padded.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM", "{config}");
    let back = surgeon_formats::open_hf_dir(&padded).unwrap();
    let diff = max_diff(&logits(aware), &logits(&back));
    assert!(diff <= 1e-4, "padded: max |logit diff| {diff}");
    std::fs::remove_dir_all(&padded).unwrap();
    std::fs::remove_dir_all(&pruned).unwrap();

    let bad = dir.join("bad");
    let bad_s = bad.to_str().unwrap();
    let e = failure(&surgeon(&[
        "clover",
        gguf,
        "--prune-vo",
        "1.5",
        "--weights-only",
        "--out",
        bad_s,
    ]));
    assert!(e.contains("--prune-vo") && e.contains("(0, 1)"), "{e}");
    let e = failure(&surgeon(&[
        "clover",
        gguf,
        "--vo-rank",
        "65",
        "--weights-only",
        "--out",
        bad_s,
    ]));
    assert!(
        e.contains("--vo-rank 65 is out of range") && e.contains("1..=64"),
        "{e}"
    );
    let e = failure(&surgeon(&["clover", gguf, "--qk", "--out", bad_s]));
    assert!(e.contains("--qk") && e.contains("RoPE"), "{e}");
    let e = failure(&surgeon(&[
        "clover", gguf, "--energy", "0.9", "--out", bad_s,
    ]));
    assert!(
        e.contains("data-aware by default") && e.contains("--weights-only"),
        "{e}"
    );
    assert!(!bad.exists());
}

/// Heals `gguf` for a few steps with `--train TRAIN` on TEXT (held out: OTHER) into `out`; returns
/// the report (stderr).
fn heal_briefly(gguf: &str, dir: &Path, train: &str, out: &Path) -> String {
    let text = dir.join("train.txt");
    let other = dir.join("heldout.txt");
    std::fs::write(&text, TEXT.repeat(8)).unwrap();
    std::fs::write(&other, OTHER.repeat(4)).unwrap();
    let o = surgeon(&[
        "heal",
        gguf,
        "--train",
        train,
        "--data",
        text.to_str().unwrap(),
        "--eval-data",
        other.to_str().unwrap(),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch",
        "1",
        "--lr",
        "1e-3",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `heal --train lora` on the real model: only the adapted projections change, merged into
/// the original tensors (same names, shapes and class), and the report counts the adapter
/// parameters from the formula.
#[test]
fn smollm2_heals_with_lora_merged_at_save() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let gguf = surgeon_formats::gguf::smollm2_gguf_path().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora");
    let report = heal_briefly(
        gguf.to_str().unwrap(),
        dir.path(),
        "lora:r=4,alpha=8,targets=q+v+down",
        &out,
    );
    // Per layer r * (in + out): q 576+576, v 576+192, down 1536+576; 30 layers.
    let want = 30 * 4 * ((576 + 576) + (576 + 192) + (1536 + 576));
    assert_eq!(want, 483_840);
    assert!(
        report.contains("healed 90 tensors (483,840 parameters through lora:r=4,alpha=8,targets=q_proj+v_proj+down_proj adapters, merged)"),
        "{report}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM", "{config}");
    let healed = surgeon_formats::open_hf_dir(&out).unwrap();
    let names: Vec<&String> = healed.tensors.keys().collect();
    assert_eq!(names, plan.tensors.keys().collect::<Vec<_>>());
    let mut changed = 0;
    for (name, e) in &healed.tensors {
        assert_eq!(e.shape(), plan.tensors[name].shape(), "{name}");
        let adapted = [".q_proj.", ".v_proj.", ".down_proj."]
            .iter()
            .any(|p| name.contains(p));
        let same = healed.load_f32(name).unwrap().1 == plan.load_f32(name).unwrap().1;
        if !adapted {
            assert!(same, "{name} changed without an adapter");
        }
        changed += (adapted && !same) as usize;
    }
    assert_eq!(changed, 90, "every adapted projection moved");
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 5, "{metrics}");
}

/// Held-out text for the healing tests (never trained on).
const OTHER: &str = "Rivers carry sediment to the sea, where it settles into layers that harden over millions of years. Wind and rain wear mountains down, and the rock returns, grain by grain, to the lowlands. ";

const TEXT: &str = "The interpreter reads a statement, compiles it to bytecode and runs it. \
Names are bound in namespaces; a function call creates a new local namespace. Modules are \
objects too, and importing one runs its code once. Exceptions unwind the stack until a handler \
matches their class. ";
