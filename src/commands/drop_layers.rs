//! `surgeon drop-layers`: remove decoder layers, given by index (`--layers`) or chosen as the `--count`
//! layers of lowest block influence on calibration text (`--data`).
use super::common::{command_line, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use surgeon_distill::{probe, text, Llama};

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
    /// Calibration text (.txt, or .jsonl with a "text" field) for --count.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Score on at most this many calibration tokens.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Tokens per scoring window (capped at the model's context).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
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
        (None, Some(k)) => {
            let path = a.data.as_ref().expect("clap requires --data with --count");
            let n = plan.arch.num_layers();
            if k == 0 || k >= n {
                bail!("--count {k}: the model has {n} layers, so --count must be in 1..{n}");
            }
            let tok = text::load_tokenizer(&plan)?;
            let data = surgeon_distill::eval::read_text(path)?;
            let ids = text::encode(&tok, &data)?;
            let ids = &ids[..ids.len().min(a.max_tokens)];
            if ids.is_empty() {
                bail!("{}: no calibration tokens", path.display());
            }
            let window = a
                .window
                .max(1)
                .min(plan.arch.max_position_embeddings.max(1));
            type B = surgeon_distill::burn::backend::Flex;
            let model = Llama::<B>::from_plan(&plan, &Default::default())?;
            let scores = probe::block_influences(&model, ids, window).context("scoring layers")?;
            println!(
                "block influence on {} tokens (1 - cos, lower = less important):",
                ids.len()
            );
            for (i, s) in scores.iter().enumerate() {
                println!("  layer {i:>3}: {s:.6}");
            }
            let drop = surgeon_surgery::lowest_influence(&scores, k)?;
            if let Some(p) = &a.plot {
                plot_influence(p, &scores, &drop, ids.len())?;
                eprintln!("wrote {}", p.display());
            }
            println!(
                "dropping {}",
                drop.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            drop
        }
        (None, None) => bail!("give --layers I,J,... or --count K --data FILE"),
    };
    let plan = surgeon_surgery::drop_layers(&plan, &layers)?;
    a.output.finish(plan, command_line())
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
