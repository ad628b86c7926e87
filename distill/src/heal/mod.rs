//! Healing: train a surgically changed model (continual pretraining and/or distillation from a
//! teacher) with burn, training only a chosen set of tensors, and write it back as a plan.
//!
//! Entry points: [`heal`] / [`heal_with`] (dispatch on [`BackendKind`]) or [`heal_on`] (a chosen
//! burn backend). Underneath: a [`HealPlan`] (validated configuration, selection, data and
//! trajectory), a [`Trainer`] (start, resume, step, evaluate, checkpoint, finish) and the
//! [`checkpoint`] layout; progress goes to a [`HealObserver`] that the caller owns.
pub mod adamw;
pub mod checkpoint;
pub mod clip;
pub mod data;
pub mod logit_grad;
pub mod loss;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod select;
pub mod trainer;
pub mod transfer;

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
mod scale_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use data::DataSpec;
pub use plan::{HealPlan, Trajectory};
pub use run::{heal_on, heal_on_devices, HealObserver, Quiet};
pub use schedule::Schedule;
pub use select::{LoraSpec, TrainSet};
pub use trainer::Trainer;

/// Healing reports the runtime's errors: one error type per crate.
pub use crate::error::{Error, Result};

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LossKind {
    /// Next-token cross-entropy.
    Lm,
    /// Forward KL(teacher || student) at temperature T (needs a teacher).
    Kd,
    /// `W * KD + (1 - W) * LM`.
    KdLm,
    /// LoLCATs attention transfer: per Hedgehog layer, MSE between the teacher's softmax attention
    /// output and the student's linear attention output on the teacher's attention input.
    AttentionTransfer,
    /// Hedgehog's attention distillation: per Hedgehog layer, cross-entropy between the teacher's
    /// softmax attention weights and the student's linear attention weights on the same input.
    AttentionWeights,
}

impl LossKind {
    /// The attention-transfer objectives (stage 1 of linearising attention).
    pub fn is_attention_transfer(self) -> bool {
        matches!(
            self,
            LossKind::AttentionTransfer | LossKind::AttentionWeights
        )
    }
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lm" => Ok(LossKind::Lm),
            "kd" => Ok(LossKind::Kd),
            "kd+lm" | "lm+kd" => Ok(LossKind::KdLm),
            "attention-transfer" => Ok(LossKind::AttentionTransfer),
            "attention-weights" => Ok(LossKind::AttentionWeights),
            _ => Err(format!(
                "unknown loss `{s}` (lm, kd, kd+lm, attention-transfer, attention-weights)"
            )),
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
pub use crate::model::Precision;

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
    /// Matmul precision while training (parameters, optimizer state and loss stay f32).
    pub precision: Precision,
    /// Recompute activations in the backward pass (burn's `BalancedCheckpointing`).
    pub checkpoint_activations: bool,
    /// Device indices for data-parallel healing (empty: the backend's default device).
    pub devices: Vec<usize>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step, checkpoint and return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Behave as if interrupted once this many steps are done (tests, time-boxed runs).
    pub stop_after: Option<u64>,
    /// The command line that ran, for the model card.
    pub command: String,
    /// For `train` clover: each adapted linear layer's factors by HF module name (computed by
    /// `surgeon_convert::clover_finetune::finetune_factors`).
    pub clover_factors: Option<Arc<CloverFactors>>,
}

/// CLOVER factors by HF module name (e.g. `model.layers.0.self_attn.q_proj`).
pub type CloverFactors = std::collections::BTreeMap<String, crate::model::BlockFactors>;

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
            precision: Precision::F32,
            checkpoint_activations: false,
            devices: vec![],
            force: false,
            stop: None,
            stop_after: None,
            command: String::new(),
            clover_factors: None,
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

/// Heals `student` (optionally distilling from `teacher`) on the backend named in `cfg`, quietly.
pub fn heal(
    cfg: &HealConfig,
    student: surgeon_formats::Plan,
    teacher: Option<surgeon_formats::Plan>,
) -> Result<HealReport> {
    heal_with(cfg, student, teacher, &mut Quiet)
}

/// [`heal`] reporting progress to `observer`.
pub fn heal_with(
    cfg: &HealConfig,
    student: surgeon_formats::Plan,
    teacher: Option<surgeon_formats::Plan>,
    observer: &mut dyn HealObserver,
) -> Result<HealReport> {
    struct Job<'a> {
        cfg: &'a HealConfig,
        student: surgeon_formats::Plan,
        teacher: Option<surgeon_formats::Plan>,
        observer: &'a mut dyn HealObserver,
    }
    impl crate::backend::DevicesJob for Job<'_> {
        type Output = Result<HealReport>;
        fn run<B: burn::tensor::backend::Backend>(self, devices: Vec<B::Device>) -> Self::Output {
            use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
            use burn::backend::Autodiff;
            let (cfg, observer) = (self.cfg, self.observer);
            let (s, t) = (self.student, self.teacher);
            match cfg.checkpoint_activations {
                false => heal_on_devices::<Autodiff<B>>(cfg, s, t, &devices, observer),
                true => heal_on_devices::<Autodiff<B, BalancedCheckpointing>>(
                    cfg, s, t, &devices, observer,
                ),
            }
        }
    }
    cfg.backend.run_on(
        &cfg.devices,
        Job {
            cfg,
            student,
            teacher,
            observer,
        },
    )?
}

/// Installs the SIGINT/SIGTERM handler of a training run: the first signal sets the returned
/// flag (the run checkpoints and stops after the current step, exit status 130); a second one
/// removes unfinished output temporaries and exits at once with status 130.
pub fn install_ctrlc() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    surgeon_formats::output::install_signal_handlers(Some(flag.clone()))
        .map_err(|e| Error::Invalid(format!("installing the Ctrl-C handler: {e}")))?;
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
