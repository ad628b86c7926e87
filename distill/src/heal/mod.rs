//! Healing: train a surgically changed model (continual pretraining and/or distillation from a
//! teacher) with burn, training only a chosen set of tensors, and write it back as a plan.
//!
//! Entry point: [`heal`] (dispatches on [`BackendKind`]) or [`heal_on`] (a chosen burn backend).
pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod metrics;
pub mod schedule;
pub mod select;
pub mod trainer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use data::DataSpec;
pub use schedule::Schedule;
pub use select::TrainSet;
pub use trainer::heal_on;

/// Errors of healing. Every configuration error is raised before the first training step.
#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error(transparent)]
    Formats(#[from] surgeon_formats::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] crate::error::Error),
    #[error("unsupported by the training runtime: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

pub type Result<T, E = HealError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HealError {
    let path = path.into();
    move |source| HealError::Io { path, source }
}

/// Training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// Next-token cross-entropy.
    Lm,
    /// Forward KL(teacher || student) at temperature T (needs a teacher).
    Kd,
    /// `W * KD + (1 - W) * LM`.
    KdLm,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lm" => Ok(LossKind::Lm),
            "kd" => Ok(LossKind::Kd),
            "kd+lm" | "lm+kd" => Ok(LossKind::KdLm),
            _ => Err(format!("unknown loss `{s}` (lm, kd, kd+lm)")),
        }
    }
}

/// How long to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Optimizer steps.
    Steps(u64),
    /// Training tokens (rounded up to whole steps).
    Tokens(u64),
}

/// Which burn backend trains (the same choice as eval and generate).
pub use crate::backend::BackendKind;

/// Everything a healing run needs besides the models themselves.
#[derive(Clone, Debug)]
pub struct HealConfig {
    pub data: DataSpec,
    /// Held-out data; when `None` the last 5% of the packed sequences (at least one) are held out.
    pub eval_data: Option<DataSpec>,
    pub out: PathBuf,
    pub loss: LossKind,
    /// W in `W * KD + (1 - W) * LM`.
    pub kd_weight: f64,
    pub temperature: f64,
    /// Multiply the KD term by T^2 (Hinton's convention, keeps gradient scale independent of T).
    pub kd_scale_t2: bool,
    /// Weight of the MoE load-balancing loss added to the objective when the student has routed
    /// MoE layers (`loss + aux_coef * load_balancing_loss`); ignored for dense models.
    pub aux_coef: f64,
    pub train: TrainSet,
    pub budget: Budget,
    pub seq_len: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Global-norm gradient clipping threshold (`None`: no clipping).
    pub clip: Option<f64>,
    pub seed: u64,
    /// Evaluate every N steps (0: only before and after).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: never, except on interruption).
    pub save_every: u64,
    /// A checkpoint directory (`OUT/checkpoints/step-N`) to continue from.
    pub resume: Option<PathBuf>,
    pub backend: BackendKind,
    /// Replace an existing output directory.
    pub force: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step, checkpoint and return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Behave as if interrupted once this many steps are done (tests, time-boxed runs).
    pub stop_after: Option<u64>,
    /// The command line that ran, for the model card.
    pub command: String,
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig {
            data: DataSpec::Files(vec![]),
            eval_data: None,
            out: PathBuf::from("healed"),
            loss: LossKind::Lm,
            kd_weight: 0.5,
            temperature: 1.0,
            kd_scale_t2: true,
            aux_coef: 0.01,
            train: TrainSet::All,
            budget: Budget::Steps(100),
            seq_len: 512,
            batch: 4,
            grad_accum: 1,
            lr: 1e-4,
            warmup: 0,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            clip: Some(1.0),
            seed: 0,
            eval_every: 0,
            save_every: 0,
            resume: None,
            backend: BackendKind::Cpu,
            force: false,
            progress: false,
            stop: None,
            stop_after: None,
            command: String::new(),
        }
    }
}

/// One row of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricRow {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub eval_ppl: Option<f64>,
}

/// What a healing run did.
#[derive(Clone, Debug)]
pub struct HealReport {
    /// Steps done in total (including those before a resume).
    pub steps: u64,
    pub total_steps: u64,
    pub tokens: u64,
    pub trainable_tensors: Vec<String>,
    pub trainable_parameters: u64,
    pub eval_ppl_before: Option<f64>,
    pub eval_ppl_after: Option<f64>,
    pub final_loss: Option<f64>,
    /// Stopped early (Ctrl-C or `stop_after`): `last_checkpoint` holds the state, no model was written.
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// The healed model directory (None when interrupted).
    pub model_dir: Option<PathBuf>,
    /// Training tokens per second in this run (eval time excluded).
    pub tokens_per_second: f64,
    pub metrics: Vec<MetricRow>,
}

/// Heals `student` (optionally distilling from `teacher`) on the backend named in `cfg`.
pub fn heal(
    cfg: &HealConfig,
    student: surgeon_formats::Plan,
    teacher: Option<surgeon_formats::Plan>,
) -> Result<HealReport> {
    match cfg.backend {
        BackendKind::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            heal_on::<B>(cfg, student, teacher, &Default::default())
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            type B = burn::backend::Autodiff<burn::backend::Wgpu>;
            heal_on::<B>(cfg, student, teacher, &Default::default())
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            type B = burn::backend::Autodiff<burn::backend::Cuda>;
            heal_on::<B>(cfg, student, teacher, &Default::default())
        }
        #[allow(unreachable_patterns)]
        other => Err(HealError::Unsupported(format!(
            "backend {other:?}: this build lacks its cargo feature (build with --features {})",
            format!("{other:?}").to_lowercase()
        ))),
    }
}

/// Installs the SIGINT/SIGTERM handler of a training run: the first signal sets the returned
/// flag (the run checkpoints and stops after the current step, exit status 130); a second one
/// removes unfinished output temporaries and exits at once with status 130.
pub fn install_ctrlc() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    surgeon_formats::output::install_signal_handlers(Some(flag.clone()))
        .map_err(|e| HealError::Invalid(format!("installing the Ctrl-C handler: {e}")))?;
    Ok(flag)
}

/// Refuses a healing output that would lose files: an existing `cfg.out` without `--force`
/// (unless resuming inside it), a folder surgeon did not write, or one that holds or lies inside
/// an input (the student, the teacher, a `--data` or `--eval-data` file), even with `--force`.
pub fn check_heal_output(
    cfg: &HealConfig,
    student: &surgeon_formats::Plan,
    teacher: Option<&surgeon_formats::Plan>,
    resuming_in_out: bool,
) -> Result<()> {
    use surgeon_formats::load::input_paths;
    let mut inputs = input_paths(student);
    if let Some(t) = teacher {
        inputs.extend(input_paths(t));
    }
    for spec in std::iter::once(&cfg.data).chain(cfg.eval_data.as_ref()) {
        if let DataSpec::Files(files) = spec {
            inputs.extend(files.iter().cloned());
        }
    }
    surgeon_formats::output::check_output(&cfg.out, &inputs, cfg.force || resuming_in_out)?;
    Ok(())
}

impl HealConfig {
    /// Checks every numeric setting (finite, in range), naming the flag it comes from.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HealError::Invalid(m));
        if self.seq_len == 0 || self.batch == 0 || self.grad_accum == 0 {
            return bad("--seq-len, --batch and --grad-accum must be positive".into());
        }
        // Beyond ~1 (Adam's step is about lr per weight) training only diverges.
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad(format!("--lr must be in (0, 1], got {}", self.lr));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "--temperature must be positive and finite, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.kd_weight) {
            return bad(format!(
                "--kd-weight must be in [0, 1], got {}",
                self.kd_weight
            ));
        }
        if !(self.aux_coef.is_finite() && self.aux_coef >= 0.0) {
            return bad(format!(
                "--aux-coef must be finite and not negative, got {}",
                self.aux_coef
            ));
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            return bad(format!(
                "--weight-decay must be in [0, 1], got {}",
                self.weight_decay
            ));
        }
        if let Some(c) = self.clip {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--clip must be positive and finite, got {c}"));
            }
        }
        match self.budget {
            Budget::Steps(0) | Budget::Tokens(0) => {
                bad("nothing to do: --steps/--tokens is 0".into())
            }
            _ => Ok(()),
        }
    }
}
