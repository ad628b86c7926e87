//! The run loop of `heal`: a [`HealPlan`], a [`Trainer`] started or resumed, steps with periodic
//! evaluation and checkpoints, then the healed model written. Progress goes to a [`HealObserver`].
use super::checkpoint::find_checkpoint;
use super::metrics::{plot_loss, write_csv};
use super::plan::HealPlan;
use super::trainer::{Diverged, Trainer};
use super::{io_err, Error, HealConfig, HealReport, MetricRow, Result};
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;
use surgeon_formats::{write_model, Plan, WriteOptions};

/// What a healing run reports while it runs (the CLI draws a progress bar). All no-ops by default.
pub trait HealObserver {
    /// Before the first step of this run: `step` of `total` done; `last` is the latest metric row
    /// (the baseline evaluation on a fresh start).
    fn on_start(&mut self, _step: u64, _total: u64, _last: Option<&MetricRow>) {}
    /// After each step, with the training throughput of this run so far.
    fn on_step(&mut self, _row: &MetricRow, _total: u64, _tokens_per_second: f64) {}
    /// When the loop ends (finished or interrupted).
    fn on_finish(&mut self) {}
}

/// The observer that shows nothing.
pub struct Quiet;
impl HealObserver for Quiet {}

/// Writes `plan` into `out` (atomically) without losing `out/checkpoints` written during training.
fn write_final(plan: &Plan, out: &Path, description: &str) -> Result<()> {
    let opts = WriteOptions {
        force: true,
        description: description.into(),
        ..Default::default()
    };
    let ck = super::checkpoint::checkpoints_dir(out);
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

/// The checkpoint to resume from (if any), after checking that `cfg.out` may be written (see
/// [`super::check_heal_output`]).
fn check_output(
    cfg: &HealConfig,
    student: &Plan,
    teacher: Option<&Plan>,
) -> Result<Option<PathBuf>> {
    let out = &cfg.out;
    let resume_dir = match &cfg.resume {
        Some(d) => Some(find_checkpoint(d)?),
        None => None,
    };
    let resuming_in_out = resume_dir
        .as_ref()
        .is_some_and(|d| d.starts_with(out) || d.canonicalize().ok() == out.canonicalize().ok());
    super::check_heal_output(cfg, student, teacher, resuming_in_out)?;
    Ok(resume_dir)
}

/// The error for a diverged step: nothing is written, the last good checkpoint (if any) stays
/// for `--resume`.
fn diverged(d: Diverged, last_good: Option<&Path>, out: &Path) -> Error {
    let keep = match last_good {
        Some(p) => format!(
            "the last good checkpoint is {} (continue with `resume` {} and a lower `lr`)",
            p.display(),
            out.display()
        ),
        None => "no checkpoint was saved before it (`save_every` N keeps one)".to_string(),
    };
    Error::Invalid(format!(
        "step {}: the loss ({}) or gradient norm ({}) is not finite: training diverged and \
         stopped; no model was written; {keep}",
        d.step, d.loss, d.grad_norm
    ))
}

/// Time and tokens of the steps run in this process (evaluation excluded from throughput).
struct Clock {
    start: Instant,
    eval_secs: f64,
    tokens: u64,
}

impl Clock {
    fn tokens_per_second(&self) -> f64 {
        let secs = self.start.elapsed().as_secs_f64() - self.eval_secs;
        self.tokens as f64 / secs.max(1e-9)
    }
}

/// How the loop ended.
struct Outcome {
    clock: Clock,
    last_checkpoint: Option<PathBuf>,
    interrupted: bool,
}

/// Steps until the plan is done or a stop is requested; evaluates and checkpoints on schedule.
fn run_loop<B: AutodiffBackend>(
    plan: &HealPlan,
    t: &mut Trainer<'_, B>,
    resumed_from: Option<&Path>,
    observer: &mut dyn HealObserver,
) -> Result<Outcome> {
    let (cfg, total) = (&plan.cfg, plan.total_steps);
    observer.on_start(t.step_count(), total, t.metrics().last());
    let mut o = Outcome {
        clock: Clock {
            start: Instant::now(),
            eval_secs: 0.0,
            tokens: 0,
        },
        last_checkpoint: None,
        interrupted: false,
    };
    while !t.done() {
        let mut row = match t.step() {
            Ok(row) => row,
            Err(d) => {
                write_csv(&cfg.out.join("metrics.csv"), t.metrics())?;
                let last_good = o.last_checkpoint.as_deref().or(resumed_from);
                return Err(diverged(d, last_good, &cfg.out));
            }
        };
        o.clock.tokens += plan.tokens_per_step;
        let step = row.step;
        let stop_now = cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
            || cfg.stop_after.is_some_and(|n| step >= n);
        if step == total || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) {
            let e = Instant::now();
            row.eval_ppl = Some(t.evaluate());
            o.clock.eval_secs += e.elapsed().as_secs_f64();
        }
        t.record(row.clone());
        observer.on_step(&row, total, o.clock.tokens_per_second());
        let save_due = cfg.save_every > 0 && step.is_multiple_of(cfg.save_every);
        if step < total && (stop_now || save_due) {
            o.last_checkpoint = Some(t.checkpoint(&cfg.out)?);
        }
        if stop_now && step < total {
            o.interrupted = true;
            break;
        }
    }
    observer.on_finish();
    Ok(o)
}

fn report<B: AutodiffBackend>(plan: &HealPlan, t: &Trainer<'_, B>, o: &Outcome) -> HealReport {
    let state = t.state();
    let metrics = t.metrics();
    HealReport {
        steps: state.step,
        total_steps: plan.total_steps,
        tokens: state.step * plan.tokens_per_step,
        trainable_tensors: plan.sel.names.clone(),
        trainable_parameters: plan.trainable_parameters,
        eval_ppl_before: state.eval_ppl_before,
        eval_ppl_after: match o.interrupted {
            true => None,
            false => metrics.last().and_then(|r| r.eval_ppl),
        },
        final_loss: metrics.last().map(|r| r.loss).filter(|l| l.is_finite()),
        interrupted: o.interrupted,
        last_checkpoint: o.last_checkpoint.clone(),
        model_dir: None,
        tokens_per_second: o.clock.tokens_per_second(),
        metrics: metrics.to_vec(),
    }
}

/// Heals `student` on backend `B` (see [`super::heal`] for the backend choice), reporting
/// progress to `observer`.
pub fn heal_on<B: AutodiffBackend>(
    cfg: &HealConfig,
    student: Plan,
    teacher: Option<Plan>,
    device: &B::Device,
    observer: &mut dyn HealObserver,
) -> Result<HealReport> {
    let devices = std::slice::from_ref(device);
    heal_on_devices::<B>(cfg, student, teacher, devices, observer)
}

/// [`heal_on`] data-parallel over `devices` (see [`Trainer::start_on`]).
pub fn heal_on_devices<B: AutodiffBackend>(
    cfg: &HealConfig,
    student: Plan,
    teacher: Option<Plan>,
    devices: &[B::Device],
    observer: &mut dyn HealObserver,
) -> Result<HealReport> {
    let sel = HealPlan::validate(cfg, &student, teacher.as_ref())?;
    let resume = check_output(cfg, &student, teacher.as_ref())?;
    let data = super::data::prepare(&student, &cfg.data, cfg.eval_data.as_ref(), cfg.seq_len)?;
    let plan = HealPlan::with_data(cfg, &student, sel, data)?;
    let teacher = teacher.as_ref();
    let mut trainer = match &resume {
        Some(dir) => Trainer::<B>::resume_on(&plan, &student, teacher, dir, devices)?,
        None => Trainer::<B>::start_on(&plan, &student, teacher, devices)?,
    };
    let out = &cfg.out;
    surgeon_formats::output::create_output_dir(out, &plan.history_line)?;
    let outcome = run_loop(&plan, &mut trainer, resume.as_deref(), observer)?;
    let mut report = report(&plan, &trainer, &outcome);
    if outcome.interrupted {
        write_csv(&out.join("metrics.csv"), &report.metrics)?;
        return Ok(report);
    }
    let healed = trainer.finish()?;
    write_final(&healed, out, &plan.history_line)?;
    write_csv(&out.join("metrics.csv"), &report.metrics)?;
    plot_loss(&out.join("loss.png"), &report.metrics)?;
    plot_loss(&out.join("loss.svg"), &report.metrics)?;
    report.model_dir = Some(out.clone());
    Ok(report)
}
