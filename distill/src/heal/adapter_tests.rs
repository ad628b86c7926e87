//! Adapter runs (LoRA) on tiny synthetic models: merging, what trains, resume.
use super::select::resolve;
use super::tests::{bits, cfg, docs, tiny, values, AD};
use super::trainer::load_student;
use super::*;
use crate::model::{is_adapter_param, AdapterValues, Llama};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use surgeon_formats::{open_hf_dir, Plan};

fn lora() -> TrainSet {
    TrainSet::Lora(LoraSpec::default())
}

fn tokens<B: Backend>(dev: &B::Device) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = docs(2, 12, 256, 9)
        .into_iter()
        .flatten()
        .map(i64::from)
        .collect();
    Tensor::from_data(TensorData::new(flat, [2, 12]), dev)
}

fn logits<B: Backend>(m: &Llama<B>, dev: &B::Device) -> Vec<f32> {
    m.forward(tokens(dev)).into_data().to_vec().unwrap()
}

fn params<B: Backend>(m: &Llama<B>) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    m.visit_named(&mut |n, p| {
        out.insert(n.to_string(), p.to_f32());
    });
    out
}

#[test]
fn lora_options_parse_and_print() {
    let t: TrainSet = "lora".parse().unwrap();
    assert_eq!(t, lora());
    assert_eq!(t.to_string(), "lora:r=8,alpha=16");
    let t: TrainSet = "lora:r=4,alpha=8,targets=q+v".parse().unwrap();
    let TrainSet::Lora(s) = &t else { panic!() };
    assert_eq!((s.r, s.alpha), (4, 8.0));
    assert_eq!(s.targets, ["q_proj", "v_proj"]);
    assert_eq!(t.to_string(), "lora:r=4,alpha=8,targets=q_proj+v_proj");
    assert_eq!(t.to_string().parse::<TrainSet>().unwrap(), t);
    for (bad, want) in [
        ("lora:r=0", "r must be a positive integer, not `0`"),
        ("lora:r=x", "not `x`"),
        ("lora:alpha=-1", "alpha must be a positive number"),
        ("lora:rank=4", "unknown option `rank`"),
        ("lora:r", "`r` is not key=value"),
        ("lora:targets=", "targets is empty"),
    ] {
        let e = bad.parse::<TrainSet>().unwrap_err();
        assert!(
            e.contains(want) && e.contains(&format!("`{bad}`")),
            "{bad}: {e}"
        );
    }
    let e = resolve(&tiny(1, 0), &"lora:targets=qq".parse().unwrap()).unwrap_err();
    assert!(e.to_string().contains("no linear layer of"), "{e}");
    assert!(e.to_string().contains("`qq`"), "{e}");
}

#[test]
fn untrained_lora_is_exact_and_merge_computes_the_adapted_map() {
    let dev = Default::default();
    let plan = tiny(2, 3);
    let sel = resolve(&plan, &lora()).unwrap();
    assert_eq!(sel.names.len(), 14);
    let (h, i, kv) = (64, 128, 32);
    let per_layer = 8 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3);
    assert_eq!(sel.parameters(&plan), 2 * per_layer as u64);
    let plain = Llama::<Flex>::from_plan(&plan, &dev).unwrap();
    let adapted = load_student::<Flex>(&plan, &sel, &HealConfig::default(), None, &dev).unwrap();
    // B = 0: the adapted model computes exactly the original function and merges to the weights.
    assert_eq!(bits(&logits(&plain, &dev)), bits(&logits(&adapted, &dev)));
    let merged = params(&adapted.merge_adapters());
    for (name, v) in values(&plan) {
        assert!(
            merged[&name] == v,
            "{name} changed by merging an untrained adapter"
        );
    }
    // Random A and B: the merged weights compute what the adapters did.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut saved = AdapterValues::new();
    let fresh = load_student::<Flex>(&plan, &sel, &HealConfig::default(), None, &dev).unwrap();
    fresh.visit_named(&mut |n, p| {
        if is_adapter_param(n) {
            let v = (0..p.to_f32().len()).map(|_| rng.random_range(-0.1..0.1));
            saved.insert(n.to_string(), (p.shape(), v.collect()));
        }
    });
    assert_eq!(saved.len(), 28);
    let adapted =
        load_student::<Flex>(&plan, &sel, &HealConfig::default(), Some(&saved), &dev).unwrap();
    let before = logits(&adapted, &dev);
    let merged = adapted.merge_adapters();
    let after = logits(&merged, &dev);
    let diff = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    assert_ne!(bits(&before), bits(&logits(&plain, &dev)));
    // The merged model has only the original tensors.
    assert_eq!(params(&merged).len(), plan.tensors.len());
}

#[test]
fn lora_trains_only_adapters_and_merges_at_save() {
    let dir = tempfile::tempdir().unwrap();
    let plan = tiny(2, 0);
    let c = HealConfig {
        train: lora(),
        ..cfg(dir.path())
    };
    let hp = HealPlan::new(&c, &plan, None).unwrap();
    let mut t = Trainer::<AD>::start(&hp, &plan, None, &Default::default()).unwrap();
    let before = params(t.model());
    for _ in 0..3 {
        t.step().unwrap();
    }
    let after = params(t.model());
    assert_eq!(before.len(), plan.tensors.len() + 28);
    for (name, v) in &before {
        let changed = bits(v) != bits(&after[name]);
        // A moves once B is no longer zero (from the second step on); B moves from the first.
        assert_eq!(changed, is_adapter_param(name), "{name}");
    }
    let healed = t.finish().unwrap();
    let v0: BTreeMap<String, Vec<f32>> = values(&plan).into_iter().collect();
    for (name, v) in values(&healed) {
        let merged_into = hp.sel.contains(&name);
        assert_eq!(bits(&v) != bits(&v0[&name]), merged_into, "{name}");
        assert_eq!(healed.tensors[&name].shape(), plan.tensors[&name].shape());
    }
}

fn same_weights(a: &Path, b: &Path) -> f32 {
    let (pa, pb): (Plan, Plan) = (open_hf_dir(a).unwrap(), open_hf_dir(b).unwrap());
    let mut worst = 0.0f32;
    for (name, va) in values(&pa) {
        let vb = pb.load_f32(&name).unwrap().1;
        for (x, y) in va.iter().zip(&vb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn lora_resume_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let base = |out: &Path| HealConfig {
        train: "lora:r=4,alpha=8".parse().unwrap(),
        budget: Budget::Steps(12),
        warmup: 2,
        lr: 3e-3,
        weight_decay: 0.01,
        eval_every: 4,
        ..cfg(out)
    };
    let a = dir.path().join("a");
    let ra = heal(&base(&a), tiny(2, 0), None).unwrap();
    let b = dir.path().join("b");
    let stop = HealConfig {
        stop_after: Some(5),
        ..base(&b)
    };
    let r1 = heal(&stop, tiny(2, 0), None).unwrap();
    let ck = r1.last_checkpoint.clone().unwrap();
    assert!(ck.join("trainer_state/adapters.safetensors").is_file());
    // The checkpoint is a model on its own, adapters merged (original tensor names only).
    assert_eq!(
        open_hf_dir(&ck).unwrap().tensors.len(),
        tiny(2, 0).tensors.len()
    );
    let resume = HealConfig {
        resume: Some(b.clone()),
        ..base(&b)
    };
    let r2 = heal(&resume, tiny(2, 0), None).unwrap();
    assert_eq!(r2.steps, 12);
    assert_eq!(ra.metrics.len(), r2.metrics.len());
    let worst = same_weights(&a, &b);
    assert!(worst < 1e-6, "resumed weights differ by {worst}");
    assert_ne!(
        same_weights(&a, &ck),
        0.0,
        "the run trained after the checkpoint"
    );
    assert_eq!(
        ra.trainable_parameters,
        2 * 4 * (128 * 2 + 96 * 2 + 192 * 3)
    );
}
