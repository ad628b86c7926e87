//! `surgeon prune`: extract a sub-network keeping the most important neurons, heads, KV groups
//! and hidden channels (scores from `surgeon importance`), uniformly (`--ffn`, `--heads-per-group`,
//! `--kv-heads`, `--hidden`, `--drop-layers`, `--keep-layers`) or per layer (`--spec`).
use super::common::{command_line, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use surgeon_formats::ImportanceScores;
use surgeon_search::{PruneSpec, UniformPrune};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// MLP width of every kept layer (neurons of highest importance).
    #[arg(long, value_name = "N")]
    pub ffn: Option<usize>,
    /// Query heads kept in each KV group (those of highest importance).
    #[arg(long, value_name = "K")]
    pub heads_per_group: Option<usize>,
    /// KV groups kept per layer (whole groups with their query heads, highest importance first).
    #[arg(long, value_name = "G")]
    pub kv_heads: Option<usize>,
    /// Hidden size (channels of highest importance over all RMSNorm outputs).
    #[arg(long, value_name = "H")]
    pub hidden: Option<usize>,
    /// Remove the N layers of lowest block influence (from --scores).
    #[arg(long, value_name = "N", conflicts_with = "keep_layers")]
    pub drop_layers: Option<usize>,
    /// Keep only these layers, e.g. 0,1,2,5 (the rest are removed).
    #[arg(long, value_name = "I,J,...")]
    pub keep_layers: Option<String>,
    /// Per-layer sub-network (JSON, as `surgeon search` writes in front.json).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ffn", "heads_per_group", "kv_heads", "hidden", "drop_layers", "keep_layers"])]
    pub spec: Option<PathBuf>,
    /// Importance scores from `surgeon importance` (needed to cut any width or for --drop-layers).
    #[arg(long, value_name = "FILE")]
    pub scores: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let scores = match &a.scores {
        Some(p) => Some(ImportanceScores::read(p)?),
        None => None,
    };
    let spec = match &a.spec {
        Some(p) => PruneSpec::read(p)?,
        None => PruneSpec::uniform(&plan.arch, &uniform(&a, &plan, scores.as_ref())?),
    };
    let out = surgeon_search::prune(&plan, &spec, scores.as_ref())
        .with_context(|| format!("pruning {}", a.model))?;
    eprintln!(
        "{} -> {} parameters ({:.1}%)",
        surgeon_formats::plan::group_digits(plan.parameter_count()),
        surgeon_formats::plan::group_digits(out.parameter_count()),
        100.0 * out.parameter_count() as f64 / plan.parameter_count() as f64
    );
    a.output.finish(out, command_line())
}

fn uniform(
    a: &Args,
    plan: &surgeon_formats::Plan,
    scores: Option<&ImportanceScores>,
) -> Result<UniformPrune> {
    let keep_layers = match (&a.keep_layers, a.drop_layers) {
        (Some(l), _) => Some(surgeon_surgery::parse_indices(l)?),
        (None, Some(n)) => {
            let Some(s) = scores else {
                bail!("--drop-layers N removes the layers of lowest block influence: give --scores FILE");
            };
            s.check(&plan.arch)?;
            let drop = surgeon_surgery::lowest_influence(&s.block_influence, n)?;
            Some(
                (0..plan.arch.num_layers())
                    .filter(|i| !drop.contains(i))
                    .collect(),
            )
        }
        (None, None) => None,
    };
    Ok(UniformPrune {
        intermediate_size: a.ffn,
        heads_per_group: a.heads_per_group,
        kv_heads: a.kv_heads,
        hidden_size: a.hidden,
        keep_layers,
    })
}
