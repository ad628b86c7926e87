//! `surgeon heal`: train a surgically changed model back to health (LM loss and/or distillation).
use super::common::{command_line, BackendArgs, Interrupted};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use surgeon_distill::heal::{
    heal_with, install_ctrlc, Budget, DataSpec, HealConfig, HealObserver, LossKind, MetricRow,
    Precision, Schedule, TrainSet,
};

#[derive(clap::Args)]
pub struct Args {
    /// Model to heal: directory, .gguf file or Hub id.
    pub model: String,
    /// Training text: plain text files (one document each) or .jsonl with a `text` field.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Output directory: the healed model, metrics.csv, loss.png, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Teacher for distillation (same vocabulary), e.g. the model before surgery.
    #[arg(long)]
    pub teacher: Option<String>,
    /// lm, kd, kd+lm, attention-transfer or attention-weights (Hedgehog layers learn the teacher's
    /// softmax attention: MSE of the attention outputs, LoLCATs, or cross-entropy of the attention
    /// weights, Hedgehog; use with --train feature-maps). Default: kd with a teacher, lm without.
    #[arg(long)]
    pub loss: Option<LossKind>,
    /// W in W*KD + (1-W)*LM for --loss kd+lm.
    #[arg(long, default_value_t = defaults().kd_weight)]
    pub kd_weight: f64,
    /// Weight of the MoE load-balancing loss added when the model has routed MoE layers.
    #[arg(long, default_value_t = defaults().aux_coef)]
    pub aux_coef: f64,
    /// Distillation temperature T (the KL is multiplied by T^2).
    #[arg(long, default_value_t = defaults().temperature)]
    pub temperature: f64,
    /// all, new-blocks, embeddings, new-embeddings, feature-maps (Hedgehog feature maps and
    /// window factors), lora[:r=8,alpha=16,targets=q+k+v+o+gate+up+down] (adapters on those
    /// linear layers, merged into their weights when saving), clover (CLOVER singular-value
    /// fine-tuning: per-head cores of q_proj and of the value-output SVD, per-block cores of
    /// up_proj, merged when saving), or a regex over HF tensor names.
    #[arg(long, default_value_t = defaults().train)]
    pub train: TrainSet,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "tokens")]
    pub steps: Option<u64>,
    /// Training tokens (rounded up to whole steps).
    #[arg(long)]
    pub tokens: Option<u64>,
    #[arg(long, default_value_t = defaults().seq_len)]
    pub seq_len: usize,
    #[arg(long, default_value_t = defaults().batch)]
    pub batch: usize,
    #[arg(long, default_value_t = defaults().grad_accum)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = defaults().lr)]
    pub lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = defaults().warmup)]
    pub warmup: u64,
    /// linear (to zero), cosine or constant.
    #[arg(long, default_value_t = defaults().schedule)]
    pub schedule: Schedule,
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off; otherwise positive and finite).
    #[arg(long, default_value_t = defaults().clip.unwrap_or(0.0))]
    pub clip: f64,
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Held-out text (default: the last 5% of --data). heal's before/after perplexity scores it in
    /// packed --seq-len windows (documents joined by EOS), so compare it with `surgeon eval
    /// --window SEQ_LEN` on the same text: eval's default window of 512 sees longer contexts and
    /// gives a lower perplexity (SmolLM2 on held-out pydoc text: 16.87 at 128, 10.74 at 256).
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Evaluate perplexity every N steps (0: only before and after).
    #[arg(long, default_value_t = defaults().eval_every)]
    pub eval_every: u64,
    /// Checkpoint every N steps into OUT/checkpoints/step-N (Ctrl-C also checkpoints).
    #[arg(long, default_value_t = defaults().save_every)]
    pub save_every: u64,
    /// Continue from a checkpoint (or from OUT, taking its latest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// f32, or bf16 mixed precision: matmuls in bf16, parameters (master weights), optimizer
    /// state and loss in f32; a teacher's linear weights are stored in bf16. Refused on a backend
    /// that cannot compute in bf16.
    #[arg(long, default_value_t = defaults().precision)]
    pub precision: Precision,
    /// Recompute memory-bound activations in the backward pass instead of keeping them (burn's
    /// balanced checkpointing): less memory, the same gradients.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Data-parallel healing on these device indices of the backend (e.g. 0,1): each device takes
    /// an equal share of every batch; the update equals one device with the whole batch.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub devices: Vec<usize>,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
}

/// The library's defaults, which the flags show and use.
fn defaults() -> HealConfig {
    HealConfig::default()
}

pub fn run(a: Args) -> Result<()> {
    let loss = a.loss.unwrap_or(if a.teacher.is_some() {
        LossKind::Kd
    } else {
        LossKind::Lm
    });
    let budget = match (a.steps, a.tokens) {
        (Some(s), _) => Budget::Steps(s),
        (None, Some(t)) => Budget::Tokens(t),
        (None, None) => bail!("give --steps N or --tokens N"),
    };
    let student = surgeon_formats::open_model(&a.model)?;
    let teacher = match &a.teacher {
        Some(t) => Some(surgeon_formats::open_model(t)?),
        None => None,
    };
    let clover_factors = match a.train {
        TrainSet::Clover => Some(Arc::new(surgeon::clover_factors(&student)?)),
        _ => None,
    };
    let cfg = HealConfig {
        data: DataSpec::Files(a.data),
        eval_data: (!a.eval_data.is_empty()).then_some(DataSpec::Files(a.eval_data)),
        out: a.out,
        loss,
        kd_weight: a.kd_weight,
        temperature: a.temperature,
        kd_scale_t2: true,
        aux_coef: a.aux_coef,
        train: a.train,
        budget,
        seq_len: a.seq_len,
        batch: a.batch,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup: a.warmup,
        schedule: a.schedule,
        weight_decay: a.weight_decay,
        // 0 turns clipping off; NaN and negative values reach validation as themselves.
        clip: (a.clip != 0.0).then_some(a.clip),
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        resume: a.resume,
        backend: a.backend.backend,
        precision: a.precision,
        checkpoint_activations: a.checkpoint_activations,
        devices: a.devices,
        force: a.force,
        stop: Some(install_ctrlc()?),
        stop_after: None,
        command: command_line(),
        clover_factors,
    };
    let r = heal_with(&cfg, student, teacher, &mut Progress::new())?;
    let ppl = |p: Option<f64>| p.map(|p| format!("{p:.3}")).unwrap_or("-".into());
    if r.interrupted {
        return Err(Interrupted(format!(
            "interrupted at step {}/{}; checkpoint {} (continue with --resume {})",
            r.steps,
            r.total_steps,
            r.last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.out.display()
        ))
        .into());
    }
    let via = match &cfg.train {
        TrainSet::Lora(spec) => format!(" through {spec} adapters, merged"),
        TrainSet::Clover => " through CLOVER cores, merged".into(),
        _ => String::new(),
    };
    eprintln!(
        "healed {} tensors ({} parameters{via}) for {} steps, {} tokens at {:.0} tokens/s; \
         eval perplexity {} -> {}; wrote {}",
        r.trainable_tensors.len(),
        surgeon_formats::plan::group_digits(r.trainable_parameters),
        r.steps,
        r.tokens,
        r.tokens_per_second,
        ppl(r.eval_ppl_before),
        ppl(r.eval_ppl_after),
        cfg.out.display()
    );
    Ok(())
}

/// The progress bar of a healing run; without a terminal, one line per step instead.
pub struct Progress {
    bar: indicatif::ProgressBar,
    plain: bool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
            plain: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl HealObserver for Progress {
    fn on_start(&mut self, step: u64, total: u64, last: Option<&MetricRow>) {
        self.bar = indicatif::ProgressBar::new(total);
        self.bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, eta {eta_precise}]",
            )
            .expect("valid template"),
        );
        self.bar.set_position(step);
        if self.plain {
            if let Some(p) = last.and_then(|r| r.eval_ppl) {
                eprintln!("step {step}/{total} eval ppl {p:.3}");
            }
        }
    }

    fn on_step(&mut self, r: &MetricRow, total: u64, tokens_per_second: f64) {
        let msg = format!(
            "loss {:.4} lr {:.2e} {tokens_per_second:.0} tok/s",
            r.loss, r.lr
        );
        if self.plain {
            let ppl = r
                .eval_ppl
                .map(|p| format!(" eval ppl {p:.3}"))
                .unwrap_or_default();
            eprintln!(
                "step {}/{total} {msg} grad_norm {:.3}{ppl}",
                r.step, r.grad_norm
            );
        }
        self.bar.set_message(msg);
        self.bar.set_position(r.step);
    }

    fn on_finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
