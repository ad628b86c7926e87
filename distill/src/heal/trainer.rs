//! The training loop: AdamW over the trainable set only, gradient accumulation, global-norm
//! clipping, row masking for new embeddings, periodic eval, checkpoints and resume.
use super::data::{prepare, Dataset, Sampler};
use super::loss::{kd_loss, lm_loss, nll_sum};
use super::metrics::{plot_loss, read_csv, write_csv};
use super::schedule::lr_at;
use super::select::{resolve, Selection};
use super::{
    io_err, Budget, HealConfig, HealError, HealReport, LossKind, MetricRow, Result, TrainSet,
};
use crate::model::{check_supported, Llama, Mlp, NamedParamMapper, ParamRef};
use crate::moe_aux::{forward_with_router_logits, load_balancing_loss};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, ElementConversion, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;
use surgeon_formats::{write_model, DType, HostTensor, Plan, Source, TensorEntry, WriteOptions};

/// Subdirectory of a checkpoint holding everything but the weights.
pub const STATE_DIR: &str = "trainer_state";
const STATE_FILE: &str = "state.json";
const OPTIM_FILE: &str = "optimizer"; // the recorder appends `.bin`

/// What a checkpoint records besides weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Training sequences consumed (the data position; the order is a function of the seed).
    pub samples: u64,
    /// Fingerprint of the model being healed (architecture, tensor names and shapes, final norm).
    pub model_fingerprint: String,
    /// Fingerprint of the packed training sequences.
    pub data_fingerprint: String,
    /// Settings that must not change across a resume, as text.
    pub trajectory: String,
    pub trainable: Vec<String>,
    pub eval_ppl_before: Option<f64>,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

/// Fingerprint of a model: names and shapes of all tensors plus the final norm's values.
pub fn model_fingerprint(plan: &Plan) -> Result<String> {
    let mut h = 0xcbf29ce484222325u64;
    for (name, e) in &plan.tensors {
        fnv(&mut h, name.as_bytes());
        for d in e.shape() {
            fnv(&mut h, &(d as u64).to_le_bytes());
        }
    }
    if plan.tensors.contains_key("model.norm.weight") {
        let (_, v) = plan.load_f32("model.norm.weight")?;
        for x in v {
            fnv(&mut h, &x.to_le_bytes());
        }
    }
    Ok(format!("{h:016x}"))
}

fn data_fingerprint(seqs: &[Vec<u32>]) -> String {
    let mut h = 0xcbf29ce484222325u64;
    for s in seqs {
        for t in s {
            fnv(&mut h, &t.to_le_bytes());
        }
        fnv(&mut h, b"|");
    }
    format!("{h:016x}")
}

/// Checks options that need no model.
fn check_options(cfg: &HealConfig) -> Result<()> {
    let bad = |m: String| Err(HealError::Invalid(m));
    if cfg.seq_len == 0 || cfg.batch == 0 || cfg.grad_accum == 0 {
        return bad("--seq-len, --batch and --grad-accum must be positive".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!("--lr must be positive, got {}", cfg.lr));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return bad(format!(
            "--temperature must be positive, got {}",
            cfg.temperature
        ));
    }
    if !(0.0..=1.0).contains(&cfg.kd_weight) {
        return bad(format!(
            "--kd-weight must be in [0, 1], got {}",
            cfg.kd_weight
        ));
    }
    if !(cfg.aux_coef.is_finite() && cfg.aux_coef >= 0.0) {
        return bad(format!(
            "--aux-coef must be finite and not negative, got {}",
            cfg.aux_coef
        ));
    }
    if cfg.weight_decay < 0.0 {
        return bad("--weight-decay must not be negative".into());
    }
    if let Some(c) = cfg.clip {
        if c <= 0.0 {
            return bad("--clip must be positive".into());
        }
    }
    match cfg.budget {
        Budget::Steps(0) | Budget::Tokens(0) => bad("nothing to do: --steps/--tokens is 0".into()),
        _ => Ok(()),
    }
}

/// Finds `dir/trainer_state`, or the latest `dir/checkpoints/step-*` holding one.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_DIR).join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let ck = dir.join("checkpoints");
    let mut best: Option<(u64, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir(&ck) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if e.path().join(STATE_DIR).join(STATE_FILE).is_file()
                    && best.as_ref().is_none_or(|b| n > b.0)
                {
                    best = Some((n, e.path()));
                }
            }
        }
    }
    best.map(|b| b.1).ok_or_else(|| {
        HealError::Checkpoint(format!(
            "{} is not a checkpoint (no {STATE_DIR}/{STATE_FILE}, no checkpoints/step-*)",
            dir.display()
        ))
    })
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_DIR).join(STATE_FILE);
    let s = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    serde_json::from_str(&s).map_err(|e| HealError::Checkpoint(format!("{}: {e}", p.display())))
}

fn batch_tensor<B: Backend>(seqs: &[&Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let l = seqs[0].len();
    let flat: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [seqs.len(), l]), device)
}

/// A stable parameter id from an HF tensor name (FNV-1a), so that ids agree across processes and
/// optimizer records survive a reload (resume).
pub fn param_id_for(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    fnv(&mut h, name.as_bytes());
    ParamId::from(h)
}

/// Gives every parameter its stable id and marks only the trainable ones as requiring gradients.
struct StableIds<'a> {
    trainable: &'a dyn Fn(&str) -> bool,
}

impl<B: Backend> NamedParamMapper<B> for StableIds<'_> {
    fn map_vector(&mut self, name: &str, p: Param<Tensor<B, 1>>) -> Param<Tensor<B, 1>> {
        Param::initialized(param_id_for(name), p.val()).set_require_grad((self.trainable)(name))
    }
    fn map_matrix(&mut self, name: &str, p: Param<Tensor<B, 2>>) -> Param<Tensor<B, 2>> {
        Param::initialized(param_id_for(name), p.val()).set_require_grad((self.trainable)(name))
    }
}

/// Loads the runtime model from `plan` with stable parameter ids ([`param_id_for`]); tensors for
/// which `trainable(name)` is false do not require gradients.
pub fn load_model<B: Backend>(
    plan: &Plan,
    trainable: &dyn Fn(&str) -> bool,
    device: &B::Device,
) -> Result<Llama<B>> {
    Ok(Llama::from_plan(plan, device)?.map_named(&mut StableIds { trainable }))
}

/// Every parameter of `model` with its HF tensor name and rank.
pub fn named_params<B: Backend>(model: &Llama<B>) -> Vec<(ParamId, String, usize)> {
    let mut out = vec![];
    model.visit_named(&mut |name, p| {
        let rank = match p {
            ParamRef::Vector(_) => 1,
            ParamRef::Matrix(_) => 2,
        };
        out.push((p.id(), name.to_string(), rank));
    });
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
    model.layers.iter().find_map(|l| match &l.mlp {
        Mlp::Moe(m) => Some(m.top_k),
        Mlp::Dense(_) => None,
    })
}

/// Perplexity of `model` on `seqs` (each `L + 1` tokens), in batches of `batch`.
pub fn eval_ppl<B: Backend>(
    model: &Llama<B>,
    seqs: &[Vec<u32>],
    batch: usize,
    device: &B::Device,
) -> f64 {
    let mut nll = 0.0f64;
    let mut n = 0usize;
    for chunk in seqs.chunks(batch.max(1)) {
        let refs: Vec<&Vec<u32>> = chunk.iter().collect();
        let t = batch_tensor::<B>(&refs, device);
        let [b, l1] = t.dims();
        let input = t.clone().slice([0..b, 0..l1 - 1]);
        let target = t.slice([0..b, 1..l1]);
        let logits = model.forward(input);
        nll += nll_sum(logits, target).into_scalar().elem::<f64>();
        n += b * (l1 - 1);
    }
    (nll / n.max(1) as f64).exp()
}

/// Sum of squares of the gradient of parameter `id` (rank 1 or 2).
fn grad_sq<B: AutodiffBackend>(g: &GradientsParams, id: ParamId, rank: usize) -> f64 {
    let v = match rank {
        1 => g
            .get::<B::InnerBackend, 1>(id)
            .map(|t| t.powi_scalar(2).sum().into_scalar().elem::<f64>()),
        _ => g
            .get::<B::InnerBackend, 2>(id)
            .map(|t| t.powi_scalar(2).sum().into_scalar().elem::<f64>()),
    };
    v.unwrap_or(0.0)
}

fn scale_grad<B: AutodiffBackend>(g: &mut GradientsParams, id: ParamId, rank: usize, f: f64) {
    match rank {
        1 => {
            if let Some(t) = g.remove::<B::InnerBackend, 1>(id) {
                g.register(id, t.mul_scalar(f));
            }
        }
        _ => {
            if let Some(t) = g.remove::<B::InnerBackend, 2>(id) {
                g.register(id, t.mul_scalar(f));
            }
        }
    }
}

/// Puts back the frozen rows of row-masked parameters after an optimizer step (AdamW's decoupled
/// weight decay would otherwise shrink them), so they stay bitwise unchanged.
struct RestoreRows<B: AutodiffBackend> {
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

/// A copy of `base` whose trainable tensors hold the model's current values (f32 when `as_f32`,
/// else in each entry's dtype).
fn export_plan<B: Backend>(
    base: &Plan,
    model: &Llama<B>,
    sel: &Selection,
    as_f32: bool,
    label: &str,
) -> Result<Plan> {
    let mut plan = base.clone();
    let mut values = tensors_f32(model, &sel.names);
    for name in &sel.names {
        let (shape, values) = values.remove(name).ok_or_else(|| {
            HealError::Invalid(format!("the training model has no tensor `{name}`"))
        })?;
        let e = plan.tensors.get_mut(name).expect("selected names exist");
        let dtype = if as_f32 { DType::F32 } else { e.dtype };
        *e = TensorEntry {
            source: Source::inline(label, HostTensor::from_f32(shape, &values)),
            dtype,
        };
    }
    Ok(plan)
}

/// Writes `plan` into `out` (atomically) without losing `out/checkpoints` written during training.
fn write_final(plan: &Plan, out: &Path, description: &str) -> Result<()> {
    let opts = WriteOptions {
        force: true,
        description: description.into(),
        ..Default::default()
    };
    let ck = out.join("checkpoints");
    if !ck.exists() {
        write_model(plan, out, &opts)?;
        return Ok(());
    }
    let parent = out.parent().unwrap_or(Path::new("."));
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let aside = parent.join(format!(".{name}.heal-checkpoints-{}", std::process::id()));
    std::fs::rename(&ck, &aside).map_err(io_err(&ck))?;
    let r = write_model(plan, out, &opts);
    if !out.exists() {
        std::fs::create_dir_all(out).map_err(io_err(out))?;
    }
    std::fs::rename(&aside, &ck).map_err(io_err(&aside))?;
    r?;
    Ok(())
}

struct Run<'a> {
    cfg: &'a HealConfig,
    base: &'a Plan,
    sel: &'a Selection,
    fingerprint: String,
    data_fp: String,
    trajectory: String,
    history_line: String,
}

impl Run<'_> {
    fn save_checkpoint<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
        &self,
        model: &Llama<B>,
        optim: &O,
        state: &TrainerState,
        metrics: &[MetricRow],
    ) -> Result<PathBuf> {
        let dir = self
            .cfg
            .out
            .join("checkpoints")
            .join(format!("step-{:06}", state.step));
        let mut plan = export_plan(self.base, model, self.sel, true, "healing checkpoint")?;
        plan.arch.surgeon.history.push(format!(
            "{} (checkpoint at step {})",
            self.history_line, state.step
        ));
        write_model(
            &plan,
            &dir,
            &WriteOptions {
                force: true,
                description: format!("healing checkpoint, step {}", state.step),
                ..Default::default()
            },
        )?;
        let sd = dir.join(STATE_DIR);
        std::fs::create_dir_all(&sd).map_err(io_err(&sd))?;
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), sd.join(OPTIM_FILE))
            .map_err(|e| HealError::Checkpoint(format!("saving optimizer state: {e}")))?;
        write_csv(&sd.join("metrics.csv"), metrics)?;
        let json = serde_json::to_string_pretty(state).expect("serialisable");
        let p = sd.join(STATE_FILE);
        std::fs::write(&p, json).map_err(io_err(&p))?;
        write_csv(&self.cfg.out.join("metrics.csv"), metrics)?;
        Ok(dir)
    }
}

/// Heals `student` on backend `B` (see [`super::heal`] for the backend choice).
pub fn heal_on<B: AutodiffBackend>(
    cfg: &HealConfig,
    student: Plan,
    teacher: Option<Plan>,
    device: &B::Device,
) -> Result<HealReport> {
    // ---- everything that can fail before training starts ----
    check_options(cfg)?;
    check_supported(&student.arch)?;
    let arch = student.arch.clone();
    if cfg.seq_len > arch.max_position_embeddings {
        return Err(HealError::Invalid(format!(
            "--seq-len {} is longer than the model's context ({} positions)",
            cfg.seq_len, arch.max_position_embeddings
        )));
    }
    match (cfg.loss, &teacher) {
        (LossKind::Kd | LossKind::KdLm, None) => {
            return Err(HealError::Invalid(
                "--loss kd / kd+lm needs --teacher".into(),
            ))
        }
        (LossKind::Lm, Some(_)) => {
            return Err(HealError::Invalid(
                "--teacher given but --loss lm does not use it (use --loss kd or kd+lm)".into(),
            ))
        }
        _ => {}
    }
    if let Some(t) = &teacher {
        check_supported(&t.arch)?;
        if t.arch.vocab_size != arch.vocab_size {
            return Err(HealError::Invalid(format!(
                "the teacher {} has a vocabulary of {} tokens, the student {} has {}: \
                 distillation needs the same vocabulary",
                t.origin, t.arch.vocab_size, student.origin, arch.vocab_size
            )));
        }
        if cfg.seq_len > t.arch.max_position_embeddings {
            return Err(HealError::Invalid(format!(
                "--seq-len {} is longer than the teacher's context ({})",
                cfg.seq_len, t.arch.max_position_embeddings
            )));
        }
    }
    let sel = resolve(&student, &cfg.train)?;
    let fingerprint = model_fingerprint(&student)?;

    let out = &cfg.out;
    let resume_dir = match &cfg.resume {
        Some(d) => Some(find_checkpoint(d)?),
        None => None,
    };
    let resuming_in_out = resume_dir
        .as_ref()
        .is_some_and(|d| d.starts_with(out) || d.canonicalize().ok() == out.canonicalize().ok());
    if out.exists() && !cfg.force && !resuming_in_out {
        return Err(HealError::Invalid(format!(
            "{} already exists (use --force to replace it)",
            out.display()
        )));
    }
    surgeon_formats::writer::check_output(&student, out, true)?;

    let data = prepare(&student, &cfg.data, cfg.eval_data.as_ref(), cfg.seq_len)?;
    let Dataset {
        train,
        eval: eval_seqs,
        ..
    } = data;
    let tokens_per_step = (cfg.batch * cfg.grad_accum * cfg.seq_len) as u64;
    let total_steps = match cfg.budget {
        Budget::Steps(n) => n,
        Budget::Tokens(n) => n.div_ceil(tokens_per_step),
    };
    let data_fp = data_fingerprint(&train);
    let trajectory = format!(
        "steps={total_steps} seq_len={} batch={} grad_accum={} lr={} warmup={} schedule={:?} \
         weight_decay={} clip={:?} seed={} loss={:?} kd_weight={} temperature={} t2={}",
        cfg.seq_len,
        cfg.batch,
        cfg.grad_accum,
        cfg.lr,
        cfg.warmup,
        cfg.schedule,
        cfg.weight_decay,
        cfg.clip,
        cfg.seed,
        cfg.loss,
        cfg.kd_weight,
        cfg.temperature,
        cfg.kd_scale_t2
    );
    let moe = student
        .arch
        .layers
        .iter()
        .any(|l| matches!(l.mlp, surgeon_formats::Mlp::Moe { .. }));
    let trajectory = if moe {
        format!("{trajectory} aux_coef={}", cfg.aux_coef)
    } else {
        trajectory
    };

    // Resume: check the checkpoint belongs to this run, take its trainable tensors.
    let mut base = student;
    let mut state = TrainerState {
        version: 1,
        step: 0,
        samples: 0,
        model_fingerprint: fingerprint.clone(),
        data_fingerprint: data_fp.clone(),
        trajectory: trajectory.clone(),
        trainable: sel.names.clone(),
        eval_ppl_before: None,
    };
    let mut metrics: Vec<MetricRow> = vec![];
    if let Some(dir) = &resume_dir {
        let st = read_state(dir)?;
        let d = dir.display();
        if st.model_fingerprint != fingerprint {
            return Err(HealError::Checkpoint(format!(
                "{d} was written while healing another model (fingerprint {} vs {fingerprint} \
                 for {})",
                st.model_fingerprint, base.origin
            )));
        }
        if st.trainable != sel.names {
            return Err(HealError::Checkpoint(format!(
                "{d} trained another set of tensors ({} tensors, now {}): use the same --train",
                st.trainable.len(),
                sel.names.len()
            )));
        }
        if st.data_fingerprint != data_fp {
            return Err(HealError::Checkpoint(format!(
                "{d}: the training data differs from the run being resumed (same --data, \
                 --seq-len and --eval-data are needed)"
            )));
        }
        if st.trajectory != trajectory {
            return Err(HealError::Checkpoint(format!(
                "{d}: settings differ from the run being resumed:\n  was: {}\n  now: {trajectory}",
                st.trajectory
            )));
        }
        let ck = surgeon_formats::open_hf_dir(dir)?;
        for name in &sel.names {
            let (shape, v) = ck
                .load_f32(name)
                .map_err(|e| HealError::Checkpoint(format!("{d}: cannot read `{name}`: {e}")))?;
            let e = base.tensors.get_mut(name).expect("selected");
            if e.shape() != shape {
                return Err(HealError::Checkpoint(format!(
                    "{d}: `{name}` has shape {shape:?}, the model has {:?}",
                    e.shape()
                )));
            }
            e.source = Source::inline("resumed", HostTensor::from_f32(shape, &v));
        }
        metrics = read_csv(&dir.join(STATE_DIR).join("metrics.csv"))?;
        metrics.retain(|r| r.step <= st.step);
        state = st;
    }
    if state.step >= total_steps {
        return Err(HealError::Checkpoint(format!(
            "the checkpoint is already at step {} of {total_steps}",
            state.step
        )));
    }

    // ---- models and optimizer ----
    let trainable = |n: &str| sel.contains(n);
    let mut model = load_model::<B>(&base, &trainable, device)?;
    let teacher = match &teacher {
        Some(t) => Some(load_model::<B::InnerBackend>(t, &|_: &str| false, device)?),
        None => None,
    };
    let moe_k = moe_top_k(&model);
    let params: Vec<(ParamId, String, usize)> = named_params(&model)
        .into_iter()
        .filter(|(_, n, _)| sel.contains(n))
        .collect();
    let trainable_parameters: u64 = sel
        .names
        .iter()
        .map(|n| base.tensors[n].numel() as u64)
        .sum();
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(cfg.weight_decay as f32)
        .init::<B, Llama<B>>();
    if let Some(dir) = &resume_dir {
        let rec = BinFileRecorder::<FullPrecisionSettings>::new()
            .load(dir.join(STATE_DIR).join(OPTIM_FILE), device)
            .map_err(|e| HealError::Checkpoint(format!("loading optimizer state: {e}")))?;
        optim = optim.load_record(rec);
    }
    // new-embeddings: a 0/1 row mask for gradients and the original values to restore.
    let row_mask = sel.rows.as_ref().map(|rows| {
        let v = arch.vocab_size;
        let mut keep = vec![true; v];
        for &r in rows {
            keep[r as usize] = false;
        }
        let mult: Vec<f32> = keep.iter().map(|&k| if k { 0.0 } else { 1.0 }).collect();
        let mult = Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(mult, [v, 1]), device);
        let frozen =
            Tensor::<B::InnerBackend, 2, Bool>::from_data(TensorData::new(keep, [v, 1]), device);
        let names: Vec<String> = params.iter().map(|(_, n, _)| n.clone()).collect();
        let mut current = tensors_f32(&model, &names);
        let targets: Vec<(ParamId, Tensor<B::InnerBackend, 2>)> = params
            .iter()
            .map(|(id, name, _)| {
                let (shape, vals) = current.remove(name).expect("embedding tensor");
                (*id, Tensor::from_data(TensorData::new(vals, shape), device))
            })
            .collect();
        (mult, frozen, targets)
    });

    let history_line = if cfg.command.is_empty() {
        format!(
            "surgeon heal --train {} ({trajectory})",
            train_set_name(&cfg.train)
        )
    } else {
        cfg.command.clone()
    };
    let run = Run {
        cfg,
        base: &base,
        sel: &sel,
        fingerprint,
        data_fp,
        trajectory,
        history_line,
    };
    let _ = (&run.fingerprint, &run.data_fp, &run.trajectory);
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    // ---- training ----
    if state.step == 0 && metrics.is_empty() {
        let ppl = eval_ppl(&model.valid(), &eval_seqs, cfg.batch, device);
        state.eval_ppl_before = Some(ppl);
        metrics.push(MetricRow {
            step: 0,
            tokens: 0,
            loss: f64::NAN,
            lr: 0.0,
            grad_norm: 0.0,
            eval_ppl: Some(ppl),
        });
    }
    let pb = if cfg.progress {
        let pb = indicatif::ProgressBar::new(total_steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, eta {eta_precise}]",
            )
            .expect("valid template"),
        );
        pb.set_position(state.step);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Without a terminal the bar is hidden: log one line per step instead.
    let plain_log = cfg.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    if plain_log {
        if let Some(p) = metrics.last().and_then(|r| r.eval_ppl) {
            eprintln!("step {}/{total_steps} eval ppl {p:.3}", state.step);
        }
    }
    let start = Instant::now();
    let mut run_tokens = 0u64;
    // Time spent in eval, excluded from tokens/s.
    let mut eval_secs = 0.0f64;
    let mut sampler = Sampler::new(train.len(), cfg.seed);
    let l = cfg.seq_len;
    let mut last_ckpt = None;
    let mut interrupted = false;
    while state.step < total_steps {
        let lr = lr_at(cfg.schedule, cfg.lr, cfg.warmup, total_steps, state.step);
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_sum = 0.0f64;
        for _ in 0..cfg.grad_accum {
            let seqs: Vec<&Vec<u32>> = (0..cfg.batch)
                .map(|_| {
                    let i = sampler.index(state.samples);
                    state.samples += 1;
                    &train[i]
                })
                .collect();
            let tokens = batch_tensor::<B>(&seqs, device);
            let b = seqs.len();
            let input = tokens.clone().slice([0..b, 0..l]);
            let target = tokens.slice([0..b, 1..l + 1]);
            let (logits, router_logits) = match moe_k {
                Some(_) => forward_with_router_logits(&model, input.clone()),
                None => (model.forward(input.clone()), vec![]),
            };
            let teacher_logits = || {
                let t = teacher.as_ref().expect("checked above");
                Tensor::<B, 3>::from_inner(t.forward(input.clone().inner()))
            };
            let loss = match cfg.loss {
                LossKind::Lm => lm_loss(logits, target),
                LossKind::Kd => kd_loss(logits, teacher_logits(), cfg.temperature, cfg.kd_scale_t2),
                LossKind::KdLm => {
                    let kd = kd_loss(
                        logits.clone(),
                        teacher_logits(),
                        cfg.temperature,
                        cfg.kd_scale_t2,
                    );
                    kd.mul_scalar(cfg.kd_weight)
                        + lm_loss(logits, target).mul_scalar(1.0 - cfg.kd_weight)
                }
            };
            let loss = match moe_k {
                Some(k) if cfg.aux_coef != 0.0 => {
                    loss + load_balancing_loss(&router_logits, k).mul_scalar(cfg.aux_coef)
                }
                _ => loss,
            };
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let grads = loss.div_scalar(cfg.grad_accum as f64).backward();
            acc.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let mut grads = acc.grads();
        if let Some((mult, _, targets)) = &row_mask {
            for (id, _) in targets {
                if let Some(g) = grads.remove::<B::InnerBackend, 2>(*id) {
                    let [v, h] = g.dims();
                    grads.register(*id, g * mult.clone().expand([v, h]));
                }
            }
        }
        let norm = params
            .iter()
            .map(|(id, _, r)| grad_sq::<B>(&grads, *id, *r))
            .sum::<f64>()
            .sqrt();
        if let Some(c) = cfg.clip {
            if norm > c {
                let f = c / (norm + 1e-6);
                for (id, _, r) in &params {
                    scale_grad::<B>(&mut grads, *id, *r, f);
                }
            }
        }
        model = optim.step(lr, model, grads);
        if let Some((_, frozen, targets)) = &row_mask {
            model = model.map(&mut RestoreRows::<B> {
                targets: targets.clone(),
                frozen_rows: frozen.clone(),
            });
        }
        state.step += 1;
        run_tokens += tokens_per_step;
        let loss = loss_sum / cfg.grad_accum as f64;
        let mut row = MetricRow {
            step: state.step,
            tokens: state.step * tokens_per_step,
            loss,
            lr,
            grad_norm: norm,
            eval_ppl: None,
        };
        let stop_now = cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
            || cfg.stop_after.is_some_and(|n| state.step >= n);
        if state.step == total_steps
            || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every))
        {
            let t = Instant::now();
            row.eval_ppl = Some(eval_ppl(&model.valid(), &eval_seqs, cfg.batch, device));
            eval_secs += t.elapsed().as_secs_f64();
        }
        let row_ppl = row.eval_ppl;
        metrics.push(row);
        let tps = run_tokens as f64 / (start.elapsed().as_secs_f64() - eval_secs).max(1e-9);
        let msg = format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s");
        if plain_log {
            let ppl = row_ppl
                .map(|p| format!(" eval ppl {p:.3}"))
                .unwrap_or_default();
            eprintln!(
                "step {}/{total_steps} {msg} grad_norm {norm:.3}{ppl}",
                state.step
            );
        }
        pb.set_message(msg);
        pb.set_position(state.step);
        if state.step < total_steps
            && (stop_now || (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every)))
        {
            last_ckpt = Some(run.save_checkpoint(&model, &optim, &state, &metrics)?);
        }
        if stop_now && state.step < total_steps {
            interrupted = true;
            break;
        }
    }
    pb.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64() - eval_secs;
    let ppl_after = metrics.last().and_then(|r| r.eval_ppl);
    let report = |model_dir| HealReport {
        steps: state.step,
        total_steps,
        tokens: state.step * tokens_per_step,
        trainable_tensors: sel.names.clone(),
        trainable_parameters,
        eval_ppl_before: state.eval_ppl_before,
        eval_ppl_after: if interrupted { None } else { ppl_after },
        final_loss: metrics.last().map(|r| r.loss).filter(|l| l.is_finite()),
        interrupted,
        last_checkpoint: last_ckpt.clone(),
        model_dir,
        tokens_per_second: run_tokens as f64 / elapsed.max(1e-9),
        metrics: metrics.clone(),
    };
    if interrupted {
        write_csv(&out.join("metrics.csv"), &metrics)?;
        return Ok(report(None));
    }

    // ---- the healed model ----
    let mut plan = export_plan(&base, &model, &sel, false, "healed")?;
    plan.arch.surgeon.history.push(run.history_line.clone());
    plan.arch.surgeon.notes.push(format!(
        "Healed by `surgeon heal`: {} loss{}, trained {} ({} tensors, {} parameters), {} steps of \
         {} tokens (lr {}, {:?} schedule, warmup {}); held-out perplexity {} -> {}.",
        match cfg.loss {
            LossKind::Lm => "next-token".to_string(),
            LossKind::Kd => format!("distillation (KL, T = {})", cfg.temperature),
            LossKind::KdLm => format!(
                "{} x distillation (KL, T = {}) + {} x next-token",
                cfg.kd_weight,
                cfg.temperature,
                1.0 - cfg.kd_weight
            ),
        },
        if moe {
            format!(" + {} x MoE load balancing", cfg.aux_coef)
        } else {
            String::new()
        },
        train_set_name(&cfg.train),
        sel.names.len(),
        trainable_parameters,
        total_steps,
        tokens_per_step,
        cfg.lr,
        cfg.schedule,
        cfg.warmup,
        state
            .eval_ppl_before
            .map(|p| format!("{p:.3}"))
            .unwrap_or("?".into()),
        ppl_after.map(|p| format!("{p:.3}")).unwrap_or("?".into()),
    ));
    write_final(&plan, out, &run.history_line)?;
    write_csv(&out.join("metrics.csv"), &metrics)?;
    plot_loss(&out.join("loss.png"), &metrics)?;
    Ok(report(Some(out.clone())))
}

fn train_set_name(t: &TrainSet) -> String {
    match t {
        TrainSet::All => "all".into(),
        TrainSet::NewBlocks => "new-blocks".into(),
        TrainSet::Embeddings => "embeddings".into(),
        TrainSet::NewEmbeddings => "new-embeddings".into(),
        TrainSet::Regex(r) => format!("`{r}`"),
    }
}
