//! Acceptance tests of healing on tiny synthetic models.
use super::data::{pack, prepare, DataSpec, Sampler};
use super::loss::{kd_loss, kd_loss_device, lm_loss, lm_loss_fused};
use super::schedule::{lr_at, Schedule};
use super::trainer::{load_model, named_params};
use super::*;
use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::path::Path;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, AuxFile, DType, Plan, Source, TensorEntry};

pub(super) type AD = Autodiff<Flex>;

pub(super) fn docs(n: usize, len: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(3..vocab)).collect())
        .collect()
}

pub(super) fn tiny(layers: usize, seed: u64) -> Plan {
    SyntheticSpec {
        num_layers: layers,
        seed,
        ..SyntheticSpec::tiny()
    }
    .plan()
}

/// A 3-layer model whose layer 1 is an inserted identity block (zero o_proj / down_proj).
fn expanded() -> Plan {
    let mut p = tiny(3, 7);
    for t in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
        let name = format!("model.layers.1.{t}");
        let shape = p.tensors[&name].shape();
        p.tensors.insert(
            name,
            TensorEntry::new(Source::Zeros {
                shape,
                dtype: DType::F32,
            }),
        );
    }
    p.arch.surgeon.new_layers = vec![1];
    p
}

pub(super) fn cfg(out: &Path) -> HealConfig {
    HealConfig {
        data: DataSpec::Tokens(docs(24, 40, 256, 1)),
        out: out.to_path_buf(),
        budget: Budget::Steps(4),
        seq_len: 16,
        batch: 2,
        lr: 1e-2,
        ..Default::default()
    }
}

pub(super) fn values(plan: &Plan) -> Vec<(String, Vec<f32>)> {
    plan.tensors
        .keys()
        .map(|n| (n.clone(), plan.load_f32(n).unwrap().1))
        .collect()
}

pub(super) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn new_blocks_train_only_new_layers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("healed");
    let plan = expanded();
    let before = values(&plan);
    let c = HealConfig {
        train: TrainSet::NewBlocks,
        weight_decay: 0.1,
        ..cfg(&out)
    };
    let r = heal(&c, plan, None).unwrap();
    assert_eq!(r.steps, 4);
    assert!(r
        .trainable_tensors
        .iter()
        .all(|n| n.starts_with("model.layers.1.")));
    let healed = open_hf_dir(&out).unwrap();
    assert_eq!(healed.arch.surgeon.history.len(), 1);
    assert!(healed
        .arch
        .surgeon
        .notes
        .iter()
        .any(|n| n.contains("Healed")));
    for (name, v) in before {
        let after = healed.load_f32(&name).unwrap().1;
        if name.starts_with("model.layers.1.") {
            assert_ne!(bits(&v), bits(&after), "{name} should have trained");
        } else {
            assert_eq!(bits(&v), bits(&after), "{name} is frozen but changed");
        }
    }
    assert!(out.join("metrics.csv").is_file());
    assert!(out.join("loss.png").is_file());
    // plotters writes each label on its own line inside <text>.
    let svg = std::fs::read_to_string(out.join("loss.svg"))
        .unwrap()
        .replace('\n', "");
    assert!(
        svg.contains(">training loss<") && svg.contains(">learning rate"),
        "{svg}"
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 1 + 4, "{csv}");
}

#[test]
fn step0_only_zeroed_projections_of_new_blocks_get_gradient() {
    let plan = expanded();
    let sel = select::resolve(&plan, &TrainSet::NewBlocks).unwrap();
    let dev = Default::default();
    let m = load_model::<AD>(&plan, &|n| sel.contains(n), &dev).unwrap();
    let seqs = pack(&docs(4, 40, 256, 3), 2, 16);
    let flat: Vec<i64> = seqs[..2].iter().flatten().map(|&t| t as i64).collect();
    let toks = Tensor::<AD, 2, Int>::from_data(TensorData::new(flat, [2, 17]), &dev);
    let loss = lm_loss(
        m.forward(toks.clone().slice([0..2, 0..16])),
        toks.slice([0..2, 1..17]),
    );
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let mut nonzero = vec![];
    for (id, name, rank) in named_params(&m) {
        let g: Option<Vec<f32>> = match rank {
            1 => grads
                .get::<Flex, 1>(id)
                .map(|t| t.into_data().to_vec().unwrap()),
            _ => grads
                .get::<Flex, 2>(id)
                .map(|t| t.into_data().to_vec().unwrap()),
        };
        match g {
            None => assert!(!sel.contains(&name), "{name} trainable but has no gradient"),
            Some(g) => {
                assert!(sel.contains(&name), "{name} frozen but has a gradient");
                if g.iter().any(|&x| x != 0.0) {
                    nonzero.push(name);
                }
            }
        }
    }
    nonzero.sort();
    assert_eq!(
        nonzero,
        vec![
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.self_attn.o_proj.weight"
        ]
    );
}

#[test]
fn kd_is_zero_for_identical_models_and_positive_otherwise() {
    let dev = Default::default();
    let plan = tiny(2, 0);
    let student = load_model::<AD>(&plan, &|_| true, &dev).unwrap();
    let teacher = load_model::<Flex>(&plan, &|_| false, &dev).unwrap();
    let other = load_model::<Flex>(&tiny(2, 5), &|_| false, &dev).unwrap();
    let flat: Vec<i64> = docs(2, 40, 256, 9)
        .into_iter()
        .flatten()
        .map(i64::from)
        .collect();
    let toks = Tensor::<AD, 2, Int>::from_data(TensorData::new(flat, [2, 40]), &dev);
    for t in [1.0, 2.0] {
        let s = student.forward(toks.clone());
        let same = Tensor::<AD, 3>::from_inner(teacher.forward(toks.clone().inner()));
        let kd = kd_loss(s.clone(), same, t, true)
            .into_scalar()
            .elem::<f32>();
        // 40 positions: both sides' attention runs fused on the host (the student's as one
        // autodiff operation) with the same arithmetic, so the logits are bitwise equal.
        assert_eq!(kd, 0.0, "T = {t}");
        let diff = Tensor::<AD, 3>::from_inner(other.forward(toks.clone().inner()));
        let kd = kd_loss(s, diff, t, true).into_scalar().elem::<f32>();
        assert!(kd > 0.0);
    }
}

#[test]
fn kd_gradient_matches_formula_and_finite_differences() {
    let dev = Default::default();
    let (n, v) = (3usize, 7usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let zs: Vec<f32> = (0..n * v).map(|_| rng.random_range(-2.0..2.0)).collect();
    let zt: Vec<f32> = (0..n * v).map(|_| rng.random_range(-2.0..2.0)).collect();
    let softmax = |z: &[f32], t: f32| -> Vec<f64> {
        z.chunks(v)
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let e: Vec<f64> = row
                    .iter()
                    .map(|&x| ((x as f64 - m) / t as f64).exp())
                    .collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |x| x / s)
            })
            .collect()
    };
    for (t, t2) in [(1.0f32, false), (2.0, false), (2.0, true)] {
        let s =
            Tensor::<AD, 3>::from_data(TensorData::new(zs.clone(), [1, n, v]), &dev).require_grad();
        let tt = Tensor::<AD, 3>::from_data(TensorData::new(zt.clone(), [1, n, v]), &dev);
        let loss = kd_loss(s.clone(), tt, t as f64, t2);
        let g: Vec<f32> = s
            .grad(&loss.backward())
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        // Formula: per token (p_S - p_T) / T, times T^2 when scaled; divided by n (mean).
        let (ps, pt) = (softmax(&zs, t), softmax(&zt, t));
        let scale = if t2 { (t * t) as f64 } else { 1.0 };
        for i in 0..n * v {
            let want = scale * (ps[i] - pt[i]) / t as f64 / n as f64;
            assert!(
                (g[i] as f64 - want).abs() < 1e-5,
                "T={t} i={i}: {} vs {want}",
                g[i]
            );
        }
        // Central finite differences of the burn loss itself.
        let f = |z: &[f32]| -> f64 {
            let s = Tensor::<Flex, 3>::from_data(TensorData::new(z.to_vec(), [1, n, v]), &dev);
            let tt = Tensor::<Flex, 3>::from_data(TensorData::new(zt.clone(), [1, n, v]), &dev);
            kd_loss(s, tt, t as f64, t2).into_scalar().elem::<f64>()
        };
        let eps = 1e-2f32;
        for i in [0, 5, 11, 20] {
            let mut a = zs.clone();
            let mut b = zs.clone();
            a[i] += eps;
            b[i] -= eps;
            let fd = (f(&a) - f(&b)) / (2.0 * eps as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-4,
                "T={t} i={i}: fd {fd} vs {}",
                g[i]
            );
        }
    }
}

#[test]
fn fused_kd_matches_the_device_form() {
    // kd_loss (fused on the host) against kd_loss_device (tensor operations, autodiff through
    // the log-softmax): values and gradients agree to f32 rounding; both are exactly 0 for
    // identical logits (the fused one's gradient too).
    let dev = Default::default();
    let (b, n, v) = (2usize, 5usize, 300usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let zs: Vec<f32> = (0..b * n * v)
        .map(|_| rng.random_range(-8.0..8.0))
        .collect();
    let zt: Vec<f32> = (0..b * n * v)
        .map(|_| rng.random_range(-8.0..8.0))
        .collect();
    let leaf = |z: &[f32]| {
        Tensor::<AD, 3>::from_data(TensorData::new(z.to_vec(), [b, n, v]), &dev).require_grad()
    };
    let run = |fused: bool, z: &[f32], t: f64, t2: bool| -> (f64, Vec<f32>) {
        let s = leaf(&zs);
        let tt = Tensor::<AD, 3>::from_data(TensorData::new(z.to_vec(), [b, n, v]), &dev);
        let loss = match fused {
            true => kd_loss(s.clone(), tt, t, t2),
            false => kd_loss_device(s.clone(), tt, t, t2),
        };
        let value = loss.clone().into_scalar().elem::<f64>();
        let g = s.grad(&loss.backward()).unwrap();
        (value, g.into_data().to_vec().unwrap())
    };
    for (t, t2) in [(1.0, false), (2.0, true), (0.5, true)] {
        let (fv, fg) = run(true, &zt, t, t2);
        let (dv, dg) = run(false, &zt, t, t2);
        assert!((fv - dv).abs() <= 1e-5 * dv.abs(), "T={t}: {fv} vs {dv}");
        let worst = fg
            .iter()
            .zip(&dg)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-7, "T={t}: gradients differ by {worst}");
        for fused in [true, false] {
            let (value, grad) = run(fused, &zs, t, t2);
            assert_eq!(value, 0.0, "fused {fused}, T={t}");
            // The device form's gradient goes through autodiff's log-softmax backward, where
            // sum(p) is not exactly 1: only the fused one is exactly 0.
            assert!(!fused || grad.iter().all(|&g| g == 0.0), "T={t}");
        }
    }
}

#[test]
fn fused_lm_loss_matches_the_tensor_form() {
    let dev = Default::default();
    let (b, n, v) = (2usize, 5usize, 300usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let z: Vec<f32> = (0..b * n * v)
        .map(|_| rng.random_range(-8.0..8.0))
        .collect();
    let tg: Vec<i64> = (0..b * n).map(|_| rng.random_range(0..v as i64)).collect();
    let run = |fused: bool| -> (f64, Vec<f32>) {
        let s =
            Tensor::<AD, 3>::from_data(TensorData::new(z.clone(), [b, n, v]), &dev).require_grad();
        let t = Tensor::<AD, 2, Int>::from_data(TensorData::new(tg.clone(), [b, n]), &dev);
        let loss = match fused {
            true => lm_loss_fused(s.clone(), t),
            false => lm_loss(s.clone(), t),
        };
        let value = loss.clone().into_scalar().elem::<f64>();
        let g = s.grad(&loss.backward()).unwrap();
        (value, g.into_data().to_vec().unwrap())
    };
    let ((fv, fg), (tv, tg)) = (run(true), run(false));
    assert!((fv - tv).abs() <= 1e-5 * tv.abs(), "{fv} vs {tv}");
    let worst = fg
        .iter()
        .zip(&tg)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-7, "gradients differ by {worst}");
}

#[test]
fn resume_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let base = |out: &Path| HealConfig {
        budget: Budget::Steps(20),
        grad_accum: 2,
        warmup: 3,
        lr: 3e-3,
        weight_decay: 0.01,
        clip: Some(0.5),
        eval_every: 5,
        ..cfg(out)
    };
    let a = dir.path().join("a");
    heal(&base(&a), tiny(2, 0), None).unwrap();

    let b = dir.path().join("b");
    let r1 = heal(
        &HealConfig {
            stop_after: Some(10),
            ..base(&b)
        },
        tiny(2, 0),
        None,
    )
    .unwrap();
    assert!(r1.interrupted);
    assert_eq!(r1.steps, 10);
    let ck = r1.last_checkpoint.clone().unwrap();
    assert!(ck.join("trainer_state/state.json").is_file());
    assert!(ck.join("config.json").is_file());
    // The checkpoint's weights load as a model on their own.
    open_hf_dir(&ck).unwrap();
    let r2 = heal(
        &HealConfig {
            resume: Some(b.clone()),
            ..base(&b)
        },
        tiny(2, 0),
        None,
    )
    .unwrap();
    assert_eq!(r2.steps, 20);
    assert!(!r2.interrupted);
    assert_eq!(r2.metrics.len(), 21);
    let (pa, pb) = (open_hf_dir(&a).unwrap(), open_hf_dir(&b).unwrap());
    let mut worst = 0.0f32;
    for (name, va) in values(&pa) {
        let vb = pb.load_f32(&name).unwrap().1;
        for (x, y) in va.iter().zip(&vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-5, "resumed weights differ by {worst}");
    // Something did train.
    let p0 = tiny(2, 0);
    let v0 = p0.load_f32("model.layers.0.mlp.up_proj.weight").unwrap().1;
    assert_ne!(
        v0,
        pa.load_f32("model.layers.0.mlp.up_proj.weight").unwrap().1
    );
}

#[test]
fn new_embeddings_change_only_new_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let mut plan = tiny(2, 0);
    plan.arch.surgeon.new_token_ids = (250..256).collect();
    let mut d = docs(24, 40, 256, 1);
    for doc in &mut d {
        doc[3] = 251;
        doc[7] = 253;
    }
    let before = values(&plan);
    let c = HealConfig {
        train: TrainSet::NewEmbeddings,
        weight_decay: 0.1,
        data: DataSpec::Tokens(d),
        ..cfg(&out)
    };
    heal(&c, plan, None).unwrap();
    let healed = open_hf_dir(&out).unwrap();
    for (name, v) in before {
        let after = healed.load_f32(&name).unwrap().1;
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            let h = 64;
            assert_eq!(
                bits(&v[..250 * h]),
                bits(&after[..250 * h]),
                "{name} old rows"
            );
            assert_ne!(
                bits(&v[250 * h..]),
                bits(&after[250 * h..]),
                "{name} new rows"
            );
        } else {
            assert_eq!(bits(&v), bits(&after), "{name}");
        }
    }
}

#[test]
fn configuration_errors_stop_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let err = |c: HealConfig, student: Plan, teacher: Option<Plan>| {
        let e = heal(&c, student, teacher).unwrap_err().to_string();
        assert!(!out.exists(), "training started for: {e}");
        e
    };
    let e = err(
        HealConfig {
            data: DataSpec::Tokens(vec![]),
            ..cfg(&out)
        },
        tiny(2, 0),
        None,
    );
    assert!(e.contains("empty"), "{e}");
    let e = err(
        HealConfig {
            seq_len: 4096,
            ..cfg(&out)
        },
        tiny(2, 0),
        None,
    );
    assert!(e.contains("longer than the model's context"), "{e}");
    let mut t = SyntheticSpec {
        vocab_size: 512,
        ..SyntheticSpec::tiny()
    }
    .plan();
    t.origin = "teacher".into();
    let e = err(
        HealConfig {
            loss: LossKind::Kd,
            ..cfg(&out)
        },
        tiny(2, 0),
        Some(t),
    );
    assert!(e.contains("vocabulary"), "{e}");
    let e = err(
        HealConfig {
            train: TrainSet::Regex("nothing_like_this".into()),
            ..cfg(&out)
        },
        tiny(2, 0),
        None,
    );
    assert!(e.contains("matches no tensor"), "{e}");
    let e = err(
        HealConfig {
            train: TrainSet::NewBlocks,
            ..cfg(&out)
        },
        tiny(2, 0),
        None,
    );
    assert!(e.contains("no new layers"), "{e}");
    let e = err(
        HealConfig {
            loss: LossKind::Kd,
            ..cfg(&out)
        },
        tiny(2, 0),
        None,
    );
    assert!(e.contains("needs a `teacher`"), "{e}");

    // A checkpoint of another model.
    let other = dir.path().join("other");
    let r = heal(
        &HealConfig {
            stop_after: Some(1),
            ..cfg(&other)
        },
        tiny(2, 0),
        None,
    )
    .unwrap();
    assert!(r.interrupted);
    let e = err(
        HealConfig {
            resume: Some(other.clone()),
            ..cfg(&out)
        },
        tiny(2, 3),
        None,
    );
    assert!(e.contains("another model"), "{e}");
}

#[test]
fn text_data_is_tokenised_packed_and_split() {
    let mut plan = tiny(2, 0);
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
      "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
      "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":3,"world":4,"again":5},"unk_token":"[UNK]"}}"#;
    plan.files.insert(
        "tokenizer.json".into(),
        AuxFile::Bytes(tok.as_bytes().to_vec().into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "hello world hello world again ".repeat(40)).unwrap();
    let jl = dir.path().join("b.jsonl");
    std::fs::write(
        &jl,
        "{\"text\": \"again again\"}\n\n{\"text\": \"world\"}\n",
    )
    .unwrap();
    let d = prepare(&plan, &DataSpec::Files(vec![txt, jl]), None, 8).unwrap();
    let all: Vec<u32> = d
        .train
        .iter()
        .chain(&d.eval)
        .flat_map(|s| s[..8].to_vec())
        .collect();
    assert_eq!(&all[..6], &[3, 4, 3, 4, 5, 3]);
    assert!(d.train.iter().chain(&d.eval).all(|s| s.len() == 9));
    // 200 + 1 + 2 + 1 + 1 + 1 = 206 tokens -> 25 sequences; 5% held out = 1.
    assert_eq!(d.train.len() + d.eval.len(), 25);
    assert_eq!(d.eval.len(), 1);
    // EOS (2) separates documents.
    let last = d.eval.last().unwrap();
    assert_eq!(last[8], 2);
    assert_eq!(
        pack(&[vec![5, 5], vec![4]], 2, 2),
        vec![vec![5, 5, 2], vec![2, 4, 2]]
    );

    let mut s1 = Sampler::new(10, 3);
    let mut s2 = Sampler::new(10, 3);
    let a: Vec<usize> = (0..25).map(|k| s1.index(k)).collect();
    let b: Vec<usize> = (10..25).map(|k| s2.index(k)).collect();
    assert_eq!(&a[10..], &b[..]);
    let mut e0 = a[..10].to_vec();
    e0.sort();
    assert_eq!(e0, (0..10).collect::<Vec<_>>());
}

#[test]
fn schedules() {
    assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 10, 0), 0.5);
    assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 10, 1), 1.0);
    assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 10, 2), 1.0);
    assert!((lr_at(Schedule::Linear, 1.0, 2, 10, 9) - 0.125).abs() < 1e-12);
    assert!((lr_at(Schedule::Cosine, 1.0, 0, 10, 5) - 0.5).abs() < 1e-12);
    assert_eq!(lr_at(Schedule::Constant, 1.0, 0, 10, 9), 1.0);
}

#[test]
fn moe_student_heals_with_the_load_balancing_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("healed");
    let opts =
        surgeon_surgery::moe::MoeOptions::new(surgeon_surgery::moe::MoeMethod::SplitRandom, 4, 2);
    let plan = surgeon_surgery::moe::split(&tiny(2, 3), &opts, None).unwrap();
    assert!(plan
        .arch
        .layers
        .iter()
        .all(|l| matches!(l.mlp, surgeon_formats::Mlp::Moe { .. })));
    let c = HealConfig {
        budget: Budget::Steps(8),
        aux_coef: 0.01,
        ..cfg(&out)
    };
    let r = heal(&c, plan, None).unwrap();
    assert_eq!(r.steps, 8);
    assert!(r
        .trainable_tensors
        .iter()
        .any(|n| n.contains("block_sparse_moe.gate")));
    let losses: Vec<f64> = r
        .metrics
        .iter()
        .map(|m| m.loss)
        .filter(|l| l.is_finite())
        .collect();
    assert_eq!(losses.len(), 8);
    assert!(losses[7] < losses[0], "{losses:?}");
    let healed = open_hf_dir(&out).unwrap();
    assert!(healed
        .arch
        .surgeon
        .notes
        .iter()
        .any(|n| n.contains("MoE load balancing")));
    // The aux loss is part of the objective: a different coefficient gives a different step-1 loss.
    let out2 = dir.path().join("healed2");
    let plan = surgeon_surgery::moe::split(&tiny(2, 3), &opts, None).unwrap();
    let r2 = heal(
        &HealConfig {
            budget: Budget::Steps(1),
            aux_coef: 1.0,
            ..cfg(&out2)
        },
        plan,
        None,
    )
    .unwrap();
    let l2 = r2
        .metrics
        .iter()
        .map(|m| m.loss)
        .find(|l| l.is_finite())
        .unwrap();
    assert!(l2 > losses[0] + 0.5, "{l2} vs {}", losses[0]);
}

#[test]
fn training_model_has_stable_ids_and_the_runtime_logits() {
    let dev = Default::default();
    let plan = tiny(2, 4);
    let a = load_model::<AD>(&plan, &|n| n.contains("mlp"), &dev).unwrap();
    let b = load_model::<AD>(&plan, &|_| false, &dev).unwrap();
    let (na, nb) = (named_params(&a), named_params(&b));
    assert_eq!(na.len(), plan.tensors.len());
    for ((ia, name, _), (ib, _, _)) in na.iter().zip(&nb) {
        assert_eq!(ia, ib, "{name}");
        assert_eq!(*ia, super::trainer::param_id_for(name));
    }
    let plain = crate::model::Llama::<Flex>::from_plan(&plan, &dev).unwrap();
    let ours = load_model::<Flex>(&plan, &|_| true, &dev).unwrap();
    let flat: Vec<i64> = docs(2, 12, 256, 9)
        .into_iter()
        .flatten()
        .map(i64::from)
        .collect();
    let toks = Tensor::<Flex, 2, Int>::from_data(TensorData::new(flat, [2, 12]), &dev);
    let x: Vec<f32> = plain.forward(toks.clone()).into_data().to_vec().unwrap();
    let y: Vec<f32> = ours.forward(toks).into_data().to_vec().unwrap();
    assert_eq!(bits(&x), bits(&y));
}

#[test]
fn kd_is_zero_for_identical_moe_models() {
    let dev = Default::default();
    let opts =
        surgeon_surgery::moe::MoeOptions::new(surgeon_surgery::moe::MoeMethod::SplitRandom, 4, 2);
    let plan = surgeon_surgery::moe::split(&tiny(2, 1), &opts, None).unwrap();
    let student = load_model::<AD>(&plan, &|_| true, &dev).unwrap();
    let teacher = load_model::<Flex>(&plan, &|_| false, &dev).unwrap();
    let flat: Vec<i64> = docs(2, 40, 256, 9)
        .into_iter()
        .flatten()
        .map(i64::from)
        .collect();
    let toks = Tensor::<AD, 2, Int>::from_data(TensorData::new(flat, [2, 40]), &dev);
    let s = student.forward(toks.clone());
    let t = Tensor::<AD, 3>::from_inner(teacher.forward(toks.inner()));
    let kd = kd_loss(s, t, 2.0, true).into_scalar().elem::<f32>();
    // Bitwise-equal logits (see the dense test above).
    assert_eq!(kd, 0.0);
}
