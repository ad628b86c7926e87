//! `surgeon clover` on the real model (SmolLM2: 9 query heads over 3 key/value heads of 64, with
//! massive activations): at full rank, weights-only or whitened by calibration inputs, the runtime's
//! logits are unchanged; pruning a quarter of the value directions data-aware stays closer to the
//! original than weights-only; the CLI exports the pruned model through the heterogeneous dialect
//! (or, with --pad, as a standard Llama computing the same function) and refuses bad requests
//! writing nothing.
mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use surgeon_convert::{clover, CloverOptions, InputStats, VoRank};
use surgeon_distill::burn::backend::Autodiff;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::calibrate::{self, Calibration};
use surgeon_distill::heal::select::resolve;
use surgeon_distill::heal::trainer::load_student;
use surgeon_distill::heal::{Budget, DataSpec, HealConfig, HealPlan, TrainSet, Trainer};
use surgeon_distill::model::Llama;
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
    // The same function through other shapes (value heads of 48 vs 64 features with zeros), so
    // f32 sums round differently: with gemm's AVX-512 kernels the largest difference on SmolLM2's
    // logits (magnitude ~20) is 1.2e-4, a few units in the last place.
    let diff = max_diff(&logits(aware), &logits(&back));
    assert!(diff <= 2e-4, "padded: max |logit diff| {diff}");
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

/// A `train` clover configuration for `plan` (its factors computed as the command does).
fn clover_cfg(plan: &Plan, out: &Path) -> HealConfig {
    HealConfig {
        train: TrainSet::Clover,
        clover_factors: Some(Arc::new(surgeon::clover_factors(plan).unwrap())),
        out: out.to_path_buf(),
        ..Default::default()
    }
}

/// Every parameter of `m` by name.
fn params<Bk: Backend>(m: &Llama<Bk>) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    m.visit_named(&mut |n, p| {
        out.insert(n.to_string(), p.to_f32());
    });
    out
}

/// Factorised (the weights replaced by their bases, cores attached), the model computes the
/// original function; merged untrained, it gives back the original weights (1e-6 relative to the
/// tensor's largest weight).
fn factorise_then_merge(plan: &Plan, tol_logits: f32) {
    let dev = Default::default();
    let cfg = clover_cfg(plan, Path::new("unused"));
    let sel = resolve(plan, &cfg.train).unwrap();
    let model = load_student::<B>(plan, &sel, &cfg, None, &dev).unwrap();
    let p = params(&model);
    let q0 = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(
        p[q0],
        plan.load_f32(q0).unwrap().1,
        "the weight holds the basis"
    );
    let vocab = plan.arch.vocab_size as u32;
    let prompt: Vec<u32> = PROMPT.iter().map(|t| t % vocab).collect();
    let want = common::logits(plan, &prompt);
    let diff = max_diff(&to_vec(model.forward(ids(&prompt))), &want);
    assert!(diff <= tol_logits, "factorised logits differ by {diff}");
    let merged = params(&model.merge_adapters());
    assert_eq!(merged.len(), plan.tensors.len());
    for (name, v) in &merged {
        let want = plan.load_f32(name).unwrap().1;
        let top = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let err = max_diff(v, &want);
        assert!(
            err <= 1e-6 * top.max(1.0),
            "{name}: merged differs by {err} (max |w| {top})"
        );
    }
}

#[test]
fn clover_factorise_then_merge_reproduces_the_weights() {
    // Synthetic GQA (4 query heads over 2 key/value heads) and the real model.
    let tiny = surgeon_formats::synthetic::SyntheticSpec::tiny().plan();
    let sel = resolve(&tiny, &TrainSet::Clover).unwrap();
    // Per layer: q 4 heads of 16x16, v 2 heads of 16x16, up 128/8 blocks of 8x8.
    assert_eq!(sel.parameters(&tiny), 2 * (4 * 256 + 2 * 256 + 16 * 64));
    factorise_then_merge(&tiny, 1e-4);
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let sel = resolve(&plan, &TrainSet::Clover).unwrap();
    assert_eq!(sel.names.len(), 90);
    // Per layer: q 9 heads of 64x64, v 3 KV heads of 64x64, up 1536/32 blocks of 32x32.
    assert_eq!(
        sel.parameters(&plan),
        30 * (9 * 4096 + 3 * 4096 + 48 * 1024)
    );
    factorise_then_merge(&plan, 1e-3);
}

#[test]
fn clover_gradients_reach_only_the_cores() {
    let dir = tempfile::tempdir().unwrap();
    let plan = surgeon_formats::synthetic::SyntheticSpec::tiny().plan();
    let text: Vec<Vec<u32>> = (0..24u32)
        .map(|i| (0..40u32).map(|j| 3 + (i * 37 + j * 11) % 250).collect())
        .collect();
    let cfg = HealConfig {
        data: DataSpec::Tokens(text),
        budget: Budget::Steps(3),
        seq_len: 16,
        batch: 2,
        lr: 1e-2,
        ..clover_cfg(&plan, dir.path())
    };
    let hp = HealPlan::new(&cfg, &plan, None).unwrap();
    let mut t = Trainer::<Autodiff<B>>::start(&hp, &plan, None, &Default::default()).unwrap();
    let before = params(t.model());
    for _ in 0..3 {
        t.step().unwrap();
    }
    let after = params(t.model());
    let cores = before
        .keys()
        .filter(|n| n.ends_with(".clover_core"))
        .count();
    assert_eq!(cores, 6);
    for (name, v) in &before {
        let changed = v != &after[name];
        assert_eq!(changed, name.ends_with(".clover_core"), "{name}");
    }
    // Saved: only the adapted weights changed, with their original shapes.
    let healed = t.finish().unwrap();
    for name in plan.tensors.keys() {
        let (a, b) = (healed.load_f32(name).unwrap(), plan.load_f32(name).unwrap());
        assert_eq!(a.0, b.0);
        assert_eq!(a.1 != b.1, hp.sel.contains(name), "{name}");
    }
}

/// An interrupted clover run resumed from its checkpoint (cores from adapters.safetensors, bases
/// recomputed) ends where the uninterrupted run does.
#[test]
fn clover_resume_continues_the_same_trajectory() {
    use surgeon_distill::heal::heal;
    let dir = tempfile::tempdir().unwrap();
    let plan = surgeon_formats::synthetic::SyntheticSpec::tiny().plan();
    let text: Vec<Vec<u32>> = (0..24u32)
        .map(|i| (0..40u32).map(|j| 3 + (i * 37 + j * 11) % 250).collect())
        .collect();
    let cfg = |out: &Path| HealConfig {
        data: DataSpec::Tokens(text.clone()),
        budget: Budget::Steps(8),
        seq_len: 16,
        batch: 2,
        lr: 1e-2,
        warmup: 2,
        ..clover_cfg(&plan, out)
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    heal(&cfg(&a), plan.clone(), None).unwrap();
    let stop = HealConfig {
        stop_after: Some(3),
        ..cfg(&b)
    };
    let r1 = heal(&stop, plan.clone(), None).unwrap();
    let ck = r1.last_checkpoint.unwrap();
    assert!(ck.join("trainer_state/adapters.safetensors").is_file());
    let resume = HealConfig {
        resume: Some(b.clone()),
        ..cfg(&b)
    };
    assert_eq!(heal(&resume, plan.clone(), None).unwrap().steps, 8);
    let (pa, pb) = (
        surgeon_formats::open_hf_dir(&a).unwrap(),
        surgeon_formats::open_hf_dir(&b).unwrap(),
    );
    for name in plan.tensors.keys() {
        let d = max_diff(&pa.load_f32(name).unwrap().1, &pb.load_f32(name).unwrap().1);
        assert!(d < 1e-6, "{name}: resumed differs by {d}");
    }
}

/// `heal --train clover` on the real model: the cores of q_proj, v_proj and up_proj train and
/// merge back; nothing else changes, and the model keeps its names, shapes and class.
#[test]
fn smollm2_heals_with_clover_merged_at_save() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let gguf = surgeon_formats::gguf::smollm2_gguf_path().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clover");
    let report = heal_briefly(gguf.to_str().unwrap(), dir.path(), "clover", &out);
    assert!(
        report.contains("healed 90 tensors (2,949,120 parameters through CLOVER cores, merged)"),
        "{report}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM", "{config}");
    let healed = surgeon_formats::open_hf_dir(&out).unwrap();
    assert_eq!(healed.tensors.len(), plan.tensors.len());
    let mut changed = 0;
    for (name, e) in &healed.tensors {
        assert_eq!(e.shape(), plan.tensors[name].shape(), "{name}");
        let adapted = [".q_proj.", ".v_proj.", ".up_proj."]
            .iter()
            .any(|p| name.contains(p));
        let same = healed.load_f32(name).unwrap().1 == plan.load_f32(name).unwrap().1;
        assert!(adapted || same, "{name} changed without a core");
        changed += (adapted && !same) as usize;
    }
    assert_eq!(changed, 90, "every adapted projection moved");
}

/// Held-out text for the healing tests (never trained on).
const OTHER: &str = "Rivers carry sediment to the sea, where it settles into layers that harden over millions of years. Wind and rain wear mountains down, and the rock returns, grain by grain, to the lowlands. ";

const TEXT: &str = "The interpreter reads a statement, compiles it to bytecode and runs it. \
Names are bound in namespaces; a function call creates a new local namespace. Modules are \
objects too, and importing one runs its code once. Exceptions unwind the stack until a handler \
matches their class. ";
