//! `surgeon search`: neural architecture search under a parameter budget. Scores every layer's
//! block variants by KL to the parent, finds the exact optimum of the additive scores (DP), runs
//! NSGA-II over one block per layer, re-measures the best candidates whole, and writes
//! `front.json`, `front.png`, `library.json` (and with `--pick` the chosen model under `model/`).
use super::common::{command_line, BackendArgs, CalibrationArgs};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use surgeon_distill::backend::BackendJob;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::calibrate;
use surgeon_formats::output::{check_output, TempOutput};
use surgeon_formats::{ImportanceScores, Plan};
use surgeon_search::front::{parse_budget, run as run_search, FrontReport, RunOptions};
use surgeon_search::library::BlockLibrary;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Parameter budget, e.g. params=90M.
    #[arg(long)]
    pub budget: String,
    /// Objectives to minimise: kl,params or kl,params,latency.
    #[arg(long, default_value = "kl,params")]
    pub objectives: String,
    #[arg(long, default_value_t = 48)]
    pub population: usize,
    #[arg(long, default_value_t = 40)]
    pub generations: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Front members nearest the budget re-measured with the whole sub-network.
    #[arg(long, default_value_t = 4)]
    pub remeasure: usize,
    /// Importance scores (`surgeon importance`); computed on --data when absent.
    #[arg(long, value_name = "FILE")]
    pub scores: Option<PathBuf>,
    /// Also write a sub-network to DIR/model: `best` (least re-measured KL) or a front index.
    #[arg(long, value_name = "best|N")]
    pub pick: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output directory (one surgeon wrote).
    #[arg(long)]
    pub force: bool,
}

struct Job<'a> {
    plan: &'a Plan,
    scores: &'a ImportanceScores,
    windows: Vec<&'a [u32]>,
    opts: RunOptions,
}

impl BackendJob for Job<'_> {
    type Output = surgeon_search::Result<(FrontReport, BlockLibrary)>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {elapsed}")
                .expect("template"),
        );
        let r = run_search::<B>(
            self.plan,
            self.scores,
            &self.windows,
            &self.opts,
            &device,
            &mut |what, done, total| {
                bar.set_message(what.to_string());
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        );
        bar.finish_and_clear();
        r
    }
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let Some(cal) = a.calibration.calibration() else {
        bail!("give calibration text with --data FILE");
    };
    let budget = parse_budget(&a.budget)?;
    surgeon_search::nsga::Objectives::parse(&a.objectives)?;
    let floor = surgeon_search::library::fixed_params(&plan.arch);
    if floor > budget {
        bail!(
            "--budget {budget} is below the smallest sub-network: embeddings and final norm alone have {floor} parameters"
        );
    }
    let inputs = [PathBuf::from(&a.model), cal.data.clone()];
    check_output(&a.out, &inputs, a.force)?;
    let scores = match &a.scores {
        Some(p) => ImportanceScores::read(p)?,
        None => {
            calibrate::importance(&plan, &cal, a.backend.backend).context("scoring importance")?
        }
    };
    let ids = cal.tokens(&plan)?;
    let opts = RunOptions {
        budget,
        objectives: a.objectives.clone(),
        population: a.population,
        generations: a.generations,
        seed: a.seed,
        remeasure: a.remeasure,
    };
    let windows = ids.chunks(cal.window_for(&plan)).collect();
    let start = std::time::Instant::now();
    let (report, lib) = a.backend.backend.run(Job {
        plan: &plan,
        scores: &scores,
        windows,
        opts,
    })??;
    eprintln!("searched in {:.1} s", start.elapsed().as_secs_f64());
    let tmp = TempOutput::create(&a.out, &command_line())?;
    std::fs::write(
        tmp.path().join("front.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        tmp.path().join("library.json"),
        serde_json::to_string_pretty(&lib)?,
    )?;
    plot_front(&tmp.path().join("front.png"), &report)?;
    print_front(&report);
    if let Some(p) = &a.pick {
        let i = match p.as_str() {
            "best" => report.chosen,
            n => n
                .parse::<usize>()
                .ok()
                .filter(|&i| i < report.members.len())
                .with_context(|| {
                    format!(
                        "--pick {n}: expected best or an index below {}",
                        report.members.len()
                    )
                })?,
        };
        let sub = surgeon_search::prune(&plan, &report.members[i].spec, Some(&scores))?;
        let opts = surgeon_formats::WriteOptions {
            description: command_line(),
            ..Default::default()
        };
        surgeon_formats::write_model(&sub, &tmp.path().join("model"), &opts)?;
    }
    tmp.commit()?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn print_front(r: &FrontReport) {
    println!(
        "{:>3}  {:>12}  {:>11}  {:>11}  {:>9}",
        "#", "parameters", "additive KL", "measured KL", "latency s"
    );
    for (i, m) in r.members.iter().enumerate() {
        let measured = m.measured_kl.map_or("-".into(), |k| format!("{k:.4}"));
        let mark = if i == r.chosen { " <- chosen" } else { "" };
        println!(
            "{i:>3}  {:>12}  {:>11.4}  {measured:>11}  {:>9.3}{mark}",
            m.params, m.additive_kl, m.latency_s
        );
    }
    let dp = &r.dp;
    println!(
        "DP optimum of the additive KL: {} parameters, additive {:.4}, measured {}",
        dp.params,
        dp.additive_kl,
        dp.measured_kl.map_or("-".into(), |k| format!("{k:.4}"))
    );
}

fn plot_front(path: &Path, r: &FrontReport) -> Result<()> {
    use surgeon_distill::plot::{line_chart, Axis, LineChart, Mark, Series};
    let m = |p: u64| p as f64 / 1e6;
    let series = |name: &str, points: Vec<(f64, f64)>| Series {
        name: name.into(),
        points,
        axis: Axis::Left,
        mark: Mark::LinePoints,
    };
    let mut front: Vec<(f64, f64)> = r
        .members
        .iter()
        .map(|x| (m(x.params), x.additive_kl))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut measured: Vec<(f64, f64)> = r
        .members
        .iter()
        .filter_map(|x| Some((m(x.params), x.measured_kl?)))
        .collect();
    measured.sort_by(|a, b| a.0.total_cmp(&b.0));
    let c = &r.members[r.chosen];
    let chosen = vec![(m(c.params), c.measured_kl.unwrap_or(c.additive_kl))];
    let chart = LineChart {
        title: format!("Pareto front under {:.1}M parameters", m(r.budget_params)),
        x_label: "parameters (M)".into(),
        y_label: "KL to the parent (nats/token)".into(),
        y2_label: None,
        series: vec![
            series("front: additive block KL", front),
            series("re-measured whole", measured),
            series("chosen", chosen),
        ],
    };
    line_chart(path, &chart)?;
    Ok(())
}
