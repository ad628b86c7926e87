//! The plan of a healing run: validated configuration, trainable selection, packed data and the
//! trajectory (every setting that must not change across a resume), built before any training.
use super::checkpoint::TrainerState;
use super::data::{prepare, Dataset};
use super::select::{resolve, Selection};
use super::{Budget, Error, HealConfig, LossKind, Result, Schedule, TrainSet};
use crate::model::check_supported;
use serde::{Deserialize, Serialize};
use surgeon_formats::{AttentionKind, Plan};

/// Settings that fix the sequence of optimizer updates; a resumed run must have the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub steps: u64,
    pub seq_len: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub clip: Option<f64>,
    pub seed: u64,
    pub loss: LossKind,
    pub kd_weight: f64,
    pub temperature: f64,
    pub kd_scale_t2: bool,
    /// The load-balancing weight; `None` for a dense student (the loss does not apply).
    pub aux_coef: Option<f64>,
}

impl std::fmt::Display for Trajectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "steps={} seq_len={} batch={} grad_accum={} lr={} warmup={} schedule={:?} \
             weight_decay={} clip={:?} seed={} loss={:?} kd_weight={} temperature={} t2={}",
            self.steps,
            self.seq_len,
            self.batch,
            self.grad_accum,
            self.lr,
            self.warmup,
            self.schedule,
            self.weight_decay,
            self.clip,
            self.seed,
            self.loss,
            self.kd_weight,
            self.temperature,
            self.kd_scale_t2
        )?;
        match self.aux_coef {
            Some(a) => write!(f, " aux_coef={a}"),
            None => Ok(()),
        }
    }
}

/// Everything a healing run is, decided and checked before the first step.
#[derive(Clone, Debug)]
pub struct HealPlan {
    pub cfg: HealConfig,
    pub sel: Selection,
    pub data: Dataset,
    pub total_steps: u64,
    pub tokens_per_step: u64,
    pub trajectory: Trajectory,
    /// Fingerprint of the student ([`model_fingerprint`]).
    pub model_fingerprint: String,
    /// Fingerprint of the packed training sequences.
    pub data_fingerprint: String,
    /// `model.layers.*` parameters that train.
    pub trainable_parameters: u64,
    /// The history line written into the healed model (the command, or a description).
    pub history_line: String,
}

impl HealPlan {
    /// Validates `cfg` against the student (and teacher), resolves the trainable set and prepares
    /// the data. Every configuration error surfaces here, before any model is loaded.
    pub fn new(cfg: &HealConfig, student: &Plan, teacher: Option<&Plan>) -> Result<Self> {
        let sel = Self::validate(cfg, student, teacher)?;
        let data = prepare(student, &cfg.data, cfg.eval_data.as_ref(), cfg.seq_len)?;
        Self::with_data(cfg, student, sel, data)
    }

    /// The checks of [`HealPlan::new`] that need no data: options, models, trainable set.
    pub fn validate(cfg: &HealConfig, student: &Plan, teacher: Option<&Plan>) -> Result<Selection> {
        check_options(cfg)?;
        check_models(cfg, student, teacher)?;
        resolve(student, &cfg.train)
    }

    /// A plan from already prepared `data`.
    pub fn with_data(
        cfg: &HealConfig,
        student: &Plan,
        sel: Selection,
        data: Dataset,
    ) -> Result<Self> {
        let tokens_per_step = (cfg.batch * cfg.grad_accum * cfg.seq_len) as u64;
        let total_steps = match cfg.budget {
            Budget::Steps(n) => n,
            Budget::Tokens(n) => n.div_ceil(tokens_per_step),
        };
        let moe = student
            .arch
            .layers
            .iter()
            .any(|l| matches!(l.mlp, surgeon_formats::Mlp::Moe { .. }));
        let trajectory = Trajectory {
            steps: total_steps,
            seq_len: cfg.seq_len,
            batch: cfg.batch,
            grad_accum: cfg.grad_accum,
            lr: cfg.lr,
            warmup: cfg.warmup,
            schedule: cfg.schedule,
            weight_decay: cfg.weight_decay,
            clip: cfg.clip,
            seed: cfg.seed,
            loss: cfg.loss,
            kd_weight: cfg.kd_weight,
            temperature: cfg.temperature,
            kd_scale_t2: cfg.kd_scale_t2,
            aux_coef: moe.then_some(cfg.aux_coef),
        };
        let history_line = if cfg.command.is_empty() {
            format!(
                "surgeon heal --train {} ({trajectory})",
                train_set_name(&cfg.train)
            )
        } else {
            cfg.command.clone()
        };
        let trainable_parameters = sel.parameters(student);
        Ok(HealPlan {
            cfg: cfg.clone(),
            model_fingerprint: model_fingerprint(student)?,
            data_fingerprint: data_fingerprint(&data.train),
            sel,
            data,
            total_steps,
            tokens_per_step,
            trajectory,
            trainable_parameters,
            history_line,
        })
    }

    /// A fresh trainer state for this plan (step 0).
    pub fn initial_state(&self) -> TrainerState {
        TrainerState {
            version: TrainerState::VERSION,
            step: 0,
            samples: 0,
            model_fingerprint: self.model_fingerprint.clone(),
            data_fingerprint: self.data_fingerprint.clone(),
            trajectory: self.trajectory.clone(),
            trainable: self.sel.names.clone(),
            eval_ppl_before: None,
        }
    }

    /// Checks that a checkpoint's `state` (read from `dir`) continues this plan.
    pub fn check_resume(&self, state: &TrainerState, dir: &std::path::Path) -> Result<()> {
        let d = dir.display();
        let err = |m: String| Err(Error::Checkpoint(m));
        if state.model_fingerprint != self.model_fingerprint {
            return err(format!(
                "{d} was written while healing another model (fingerprint {} vs {})",
                state.model_fingerprint, self.model_fingerprint
            ));
        }
        if state.trainable != self.sel.names {
            return err(format!(
                "{d} trained another set of tensors ({} tensors, now {}): use the same train set",
                state.trainable.len(),
                self.sel.names.len()
            ));
        }
        if state.data_fingerprint != self.data_fingerprint {
            return err(format!(
                "{d}: the training data differs from the run being resumed (the same data, \
                 seq_len and eval data are needed)"
            ));
        }
        if state.trajectory != self.trajectory {
            return err(format!(
                "{d}: settings differ from the run being resumed:\n  was: {}\n  now: {}",
                state.trajectory, self.trajectory
            ));
        }
        if state.step >= self.total_steps {
            return err(format!(
                "the checkpoint is already at step {} of {}",
                state.step, self.total_steps
            ));
        }
        Ok(())
    }

    /// The model-card note of the healed model.
    pub fn note(&self, ppl_before: Option<f64>, ppl_after: Option<f64>) -> String {
        let cfg = &self.cfg;
        let loss = match cfg.loss {
            LossKind::Lm => "next-token".to_string(),
            LossKind::Kd => format!("distillation (KL, T = {})", cfg.temperature),
            LossKind::KdLm => format!(
                "{} x distillation (KL, T = {}) + {} x next-token",
                cfg.kd_weight,
                cfg.temperature,
                1.0 - cfg.kd_weight
            ),
            LossKind::AttentionTransfer => "attention transfer (MSE of attention outputs)".into(),
            LossKind::AttentionWeights => {
                "attention transfer (cross-entropy of attention weights)".into()
            }
        };
        let aux = match self.trajectory.aux_coef {
            Some(a) => format!(" + {a} x MoE load balancing"),
            None => String::new(),
        };
        let ppl = |p: Option<f64>| p.map(|p| format!("{p:.3}")).unwrap_or("?".into());
        format!(
            "Healed by `surgeon heal`: {loss} loss{aux}, trained {} ({} tensors, {} parameters), \
             {} steps of {} tokens (lr {}, {:?} schedule, warmup {}); held-out perplexity {} -> {}.",
            train_set_name(&cfg.train),
            self.sel.names.len(),
            self.trainable_parameters,
            self.total_steps,
            self.tokens_per_step,
            cfg.lr,
            cfg.schedule,
            cfg.warmup,
            ppl(ppl_before),
            ppl(ppl_after),
        )
    }
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

/// Checks options that need no model. Messages name the [`HealConfig`] fields.
pub fn check_options(cfg: &HealConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Invalid(m));
    if cfg.seq_len == 0 || cfg.batch == 0 || cfg.grad_accum == 0 {
        return bad("seq_len, batch and grad_accum must be positive".into());
    }
    if cfg.train == TrainSet::Clover && cfg.clover_factors.is_none() {
        return bad("`train` clover needs `clover_factors` (surgeon_convert's \
             clover_finetune::finetune_factors computes them from the student)"
            .into());
    }
    // Beyond ~1 (Adam's step is about lr per weight) training only diverges.
    if !(cfg.lr.is_finite() && cfg.lr > 0.0 && cfg.lr <= 1.0) {
        return bad(format!(
            "lr must be positive and at most 1, in (0, 1], got {}",
            cfg.lr
        ));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return bad(format!(
            "temperature must be positive and finite, got {}",
            cfg.temperature
        ));
    }
    if !(0.0..=1.0).contains(&cfg.kd_weight) {
        return bad(format!(
            "kd_weight must be in [0, 1], got {}",
            cfg.kd_weight
        ));
    }
    if !(cfg.aux_coef.is_finite() && cfg.aux_coef >= 0.0) {
        return bad(format!(
            "aux_coef must be finite and not negative, got {}",
            cfg.aux_coef
        ));
    }
    if !(cfg.weight_decay.is_finite() && (0.0..=1.0).contains(&cfg.weight_decay)) {
        return bad(format!(
            "weight_decay must be in [0, 1], got {}",
            cfg.weight_decay
        ));
    }
    if let Some(c) = cfg.clip {
        if !(c.is_finite() && c > 0.0) {
            return bad(format!("clip must be positive and finite, got {c}"));
        }
    }
    match cfg.budget {
        Budget::Steps(0) | Budget::Tokens(0) => bad("nothing to do: the budget is 0 steps".into()),
        _ => Ok(()),
    }
}

/// Checks the student and teacher against the configuration.
pub fn check_models(cfg: &HealConfig, student: &Plan, teacher: Option<&Plan>) -> Result<()> {
    let arch = &student.arch;
    check_supported(arch)?;
    if cfg.seq_len > arch.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "seq_len {} is longer than the model's context ({} positions)",
            cfg.seq_len, arch.max_position_embeddings
        )));
    }
    match (cfg.loss, teacher) {
        (LossKind::Kd | LossKind::KdLm, None) => {
            return Err(Error::Invalid("`loss` kd / kd+lm needs a `teacher`".into()))
        }
        (l, None) if l.is_attention_transfer() => {
            return Err(Error::Invalid(
                "`loss` attention-transfer / attention-weights needs a `teacher` (the model before conversion)".into(),
            ))
        }
        (l, Some(t)) if l.is_attention_transfer() => check_transfer_teacher(student, t)?,
        (LossKind::Lm, Some(_)) => {
            return Err(Error::Invalid(
                "`teacher` given but `loss` lm does not use it (use `loss` kd or kd+lm)".into(),
            ))
        }
        _ => {}
    }
    let Some(t) = teacher else { return Ok(()) };
    check_supported(&t.arch)?;
    if t.arch.vocab_size != arch.vocab_size {
        return Err(Error::Invalid(format!(
            "the teacher {} has a vocabulary of {} tokens, the student {} has {}: \
             distillation needs the same vocabulary",
            t.origin, t.arch.vocab_size, student.origin, arch.vocab_size
        )));
    }
    if cfg.seq_len > t.arch.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "seq_len {} is longer than the teacher's context ({})",
            cfg.seq_len, t.arch.max_position_embeddings
        )));
    }
    Ok(())
}

/// Attention transfer: the student has Hedgehog layers, and the teacher has softmax attention of
/// the same shape in each of them.
fn check_transfer_teacher(student: &Plan, teacher: &Plan) -> Result<()> {
    let mut any = false;
    for (l, layer) in student.arch.layers.iter().enumerate() {
        let s = &layer.attention;
        if !matches!(s.kind, AttentionKind::Hedgehog { .. }) {
            continue;
        }
        any = true;
        let same = teacher.arch.layers.get(l).is_some_and(|t| {
            let t = &t.attention;
            t.kind == AttentionKind::Softmax
                && (t.num_heads, t.num_kv_heads, t.head_dim, t.v_head_dim)
                    == (s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim)
        });
        if !same {
            return Err(Error::Invalid(format!(
                "attention transfer: layer {l} of the teacher {} is not softmax attention of the \
                 shape of the student's Hedgehog layer {l}",
                teacher.origin
            )));
        }
    }
    if !any {
        return Err(Error::Invalid(format!(
            "`loss` attention-transfer: the student {} has no Hedgehog attention layer",
            student.origin
        )));
    }
    Ok(())
}

pub(crate) fn train_set_name(t: &TrainSet) -> String {
    match t {
        TrainSet::All => "all".into(),
        TrainSet::NewBlocks => "new-blocks".into(),
        TrainSet::Embeddings => "embeddings".into(),
        TrainSet::NewEmbeddings => "new-embeddings".into(),
        TrainSet::FeatureMaps => "feature-maps".into(),
        TrainSet::Lora(spec) => spec.to_string(),
        TrainSet::Clover => "clover".into(),
        TrainSet::Regex(r) => format!("`{r}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heal::DataSpec;
    use surgeon_formats::synthetic::SyntheticSpec;

    fn student() -> Plan {
        SyntheticSpec::tiny().plan()
    }

    fn cfg() -> HealConfig {
        let docs = (0..24u32)
            .map(|d| (0..40u32).map(|i| 3 + (d * 31 + i * 7) % 250).collect())
            .collect();
        HealConfig {
            data: DataSpec::Tokens(docs),
            budget: Budget::Steps(4),
            seq_len: 16,
            batch: 2,
            ..Default::default()
        }
    }

    fn invalid(c: HealConfig) -> String {
        HealPlan::validate(&c, &student(), None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn configuration_errors_name_the_setting() {
        assert!(invalid(HealConfig { lr: -1.0, ..cfg() }).contains("lr must be positive"));
        let e = invalid(HealConfig {
            kd_weight: 2.0,
            ..cfg()
        });
        assert!(e.contains("kd_weight must be in [0, 1]"), "{e}");
        let e = invalid(HealConfig {
            budget: Budget::Tokens(0),
            ..cfg()
        });
        assert!(e.contains("nothing to do"), "{e}");
        let e = invalid(HealConfig {
            seq_len: 1 << 20,
            ..cfg()
        });
        assert!(e.contains("longer than the model's context"), "{e}");
        let e = invalid(HealConfig {
            loss: LossKind::KdLm,
            ..cfg()
        });
        assert!(e.contains("needs a `teacher`"), "{e}");
    }

    #[test]
    fn selection_errors_come_from_validation() {
        let e = invalid(HealConfig {
            train: TrainSet::NewBlocks,
            ..cfg()
        });
        assert!(e.contains("no new layers"), "{e}");
        let sel = HealPlan::validate(
            &HealConfig {
                train: TrainSet::Embeddings,
                ..cfg()
            },
            &student(),
            None,
        )
        .unwrap();
        assert!(sel.contains("model.embed_tokens.weight"));
        assert!(!sel.contains("model.norm.weight"));
    }

    #[test]
    fn resume_checks_compare_the_recorded_run() {
        let s = student();
        let p = HealPlan::new(&cfg(), &s, None).unwrap();
        assert_eq!(p.total_steps, 4);
        assert_eq!(p.trajectory.aux_coef, None);
        let dir = std::path::Path::new("ck");
        let mut st = p.initial_state();
        st.step = 2;
        p.check_resume(&st, dir).unwrap();
        let check = |st: &TrainerState| p.check_resume(st, dir).unwrap_err().to_string();
        let mut other = st.clone();
        other.trajectory.lr *= 2.0;
        let e = check(&other);
        assert!(
            e.contains("settings differ") && e.contains("lr=0.0002"),
            "{e}"
        );
        let mut other = st.clone();
        other.model_fingerprint = "0".into();
        assert!(check(&other).contains("another model"));
        let mut other = st.clone();
        other.trainable.pop();
        assert!(check(&other).contains("another set of tensors"));
        let mut other = st.clone();
        other.data_fingerprint = "0".into();
        assert!(check(&other).contains("training data differs"));
        let mut other = st.clone();
        other.step = 4;
        assert!(check(&other).contains("already at step 4 of 4"));
        // The trajectory is a value: it survives JSON unchanged and prints as before.
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<TrainerState>(&json).unwrap(), st);
        assert!(p
            .trajectory
            .to_string()
            .starts_with("steps=4 seq_len=16 batch=2"));
    }

    #[test]
    fn latest_complete_checkpoint_is_found() {
        use crate::heal::checkpoint::{checkpoint_dir, find_checkpoint, STATE_DIR};
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        assert!(find_checkpoint(out).is_err());
        for (step, complete) in [(2, true), (10, true), (11, false)] {
            let ck = checkpoint_dir(out, step);
            let sd = ck.join(STATE_DIR);
            std::fs::create_dir_all(&sd).unwrap();
            std::fs::write(ck.join("config.json"), "{}").unwrap();
            std::fs::write(ck.join("model.safetensors"), "x").unwrap();
            std::fs::write(sd.join("optimizer.bin"), "x").unwrap();
            if complete {
                std::fs::write(sd.join("state.json"), "{}").unwrap();
            }
        }
        assert_eq!(find_checkpoint(out).unwrap(), checkpoint_dir(out, 10));
        let ten = checkpoint_dir(out, 10);
        assert_eq!(find_checkpoint(&ten).unwrap(), ten);
    }
}
