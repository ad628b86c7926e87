//! `surgeon drop-layers`: remove decoder layers, given by index (`--layers`) or chosen as the `--count`
//! layers of lowest block influence on calibration text (`--data`).
use super::common::{command_line, BackendArgs, CalibrationArgs, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use surgeon_distill::calibrate;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Layers to remove, e.g. 3,7,12 (the rest are renumbered).
    #[arg(
        long,
        value_name = "I,J,...",
        required_unless_present = "count",
        conflicts_with = "count"
    )]
    pub layers: Option<String>,
    /// Remove the K layers of lowest block influence (1 - cos(hidden in, hidden out), averaged over
    /// the tokens of --data); the scores are printed.
    #[arg(long, value_name = "K", requires = "data")]
    pub count: Option<usize>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// With --count: draw the block influence of every layer, dropped layers highlighted
    /// (FILE.svg or FILE.png).
    #[arg(long, value_name = "FILE", requires = "count")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let layers = match (&a.layers, a.count) {
        (Some(l), _) => surgeon_surgery::parse_indices(l)?,
        (None, Some(k)) => choose_by_influence(&a, &plan, k)?,
        (None, None) => bail!("give --layers I,J,... or --count K --data FILE"),
    };
    let plan = surgeon_surgery::drop_layers(&plan, &layers)?;
    a.output.finish(plan, command_line())
}

/// The `k` layers of lowest block influence on the calibration text; prints every score.
fn choose_by_influence(a: &Args, plan: &surgeon_formats::Plan, k: usize) -> Result<Vec<usize>> {
    let cal = a
        .calibration
        .calibration()
        .expect("clap requires --data with --count");
    let n = plan.arch.num_layers();
    if k == 0 || k >= n {
        bail!("--count {k}: the model has {n} layers, so --count must be in 1..{n}");
    }
    let bi = calibrate::block_influence(plan, &cal, a.backend.backend).context("scoring layers")?;
    println!(
        "block influence on {} tokens (1 - cos, lower = less important):",
        bi.tokens
    );
    for (i, s) in bi.scores.iter().enumerate() {
        println!("  layer {i:>3}: {s:.6}");
    }
    let drop = surgeon_surgery::lowest_influence(&bi.scores, k)?;
    if let Some(p) = &a.plot {
        plot_influence(p, &bi.scores, &drop, bi.tokens)?;
        eprintln!("wrote {}", p.display());
    }
    let list: Vec<String> = drop.iter().map(|i| i.to_string()).collect();
    println!("dropping {}", list.join(","));
    Ok(drop)
}

/// Bar chart of the block influence per layer, the dropped layers in the second colour.
fn plot_influence(
    path: &std::path::Path,
    scores: &[f64],
    drop: &[usize],
    tokens: usize,
) -> Result<()> {
    use surgeon_distill::plot::{bar_chart, Bar, BarChart};
    let chart = BarChart {
        title: format!("Block influence per layer ({tokens} calibration tokens)"),
        x_label: "layer".into(),
        y_label: "block influence, 1 - cos(in, out)".into(),
        bars: scores
            .iter()
            .enumerate()
            .map(|(i, &value)| Bar {
                x: i as i64,
                value,
                highlight: drop.contains(&i),
            })
            .collect(),
        label: "kept".into(),
        highlight_label: format!("dropped ({} lowest)", drop.len()),
    };
    bar_chart(path, &chart)?;
    Ok(())
}
