//! The [`Trainer`]: AdamW over the trainable set only, gradient accumulation, global-norm
//! clipping, row masking for new embeddings, evaluation, checkpoints and resume. One [`Trainer::step`]
//! is one optimizer update; the run loop ([`super::heal_on`]) decides when to evaluate and save.
use super::adamw::FusedAdamW;
use super::checkpoint::{self, TrainerState};
use super::clip;
use super::data::Sampler;
use super::loss::{kd_loss, kd_loss_device, lm_loss, lm_loss_fused};
use super::plan::HealPlan;
use super::schedule::lr_at;
use super::select::{AdapterKind, Selection};
use super::transfer::attention_transfer_loss;
use super::{Error, HealConfig, LossKind, MetricRow, Result};
use crate::model::{Adapter, AdapterValues, Cores, Llama, Lora, Mlp};
use crate::moe_aux::{forward_with_router_logits, load_balancing_loss};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, ElementConversion, Int, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use surgeon_formats::{DType, HostTensor, Plan, Source};

pub use super::checkpoint::{find_checkpoint, STATE_DIR};
pub use super::plan::model_fingerprint;
pub use crate::model::param_id_for;

/// A step whose loss or gradient norm was not finite (the update was not applied).
#[derive(Clone, Copy, Debug)]
pub struct Diverged {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
}

fn batch_tensor<B: Backend>(seqs: &[&Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let l = seqs[0].len();
    let flat: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [seqs.len(), l]), device)
}

/// Loads the runtime model from `plan` (stable parameter ids, [`param_id_for`]); tensors for
/// which `trainable(name)` is false do not require gradients.
pub fn load_model<B: Backend>(
    plan: &Plan,
    trainable: &dyn Fn(&str) -> bool,
    device: &B::Device,
) -> Result<Llama<B>> {
    Ok(Llama::from_plan(plan, device)?.freeze_where(|n| !trainable(n)))
}

/// Loads the student of a run selecting `sel`: [`load_model`], and for an adapter run every base
/// tensor frozen and adapters attached to the selected weights (from `saved` on a resume, else
/// initialised from `cfg`'s seed or CLOVER factors).
pub fn load_student<B: Backend>(
    base: &Plan,
    sel: &Selection,
    cfg: &HealConfig,
    saved: Option<&AdapterValues>,
    device: &B::Device,
) -> Result<Llama<B>> {
    let Some(kind) = &sel.adapter else {
        return load_model(base, &|n| sel.contains(n), device);
    };
    let model = load_model::<B>(base, &|_| false, device)?;
    let (model, adapted) = model.attach_adapters(&mut |module, lin| {
        if !sel.contains(&format!("{module}.weight")) {
            return Ok(None);
        }
        let shape = lin.weight.dims();
        Ok(Some(match *kind {
            AdapterKind::Lora { r, alpha } => {
                let (l, ids) = Lora::new(module, shape, (r, alpha), cfg.seed, saved, device);
                (Adapter::Lora(l), ids)
            }
            AdapterKind::Clover => {
                let f = cfg.clover_factors.as_ref().and_then(|f| f.get(module));
                let f = f.ok_or_else(|| {
                    Error::Invalid(format!("`clover_factors` has no factors for `{module}`"))
                })?;
                let (c, basis, ids) = Cores::new(module, shape, f, saved, device)?;
                lin.weight = Param::initialized(lin.weight.id, basis);
                (Adapter::Cores(c), ids)
            }
        }))
    })?;
    if adapted.len() != sel.names.len() {
        let missing: Vec<&String> = sel
            .names
            .iter()
            .filter(|n| !adapted.iter().any(|m| **n == format!("{m}.weight")))
            .take(3)
            .collect();
        return Err(Error::Invalid(format!(
            "`train`: {missing:?} are not weights of linear layers the runtime can adapt"
        )));
    }
    Ok(model)
}

/// Every parameter of `model` with its HF tensor name and rank.
pub fn named_params<B: Backend>(model: &Llama<B>) -> Vec<(ParamId, String, usize)> {
    let mut out = vec![];
    model.visit_named(&mut |name, p| out.push((p.id(), name.to_string(), p.rank())));
    out
}

/// Values (HF layout, f32) of the tensors of `model` named in `names`.
fn tensors_f32<B: Backend>(
    model: &Llama<B>,
    names: &[String],
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    model.visit_named(&mut |name, p| {
        if names.iter().any(|n| n == name) {
            out.insert(name.to_string(), (p.shape(), p.to_f32()));
        }
    });
    out
}

/// The `top_k` of the first routed MoE layer, `None` for a dense model.
fn moe_top_k<B: Backend>(model: &Llama<B>) -> Option<usize> {
    model.layers.iter().find_map(|l| match l.mlp() {
        Some(Mlp::Moe(m)) => Some(m.top_k),
        _ => None,
    })
}

/// Perplexity of `model` on `seqs` (each `L + 1` tokens), in batches of `batch` (the values summed
/// in order as in [`crate::eval::perplexity`]).
pub fn eval_ppl<B: Backend>(
    model: &Llama<B>,
    seqs: &[Vec<u32>],
    batch: usize,
    device: &B::Device,
) -> f64 {
    let (mut nll, mut n) = (0.0f64, 0usize);
    let mut values = Vec::new();
    for chunk in seqs.chunks(batch.max(1)) {
        let refs: Vec<&Vec<u32>> = chunk.iter().collect();
        let t = batch_tensor::<B>(&refs, device);
        let [b, l1] = t.dims();
        let input = t.slice([0..b, 0..l1 - 1]);
        let target: Vec<u32> = chunk.iter().flat_map(|s| s[1..].iter().copied()).collect();
        values.clear();
        crate::eval::nll_rows_of_tokens(model, input, &target, &mut values);
        nll = values.iter().fold(nll, |sum, v| sum + v);
        n += b * (l1 - 1);
    }
    (nll / n.max(1) as f64).exp()
}

/// Puts back the frozen rows of row-masked parameters after an optimizer step (AdamW's decoupled
/// weight decay would otherwise shrink them), so they stay bitwise unchanged.
#[derive(Clone)]
struct RestoreRows<B: AutodiffBackend> {
    /// `[V, 1]`: 1 for rows that train, 0 for the others (multiplies gradients).
    mult: Tensor<B::InnerBackend, 2>,
    /// (parameter, its original value `[V, h]`).
    targets: Vec<(ParamId, Tensor<B::InnerBackend, 2>)>,
    /// `[V, 1]`, true for rows that must not change.
    frozen_rows: Tensor<B::InnerBackend, 2, Bool>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for RestoreRows<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if let Some((_, old)) = self.targets.iter().find(|(i, _)| *i == id) {
            let dims = tensor.dims();
            let require_grad = tensor.is_require_grad();
            let inner: Tensor<B::InnerBackend, 2> = tensor.inner().reshape([dims[0], dims[1]]);
            let mask = self.frozen_rows.clone().expand([dims[0], dims[1]]);
            let restored = inner.mask_where(mask, old.clone()).reshape(dims);
            let t = Tensor::<B, D>::from_inner(restored).set_require_grad(require_grad);
            return Param::from_mapped_value(id, t, mapper);
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

impl<B: AutodiffBackend> RestoreRows<B> {
    /// For `new-embeddings`: only `rows` of the trainable (embedding) parameters change.
    fn new(
        model: &Llama<B>,
        params: &[(ParamId, String, usize)],
        rows: &[u32],
        vocab: usize,
        device: &B::Device,
    ) -> Self {
        let mut keep = vec![true; vocab];
        for &r in rows {
            keep[r as usize] = false;
        }
        let mult: Vec<f32> = keep.iter().map(|&k| if k { 0.0 } else { 1.0 }).collect();
        let names: Vec<String> = params.iter().map(|(_, n, _)| n.clone()).collect();
        let mut current = tensors_f32(model, &names);
        let targets = params
            .iter()
            .map(|(id, name, _)| {
                let (shape, vals) = current.remove(name).expect("embedding tensor");
                (*id, Tensor::from_data(TensorData::new(vals, shape), device))
            })
            .collect();
        RestoreRows {
            mult: Tensor::from_data(TensorData::new(mult, [vocab, 1]), device),
            targets,
            frozen_rows: Tensor::from_data(TensorData::new(keep, [vocab, 1]), device),
        }
    }

    /// Zeroes the gradient rows of frozen rows.
    fn mask_grads(&self, grads: &mut GradientsParams) {
        for (id, _) in &self.targets {
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(*id) {
                let [v, h] = g.dims();
                grads.register(*id, g * self.mult.clone().expand([v, h]));
            }
        }
    }
}

/// A copy of `base` whose trainable tensors hold the model's current values, adapters merged (f32
/// when `as_f32`, else in each entry's dtype).
fn export_plan<B: AutodiffBackend>(
    base: &Plan,
    model: &Llama<B>,
    names: &[String],
    as_f32: bool,
    label: &str,
) -> Result<Plan> {
    let mut plan = base.clone();
    let mut values = tensors_f32(&model.valid().merge_adapters(), names);
    for name in names {
        let (shape, values) = values
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("the training model has no tensor `{name}`")))?;
        let e = plan.tensors.get_mut(name).expect("selected names exist");
        let dtype = if as_f32 { DType::F32 } else { e.dtype };
        *e = surgeon_formats::TensorEntry {
            source: Source::inline(label, HostTensor::from_f32(shape, &values)),
            dtype,
        };
    }
    Ok(plan)
}

/// What the loss of a shard needs besides the models (copied into each device's thread).
#[derive(Clone, Copy)]
struct LossSpec {
    loss: LossKind,
    temperature: f64,
    kd_scale_t2: bool,
    kd_weight: f64,
    aux_coef: f64,
    moe_k: Option<usize>,
    /// On the CPU the logits are already on the host: the fused losses save ~20 passes over
    /// `[b, t, V]`; elsewhere they stay on the device.
    fused: bool,
}

impl LossSpec {
    fn new(cfg: &HealConfig, moe_k: Option<usize>) -> Self {
        LossSpec {
            loss: cfg.loss,
            temperature: cfg.temperature,
            kd_scale_t2: cfg.kd_scale_t2,
            kd_weight: cfg.kd_weight,
            aux_coef: cfg.aux_coef,
            moe_k,
            fused: cfg.backend == crate::BackendKind::Cpu,
        }
    }
}

/// The loss of one micro-batch of `input` / `target` (LM, KD or both, plus MoE balancing), f32.
fn batch_loss<B: AutodiffBackend>(
    spec: LossSpec,
    model: &Llama<B>,
    teacher: Option<&Llama<B::InnerBackend>>,
    input: Tensor<B, 2, Int>,
    target: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    if spec.loss.is_attention_transfer() {
        let teacher = teacher.expect("checked by HealPlan");
        return attention_transfer_loss(model, teacher, input, spec.loss);
    }
    let (logits, router_logits) = match spec.moe_k {
        Some(_) => forward_with_router_logits(model, input.clone()),
        None => (model.forward(input.clone()), vec![]),
    };
    let teacher_logits = || {
        let t = teacher.expect("checked by HealPlan");
        Tensor::<B, 3>::from_inner(t.forward(input.clone().inner()))
    };
    let (temp, t2) = (spec.temperature, spec.kd_scale_t2);
    let (kd, lm) = match spec.fused {
        true => (kd_loss::<B> as KdFn<B>, lm_loss_fused::<B> as LmFn<B>),
        false => (kd_loss_device::<B> as KdFn<B>, lm_loss::<B> as LmFn<B>),
    };
    let loss = match spec.loss {
        LossKind::Lm => lm(logits, target),
        LossKind::Kd => kd(logits, teacher_logits(), temp, t2),
        LossKind::KdLm => {
            let kd = kd(logits.clone(), teacher_logits(), temp, t2);
            kd.mul_scalar(spec.kd_weight) + lm(logits, target).mul_scalar(1.0 - spec.kd_weight)
        }
        LossKind::AttentionTransfer | LossKind::AttentionWeights => {
            unreachable!("returned above")
        }
    };
    match spec.moe_k {
        Some(k) if spec.aux_coef != 0.0 => {
            loss + load_balancing_loss(&router_logits, k).mul_scalar(spec.aux_coef)
        }
        _ => loss,
    }
}

/// Forward and backward of one shard (`L + 1` tokens per sequence) on `device` with its copies
/// of the models: the gradients of `loss / div`, moved to `main`, and the loss.
fn shard_grads<B: AutodiffBackend>(
    spec: LossSpec,
    model: Llama<B>,
    teacher: Option<Llama<B::InnerBackend>>,
    seqs: Vec<Vec<u32>>,
    div: f64,
    device: &B::Device,
    main: &B::Device,
) -> (GradientsParams, f64) {
    let refs: Vec<&Vec<u32>> = seqs.iter().collect();
    let tokens = batch_tensor::<B>(&refs, device);
    let [b, l1] = tokens.dims();
    let input = tokens.clone().slice([0..b, 0..l1 - 1]);
    let target = tokens.slice([0..b, 1..l1]);
    let loss = batch_loss(spec, &model, teacher.as_ref(), input, target);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.div_scalar(div).backward();
    let grads = GradientsParams::from_grads(grads, &model);
    let grads = match device == main {
        true => grads,
        false => grads.to_device(main, &model),
    };
    (grads, value)
}

/// A device after the first, with its copy of the teacher.
type Replica<B> = (
    burn::tensor::Device<B>,
    Option<Llama<<B as AutodiffBackend>::InnerBackend>>,
);

type AdamWOf<B> = OptimizerAdaptor<FusedAdamW, Llama<B>, B>;
type KdFn<B> = fn(Tensor<B, 3>, Tensor<B, 3>, f64, bool) -> Tensor<B, 1>;
type LmFn<B> = fn(Tensor<B, 3>, Tensor<B, 2, Int>) -> Tensor<B, 1>;

/// A healing run in progress: the student under training, its optimizer, the teacher, the data
/// position and the metrics so far.
pub struct Trainer<'p, B: AutodiffBackend> {
    plan: &'p HealPlan,
    /// The student with the tensors it started from (the checkpoint's on a resume).
    base: Plan,
    /// Taken out only while the optimizer rebuilds it ([`Trainer::step`]).
    model: Option<Llama<B>>,
    teacher: Option<Llama<B::InnerBackend>>,
    /// Data parallelism: every device after the first with its copy of the teacher (see
    /// [`Trainer::start_on`]).
    replicas: Vec<Replica<B>>,
    optim: AdamWOf<B>,
    /// Trainable parameters: id, HF name, rank.
    params: Vec<(ParamId, String, usize)>,
    rows: Option<RestoreRows<B>>,
    moe_k: Option<usize>,
    sampler: Sampler,
    state: TrainerState,
    metrics: Vec<MetricRow>,
    device: B::Device,
}

impl<'p, B: AutodiffBackend> Trainer<'p, B> {
    /// A fresh run of `plan` on `student` (distilling from `teacher` if given); evaluates the
    /// starting model on the held-out data (metric row 0).
    pub fn start(
        plan: &'p HealPlan,
        student: &Plan,
        teacher: Option<&Plan>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::start_on(plan, student, teacher, std::slice::from_ref(device))
    }

    /// [`Trainer::start`] data-parallel over `devices` (the first holds the model and the
    /// optimizer): every micro-batch is split into equal shards, one per device, whose gradients
    /// are summed on the first device before the update (burn-train's multi-device strategy with
    /// the optimizer on the main device).
    pub fn start_on(
        plan: &'p HealPlan,
        student: &Plan,
        teacher: Option<&Plan>,
        devices: &[B::Device],
    ) -> Result<Self> {
        let optim = Self::optimizer(plan);
        let mut t = Self::build(plan, student.clone(), teacher, optim, None, devices)?;
        let ppl = t.evaluate();
        t.state.eval_ppl_before = Some(ppl);
        t.metrics.push(MetricRow {
            step: 0,
            tokens: 0,
            loss: f64::NAN,
            lr: 0.0,
            grad_norm: 0.0,
            eval_ppl: Some(ppl),
        });
        Ok(t)
    }

    /// Continues `plan` from the checkpoint directory `dir` (see [`find_checkpoint`]), after
    /// checking that it was written by the same run ([`HealPlan::check_resume`]).
    pub fn resume(
        plan: &'p HealPlan,
        student: &Plan,
        teacher: Option<&Plan>,
        dir: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        Self::resume_on(plan, student, teacher, dir, std::slice::from_ref(device))
    }

    /// [`Trainer::resume`] data-parallel over `devices` (see [`Trainer::start_on`]).
    pub fn resume_on(
        plan: &'p HealPlan,
        student: &Plan,
        teacher: Option<&Plan>,
        dir: &Path,
        devices: &[B::Device],
    ) -> Result<Self> {
        let device = &devices[0];
        let state = checkpoint::read_state(dir)?;
        plan.check_resume(&state, dir)?;
        let (base, saved) = match plan.sel.adapter {
            Some(_) => (student.clone(), Some(checkpoint::read_adapters(dir)?)),
            None => (Self::resumed_base(plan, student, dir)?, None),
        };
        let metrics = checkpoint::read_metrics(dir, &state)?;
        let optim = checkpoint::load_optimizer(dir, Self::optimizer(plan), device)?;
        let mut t = Self::build(plan, base, teacher, optim, saved.as_ref(), devices)?;
        t.state = state;
        t.metrics = metrics;
        Ok(t)
    }

    /// `student` with the trained tensors of the checkpoint `dir`.
    fn resumed_base(plan: &HealPlan, student: &Plan, dir: &Path) -> Result<Plan> {
        let mut base = student.clone();
        let ck = surgeon_formats::open_hf_dir(dir)?;
        let d = dir.display();
        for name in &plan.sel.names {
            let (shape, v) = ck
                .load_f32(name)
                .map_err(|e| Error::Checkpoint(format!("{d}: cannot read `{name}`: {e}")))?;
            let e = base.tensors.get_mut(name).expect("selected");
            if e.shape() != shape {
                return Err(Error::Checkpoint(format!(
                    "{d}: `{name}` has shape {shape:?}, the model has {:?}",
                    e.shape()
                )));
            }
            e.source = Source::inline("resumed", HostTensor::from_f32(shape, &v));
        }
        Ok(base)
    }

    fn optimizer(plan: &HealPlan) -> AdamWOf<B> {
        OptimizerAdaptor::from(FusedAdamW::new(
            0.9,
            0.999,
            1e-8,
            plan.cfg.weight_decay as f32,
        ))
    }

    fn build(
        plan: &'p HealPlan,
        base: Plan,
        teacher: Option<&Plan>,
        optim: AdamWOf<B>,
        saved: Option<&AdapterValues>,
        devices: &[B::Device],
    ) -> Result<Self> {
        let device = devices.first().expect("at least one device");
        let n = devices.len();
        if !plan.cfg.batch.is_multiple_of(n) {
            return Err(Error::Invalid(format!(
                "`--devices`: the batch ({}) must be a multiple of the number of devices ({n})",
                plan.cfg.batch
            )));
        }
        let sel = &plan.sel;
        let precision = plan.cfg.precision;
        if !precision.supported::<B>(device) {
            return Err(Error::Unsupported(format!(
                "`--precision {precision}`: backend `{}` cannot compute in {precision} on this \
                 device (use `--precision f32`)",
                plan.cfg.backend
            )));
        }
        let model = load_student::<B>(&base, sel, &plan.cfg, saved, device)?
            .with_compute(precision.compute());
        let teacher = match teacher {
            Some(t) => {
                let t = load_model::<B::InnerBackend>(t, &|_| false, device)?;
                Some(match precision.compute() {
                    Some(dt) => t.stored_in(dt),
                    None => t,
                })
            }
            None => None,
        };
        let params: Vec<_> = named_params(&model)
            .into_iter()
            .filter(|(_, n, _)| sel.trains(n))
            .collect();
        let vocab = base.arch.vocab_size;
        let rows = sel
            .rows
            .as_ref()
            .map(|r| RestoreRows::new(&model, &params, r, vocab, device));
        let replicas = devices[1..]
            .iter()
            .map(|d| (d.clone(), teacher.as_ref().map(|t| t.clone().fork(d))))
            .collect();
        Ok(Trainer {
            plan,
            base,
            moe_k: moe_top_k(&model),
            model: Some(model),
            teacher,
            replicas,
            optim,
            params,
            rows,
            sampler: Sampler::new(plan.data.train.len(), plan.cfg.seed),
            state: plan.initial_state(),
            metrics: vec![],
            device: device.clone(),
        })
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// True when every step of the plan is done.
    pub fn done(&self) -> bool {
        self.state.step >= self.plan.total_steps
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The metric rows so far (row 0: before training).
    pub fn metrics(&self) -> &[MetricRow] {
        &self.metrics
    }

    /// Appends a row (from [`Trainer::step`], possibly with an evaluation added).
    pub fn record(&mut self, row: MetricRow) {
        self.metrics.push(row);
    }

    /// The student as it is now.
    pub fn model(&self) -> &Llama<B> {
        self.model
            .as_ref()
            .expect("the model is back after every step")
    }

    /// Held-out perplexity of the current weights.
    pub fn evaluate(&self) -> f64 {
        let seqs = &self.plan.data.eval;
        let model = self.model().valid();
        // Batches as `surgeon eval`'s default (not the training batch): the same value, faster.
        let window = seqs.first().map_or(1, |s| s.len().saturating_sub(1));
        let batch = crate::eval::auto_batch::<B::InnerBackend>(window, model.vocab_size());
        eval_ppl(&model, seqs, batch, &self.device)
    }

    /// Forward and backward over `grad_accum` micro-batches, each split over the devices: the
    /// summed gradients (on the first device) and the mean loss.
    pub(super) fn accumulate(&mut self) -> (GradientsParams, f64) {
        let plan = self.plan;
        let cfg = &plan.cfg;
        let train = &plan.data.train;
        let n = 1 + self.replicas.len();
        let spec = LossSpec::new(cfg, self.moe_k);
        // Each shard's loss is a mean over its tokens: shards of equal size summed, each divided
        // by (micro-batches * devices), give the mean over the whole step.
        let div = (cfg.grad_accum * n) as f64;
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_sum = 0.0f64;
        for _ in 0..cfg.grad_accum {
            let seqs: Vec<Vec<u32>> = (0..cfg.batch)
                .map(|_| {
                    let i = self.sampler.index(self.state.samples);
                    self.state.samples += 1;
                    train[i].clone()
                })
                .collect();
            let model = self.model();
            let main = (model.clone(), self.teacher.clone(), self.device.clone());
            let shards = seqs.chunks(cfg.batch / n).map(|c| c.to_vec());
            let results = if n == 1 {
                let (m, t, d) = main;
                vec![shard_grads(spec, m, t, seqs, div, &d, &self.device)]
            } else {
                let jobs = std::iter::once(main).chain(
                    self.replicas
                        .iter()
                        .map(|(d, t)| (model.clone().fork(d), t.clone(), d.clone())),
                );
                std::thread::scope(|s| {
                    let handles: Vec<_> = jobs
                        .zip(shards)
                        .map(|((m, t, d), shard)| {
                            let main = self.device.clone();
                            s.spawn(move || shard_grads(spec, m, t, shard, div, &d, &main))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a device's shard panicked"))
                        .collect()
                })
            };
            for (grads, loss) in results {
                loss_sum += loss / n as f64;
                acc.accumulate(model, grads);
            }
        }
        (acc.grads(), loss_sum / cfg.grad_accum as f64)
    }

    /// Masks frozen rows, clips to the global norm and applies AdamW (then restores frozen rows).
    /// Returns the gradient norm before clipping.
    fn optimize(
        &mut self,
        mut grads: GradientsParams,
        lr: f64,
        loss: f64,
    ) -> Result<f64, Diverged> {
        if let Some(r) = &self.rows {
            r.mask_grads(&mut grads);
        }
        let norm = clip::grad_norm::<B>(&grads, &self.params);
        if let Some(c) = self.plan.cfg.clip {
            if norm > c {
                let f = c / (norm + 1e-6);
                clip::scale_grads::<B>(&mut grads, &self.params, f);
            }
        }
        // A non-finite loss or gradient would poison every weight: stop before the update.
        if !(loss.is_finite() && norm.is_finite()) {
            return Err(Diverged {
                step: self.state.step + 1,
                loss,
                grad_norm: norm,
            });
        }
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        let mut model = self.optim.step(lr, model, grads);
        if let Some(r) = &self.rows {
            model = model.map(&mut r.clone());
        }
        self.model = Some(model);
        Ok(norm)
    }

    /// One optimizer step at the schedule's learning rate; the returned row (not yet recorded,
    /// no evaluation) describes it. A non-finite loss or gradient norm stops before the update
    /// and leaves the model as it was.
    pub fn step(&mut self) -> Result<MetricRow, Diverged> {
        let plan = self.plan;
        let cfg = &plan.cfg;
        let total = plan.total_steps;
        let lr = lr_at(cfg.schedule, cfg.lr, cfg.warmup, total, self.state.step);
        let (grads, loss) = self.accumulate();
        let grad_norm = self.optimize(grads, lr, loss)?;
        self.state.step += 1;
        Ok(MetricRow {
            step: self.state.step,
            tokens: self.state.step * plan.tokens_per_step,
            loss,
            lr,
            grad_norm,
            eval_ppl: None,
        })
    }

    /// Saves a checkpoint into `out/checkpoints/step-N` (and the metrics so far into
    /// `out/metrics.csv`); returns its directory.
    pub fn checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(out, self.state.step);
        let names = &self.plan.sel.names;
        let mut weights = export_plan(&self.base, self.model(), names, true, "healing checkpoint")?;
        weights.arch.surgeon.history.push(format!(
            "{} (checkpoint at step {})",
            self.plan.history_line, self.state.step
        ));
        let adapters = self.model().adapter_values();
        checkpoint::save(
            &dir,
            &weights,
            &self.optim,
            &self.state,
            &self.metrics,
            &adapters,
        )?;
        super::metrics::write_csv(&out.join("metrics.csv"), &self.metrics)?;
        Ok(dir)
    }

    /// The healed model: `base` with the trained tensors in their declared dtypes, its history
    /// and model-card note extended.
    pub fn finish(self) -> Result<Plan> {
        let names = &self.plan.sel.names;
        let mut plan = export_plan(&self.base, self.model(), names, false, "healed")?;
        let after = self.metrics.last().and_then(|r| r.eval_ppl);
        plan.arch
            .surgeon
            .history
            .push(self.plan.history_line.clone());
        let note = self.plan.note(self.state.eval_ppl_before, after);
        plan.arch.surgeon.notes.push(note);
        Ok(plan)
    }
}
