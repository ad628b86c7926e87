//! Activation importance and sub-network extraction on the real model (SmolLM2-135M from its GGUF,
//! 9 query heads over 3 KV groups, MLP 1536, hidden 576), with small calibration so CI stays fast:
//! scores fit the model, keeping the most important neurons costs less KL than keeping the least
//! important ones, the parent's spec is bitwise the parent through the runtime, and a per-layer
//! sub-network exports, reads back and runs with the logits of its plan.
use surgeon_distill::burn;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::calibrate::{importance, Calibration};
use surgeon_distill::model::{log_softmax, Llama};
use surgeon_distill::BackendKind;
use surgeon_formats::export::{choose_export, ExportFormat};
use surgeon_formats::{ImportanceScores, Plan};
use surgeon_search::library::kl_per_token;
use surgeon_search::{prune, AttentionSpec, MlpSpec, PruneSpec, UniformPrune};

type B = burn::backend::Flex;

const TEXT: &str = "The interpreter reads a program one statement at a time. Each statement is \
parsed into a tree, compiled to bytecode and executed by a virtual machine that keeps a stack of \
frames. When a function is called, a new frame holds its local variables; when it returns, the \
frame is discarded and the value is pushed onto the caller's stack. Exceptions unwind the frames \
until a handler is found. Modules are loaded once and cached, so importing the same module twice \
returns the object created the first time. Classes are objects too: they are created at run time \
by executing the class body, and their attributes can be changed afterwards. Iterators produce \
values lazily, one at a time, which lets a loop walk over a file of any size in constant memory.";

const PROMPT: [u32; 12] = [1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253];

fn ids(v: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Tensor::from_data(
        TensorData::new(v.clone(), [1, v.len()]),
        &Default::default(),
    )
}

fn logits(plan: &Plan) -> Tensor<B, 3> {
    Llama::<B>::from_plan(plan, &Default::default())
        .unwrap()
        .forward(ids(&PROMPT))
}

fn bits(t: Tensor<B, 3>) -> Vec<u32> {
    let v = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

fn smollm2_and_scores(dir: &std::path::Path) -> (Plan, ImportanceScores) {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
    let text = dir.join("calib.txt");
    std::fs::write(&text, TEXT).unwrap();
    let cal = Calibration {
        data: text,
        max_tokens: 128,
        window: 64,
    };
    let s = importance(&plan, &cal, BackendKind::Cpu).unwrap();
    (plan, s)
}

#[test]
fn smollm2_importance_prune_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, scores) = smollm2_and_scores(dir.path());
    scores.check(&plan.arch).unwrap();
    assert_eq!((scores.samples, scores.tokens), (2, 128));
    let all = scores
        .layers
        .iter()
        .flat_map(|l| l.mlp.iter().chain(&l.heads));
    assert!(all
        .chain(&scores.hidden)
        .all(|x| x.is_finite() && *x >= 0.0));
    assert!(scores
        .layers
        .iter()
        .all(|l| l.heads.len() == 9 && l.num_kv_heads == 3));

    // The parent's own spec: the same plan, bitwise the same logits.
    let same = prune(&plan, &PruneSpec::parent(&plan.arch), Some(&scores)).unwrap();
    let parent_logits = logits(&plan);
    assert_eq!(bits(logits(&same)), bits(parent_logits.clone()));

    // Keeping the most important half of the neurons costs less than keeping the least important.
    let half = UniformPrune {
        intermediate_size: Some(768),
        ..Default::default()
    };
    let spec = PruneSpec::uniform(&plan.arch, &half);
    let top = prune(&plan, &spec, Some(&scores)).unwrap();
    let mut inverted = scores.clone();
    for l in &mut inverted.layers {
        l.mlp.iter_mut().for_each(|x| *x = -*x);
    }
    let bottom = prune(&plan, &spec, Some(&inverted)).unwrap();
    let logp = log_softmax(parent_logits, 2);
    let (kl_top, kl_bottom) = (
        kl_per_token(&logp, logits(&top)),
        kl_per_token(&logp, logits(&bottom)),
    );
    assert!(
        kl_top > 0.0 && kl_top < kl_bottom,
        "{kl_top} vs {kl_bottom}"
    );
    let layer_mlp = 3 * 576 * 768u64;
    assert_eq!(
        top.parameter_count(),
        plan.parameter_count() - 30 * (3 * 576 * 1536 - layer_mlp)
    );

    // A per-layer sub-network (fewer groups and heads, skipped halves, a dropped layer, hidden
    // 512) exports as the surgeon class and reads back with the logits of its plan.
    let mut spec = PruneSpec::parent(&plan.arch);
    spec.hidden_size = 512;
    spec.layers.remove(20);
    spec.layers[3].attention = AttentionSpec::Heads {
        kv_heads: 2,
        heads_per_group: 2,
    };
    spec.layers[10].attention = AttentionSpec::NoOp;
    spec.layers[12].mlp = MlpSpec::NoOp;
    spec.layers[15].mlp = MlpSpec::Dense {
        intermediate_size: 1000,
    };
    let sub = prune(&plan, &spec, Some(&scores)).unwrap();
    assert_eq!(sub.parameter_count(), spec.parameter_count(&plan.arch));
    assert_eq!(choose_export(&sub.arch).format, ExportFormat::Surgeon);
    let out = dir.path().join("sub");
    let opts = surgeon_formats::WriteOptions::default();
    surgeon_formats::write_model(&sub, &out, &opts).unwrap();
    let back = surgeon_formats::open_hf_dir(&out).unwrap();
    assert_eq!(back.arch.layers, sub.arch.layers);
    assert_eq!(bits(logits(&back)), bits(logits(&sub)));
}
