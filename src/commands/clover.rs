//! `surgeon clover`: every key/value head's value-output pair in its singular basis (CLOVER), and
//! optionally pruned to its strongest directions, data-aware on calibration text by default.
use super::common::{command_line, BackendArgs, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use surgeon_convert::clover::ChannelOrder;
use surgeon_convert::{CloverOptions, CloverReport, InputStats, VoRank};
use surgeon_distill::calibrate::{self, Calibration};
use surgeon_formats::plan::group_digits;
use surgeon_formats::Plan;

/// Channel-pruning baselines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    Magnitude,
    Random,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Drop this fraction of every value head's directions (0 < RATIO < 1).
    #[arg(long, value_name = "RATIO", group = "prune")]
    pub prune_vo: Option<f64>,
    /// Keep R directions per value head.
    #[arg(long, value_name = "R", group = "prune")]
    pub vo_rank: Option<usize>,
    /// Keep the fewest directions whose squared singular values reach E of each head's total
    /// (0 < E <= 1); a layer keeps what its most demanding head needs.
    #[arg(long, value_name = "E", group = "prune")]
    pub energy: Option<f64>,
    /// Calibration text (.txt, or .jsonl with a "text" field): the SVD is of the product whitened by
    /// the covariance of each layer's attention input on it (required for pruning unless
    /// --weights-only).
    #[arg(long, value_name = "FILE", visible_alias = "data")]
    pub calib: Option<PathBuf>,
    /// Use at most this many calibration tokens.
    #[arg(long, default_value_t = Calibration::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// Tokens per calibration forward pass (capped at the model's context).
    #[arg(long, default_value_t = Calibration::DEFAULT_WINDOW)]
    pub window: usize,
    /// Plain SVD of the weights (the paper's form; fails on models with massive activations).
    #[arg(long, conflicts_with = "calib")]
    pub weights_only: bool,
    /// Keep the original value head size, pruned directions as zero rows (a standard class loads
    /// it; no memory saved).
    #[arg(long)]
    pub pad: bool,
    /// Also decompose query-key products (refused on RoPE models: the basis would not commute
    /// with the rotations).
    #[arg(long)]
    pub qk: bool,
    /// Baseline instead of CLOVER (for comparisons): with --prune-vo, keep each head's original
    /// value channels by magnitude or at random (seed 0), no rotation.
    #[arg(long, value_enum, requires = "prune_vo", conflicts_with_all = ["calib", "vo_rank", "energy"])]
    pub baseline: Option<Baseline>,
    /// Draw each layer's singular-value spectrum (FILE.svg or FILE.png).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let rank = match (a.prune_vo, a.vo_rank, a.energy) {
        (Some(r), _, _) => VoRank::Prune(r),
        (_, Some(r), _) => VoRank::Rank(r),
        (_, _, Some(e)) => VoRank::Energy(e),
        _ => VoRank::Full,
    };
    let opts = CloverOptions {
        rank,
        qk: a.qk,
        pad: a.pad,
    };
    surgeon_convert::clover::check_options(&plan, &opts)?;
    if let (Some(b), Some(ratio)) = (a.baseline, a.prune_vo) {
        let order = match b {
            Baseline::Magnitude => ChannelOrder::Magnitude,
            Baseline::Random => ChannelOrder::Random { seed: 0 },
        };
        let out = surgeon_convert::clover::prune_vo_channels(&plan, ratio, order)?;
        return a.output.finish(out, command_line());
    }
    if rank != VoRank::Full && a.calib.is_none() && !a.weights_only {
        bail!(
            "pruning is data-aware by default: give --calib FILE (calibration text), or \
             --weights-only for the plain SVD of the weights (which fails on models with massive \
             activations, SmolLM2 among them)"
        );
    }
    let stats = match &a.calib {
        Some(data) => Some(input_stats(&a, &plan, data)?),
        None => None,
    };
    let (out, report) = surgeon_convert::clover(&plan, &opts, stats.as_deref())?;
    print_report(&plan, &out, &report);
    if let Some(p) = &a.plot {
        plot_spectra(p, &report)?;
        eprintln!("wrote {}", p.display());
    }
    a.output.finish(out, command_line())
}

/// Second moments of every layer's attention input on the calibration text.
fn input_stats(a: &Args, plan: &Plan, data: &Path) -> Result<Vec<InputStats>> {
    let cal = Calibration {
        data: data.to_path_buf(),
        max_tokens: a.max_tokens,
        window: a.window,
    };
    let (moments, tokens) = calibrate::attention_input_moments(plan, &cal, a.backend.backend)
        .context("measuring attention inputs on the calibration text")?;
    eprintln!("calibration: attention-input covariance of every layer on {tokens} tokens");
    Ok(moments
        .into_iter()
        .map(|m| InputStats {
            tokens: m.tokens,
            sum_outer: m.sum_outer,
            sum: m.sum,
        })
        .collect())
}

/// Per layer: directions kept and the energy each head keeps; then what the model saves.
fn print_report(before: &Plan, after: &Plan, report: &CloverReport) {
    let basis = if report.data_aware {
        "whitened by calibration inputs"
    } else {
        "weights only"
    };
    println!("value-output spectrum per KV head ({basis}):");
    let mut layer = usize::MAX;
    for h in &report.heads {
        if h.layer != layer {
            if layer != usize::MAX {
                println!();
            }
            layer = h.layer;
            print!(
                "  layer {layer:>3}: keeps {}/{} directions; energy kept per head",
                h.kept,
                h.singular_values.len()
            );
        }
        print!(" {:.4}", h.energy_kept());
    }
    println!();
    let (p0, p1) = (before.parameter_count(), after.parameter_count());
    let (k0, k1) = (
        2 * before.arch.kv_cache_values_per_token(),
        2 * after.arch.kv_cache_values_per_token(),
    );
    println!(
        "parameters {} -> {} ({:+.2}%); KV cache per token at 16 bits {} -> {} bytes ({:+.2}%)",
        group_digits(p0),
        group_digits(p1),
        percent(p0, p1),
        group_digits(k0),
        group_digits(k1),
        percent(k0, k1)
    );
}

fn percent(before: u64, after: u64) -> f64 {
    100.0 * (after as f64 - before as f64) / (before as f64).max(1.0)
}

/// One line per layer: log10 of its singular values relative to the largest, averaged over its
/// KV heads.
fn plot_spectra(path: &Path, report: &CloverReport) -> Result<()> {
    use surgeon_distill::plot::{line_chart, Axis, LineChart, Mark, Series};
    let mut series: Vec<Series> = vec![];
    for h in &report.heads {
        let top = h.singular_values[0].max(f64::MIN_POSITIVE);
        let logs = h
            .singular_values
            .iter()
            .map(|s| (s / top).max(1e-12).log10());
        match series.last_mut() {
            Some(s) if h.kv_head > 0 => {
                // Running mean over the layer's heads.
                let n = h.kv_head as f64;
                for (p, y) in s.points.iter_mut().zip(logs) {
                    p.1 = (p.1 * n + y) / (n + 1.0);
                }
            }
            _ => series.push(Series {
                name: format!("layer {}", h.layer),
                points: logs.enumerate().map(|(j, y)| (j as f64, y)).collect(),
                axis: Axis::Left,
                mark: Mark::Line,
            }),
        }
    }
    let chart = LineChart {
        title: "CLOVER value-output spectrum per layer (mean over KV heads)".into(),
        x_label: "direction (sorted by singular value)".into(),
        y_label: "log10(sigma / sigma_max)".into(),
        y2_label: None,
        series,
    };
    line_chart(path, &chart)?;
    Ok(())
}
