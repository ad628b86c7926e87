//! Healing at scale, checked on the CPU: bf16 mixed precision, activation checkpointing and
//! data parallelism over several devices.
use super::loss::lm_loss;
use super::tests::{cfg, docs, tiny, AD};
use super::trainer::named_params;
use super::*;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use std::collections::BTreeMap;

/// Every float parameter's dtype.
struct Dtypes(Vec<DType>);
impl<B: Backend> ModuleVisitor<B> for Dtypes {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.0.push(p.val().dtype());
    }
}

/// A KD run of a 2-layer student from a 3-layer teacher (batch 4, one micro-batch per step).
fn kd_cfg(out: &std::path::Path) -> HealConfig {
    HealConfig {
        loss: LossKind::KdLm,
        batch: 4,
        ..cfg(out)
    }
}

fn plan_of(c: &HealConfig) -> (HealPlan, surgeon_formats::Plan, surgeon_formats::Plan) {
    let (student, teacher) = (tiny(2, 3), tiny(3, 4));
    let plan = HealPlan::new(c, &student, Some(&teacher)).unwrap();
    (plan, student, teacher)
}

/// The gradients of one step by parameter name, as f32 values.
fn grads_of<B: AutodiffBackend>(t: &mut Trainer<'_, B>) -> (BTreeMap<String, Vec<f32>>, f64) {
    let (grads, loss): (GradientsParams, f64) = t.accumulate();
    let mut out = BTreeMap::new();
    for (id, name, rank) in named_params(t.model()) {
        let v: Option<Vec<f32>> = match rank {
            1 => grads
                .get::<B::InnerBackend, 1>(id)
                .map(|g| g.into_data().to_vec().unwrap()),
            2 => grads
                .get::<B::InnerBackend, 2>(id)
                .map(|g| g.into_data().to_vec().unwrap()),
            _ => None,
        };
        if let Some(v) = v {
            out.insert(name, v);
        }
    }
    (out, loss)
}

fn max_abs_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn bf16_healing_keeps_f32_master_weights_optimizer_and_loss() {
    let dir = tempfile::tempdir().unwrap();
    let c = HealConfig {
        precision: Precision::Bf16,
        ..kd_cfg(&dir.path().join("h"))
    };
    let (plan, student, teacher) = plan_of(&c);
    let dev = Default::default();
    let mut t = Trainer::<AD>::start(&plan, &student, Some(&teacher), &dev).unwrap();
    let mut f32_plan = plan.clone();
    f32_plan.cfg.precision = Precision::F32;
    let mut f = Trainer::<AD>::start(&f32_plan, &student, Some(&teacher), &dev).unwrap();
    for _ in 0..3 {
        let (rb, rf) = (t.step().unwrap(), f.step().unwrap());
        assert!(rb.loss.is_finite());
        // bf16 rounding shows in the loss, and stays small on a tiny model.
        assert_ne!(rb.loss, rf.loss);
        assert!(
            (rb.loss - rf.loss).abs() < 0.02 * rf.loss,
            "{rb:?} vs {rf:?}"
        );
    }
    let mut d = Dtypes(vec![]);
    t.model().visit(&mut d);
    assert!(
        !d.0.is_empty() && d.0.iter().all(|&x| x == DType::F32),
        "{:?}",
        d.0
    );
    // Gradients arrive in f32, so AdamW's moments (elementwise in the gradients' dtype) are f32.
    let (grads, _) = t.accumulate();
    for (id, _, rank) in named_params(t.model()) {
        let dtype = match rank {
            1 => grads.get::<Flex, 1>(id).map(|g| g.dtype()),
            _ => grads.get::<Flex, 2>(id).map(|g| g.dtype()),
        };
        assert_eq!(dtype, Some(DType::F32));
    }
    // The loss of the mixed-precision forward is an f32 tensor.
    let tokens = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(docs(2, 9, 256, 5).concat(), [2, 9]).convert::<i64>(),
        &dev,
    );
    let logits = t.model().forward(tokens.clone().slice([0..2, 0..8]));
    assert_eq!(logits.dtype(), DType::F32);
    assert_eq!(
        lm_loss(logits, tokens.slice([0..2, 1..9])).dtype(),
        DType::F32
    );
}

/// The f32 path (now split into shards) computes exactly the loss and gradients of the plain
/// model on the same batch: `W * KD + (1 - W) * LM`, backward, bit for bit.
#[test]
fn f32_precision_is_the_plain_model_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let c = kd_cfg(&dir.path().join("h"));
    let (plan, student, teacher) = plan_of(&c);
    let dev = Default::default();
    let mut t = Trainer::<AD>::start(&plan, &student, Some(&teacher), &dev).unwrap();
    let (g, loss) = grads_of(&mut t);
    let model = super::trainer::load_model::<AD>(&student, &|_| true, &dev).unwrap();
    assert!(model.layers[0]
        .self_attn()
        .unwrap()
        .q_proj
        .compute
        .is_none());
    let tm = super::trainer::load_model::<Flex>(&teacher, &|_| false, &dev).unwrap();
    let mut sampler = super::data::Sampler::new(plan.data.train.len(), c.seed);
    let rows: Vec<i64> = (0..4)
        .flat_map(|k| plan.data.train[sampler.index(k)].iter().map(|&x| x as i64))
        .collect();
    let l = c.seq_len;
    let tokens = Tensor::<AD, 2, Int>::from_data(TensorData::new(rows, [4, l + 1]), &dev);
    let input = tokens.clone().slice([0..4, 0..l]);
    let logits = model.forward(input.clone());
    let tl = Tensor::<AD, 3>::from_inner(tm.forward(input.inner()));
    let w = c.kd_weight;
    let reference = super::loss::kd_loss(logits.clone(), tl, c.temperature, true).mul_scalar(w)
        + super::loss::lm_loss_fused(logits, tokens.slice([0..4, 1..l + 1])).mul_scalar(1.0 - w);
    let rl: f64 = reference.clone().into_scalar().elem();
    assert_eq!(rl.to_bits(), loss.to_bits());
    let rg = GradientsParams::from_grads(reference.div_scalar(1.0).backward(), &model);
    for (id, name, rank) in named_params(&model) {
        let v: Vec<f32> = match rank {
            1 => rg.get::<Flex, 1>(id).unwrap().into_data().to_vec().unwrap(),
            _ => rg.get::<Flex, 2>(id).unwrap().into_data().to_vec().unwrap(),
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&v), bits(&g[&name]), "{name}");
    }
}

#[test]
fn checkpointed_activations_give_the_same_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let c = kd_cfg(&dir.path().join("h"));
    let (plan, student, teacher) = plan_of(&c);
    let dev = Default::default();
    type Ck = Autodiff<Flex, BalancedCheckpointing>;
    let mut plain = Trainer::<AD>::start(&plan, &student, Some(&teacher), &dev).unwrap();
    let mut ck = Trainer::<Ck>::start(&plan, &student, Some(&teacher), &dev).unwrap();
    for _ in 0..2 {
        let (a, la) = grads_of(&mut plain);
        let (b, lb) = grads_of(&mut ck);
        // Recomputation repeats the same operations on the same values: bitwise equal.
        assert_eq!(la.to_bits(), lb.to_bits());
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        assert!(a.values().any(|v| v.iter().any(|&x| x != 0.0)));
    }
}

#[test]
fn two_devices_give_the_full_batch_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let c = kd_cfg(&dir.path().join("h"));
    let (plan, student, teacher) = plan_of(&c);
    let dev = burn::backend::flex::FlexDevice;
    let mut one = Trainer::<AD>::start(&plan, &student, Some(&teacher), &dev).unwrap();
    // Flex has one device: two replicas on it run the whole data-parallel path (shards, threads,
    // a teacher per replica, gradients summed on the first device).
    let devs = [dev, dev];
    let mut two = Trainer::<AD>::start_on(&plan, &student, Some(&teacher), &devs).unwrap();
    for _ in 0..2 {
        let (a, la) = grads_of(&mut one);
        let (b, lb) = grads_of(&mut two);
        assert!((la - lb).abs() < 1e-6, "{la} vs {lb}");
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-6, "max |g1 - g2| = {d}");
        assert!(a.values().any(|v| v.iter().any(|&x| x.abs() > 1e-4)));
    }
    // A whole step: the same loss and the same update within f32 rounding.
    let (r1, r2) = (one.step().unwrap(), two.step().unwrap());
    assert!((r1.loss - r2.loss).abs() < 1e-6 && (r1.grad_norm - r2.grad_norm).abs() < 1e-6);
    let batch3 = HealConfig { batch: 3, ..c };
    let plan3 = HealPlan::new(&batch3, &student, Some(&teacher)).unwrap();
    let err = Trainer::<AD>::start_on(&plan3, &student, Some(&teacher), &devs)
        .err()
        .expect("an odd batch over two devices is refused");
    assert!(
        err.to_string()
            .contains("multiple of the number of devices"),
        "{err}"
    );
}

#[test]
fn cpu_refuses_several_devices_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let c = HealConfig {
        devices: vec![0, 1],
        ..kd_cfg(&dir.path().join("h"))
    };
    let err = heal(&c, tiny(2, 3), Some(tiny(3, 4))).unwrap_err();
    assert!(
        err.to_string().contains("the cpu backend has one device"),
        "{err}"
    );
    let twice = HealConfig {
        devices: vec![0, 0],
        ..c
    };
    let err = heal(&twice, tiny(2, 3), None).unwrap_err();
    assert!(err.to_string().contains("names a device twice"), "{err}");
}
