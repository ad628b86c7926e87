//! `surgeon convert-attention`: change how attention is computed (regroup key/value heads, or
//! linearise it with Hedgehog feature maps).
use super::common::{command_line, OutputArgs};
use anyhow::{bail, Result};
use surgeon_convert::HedgehogOptions;

/// The attention to convert to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Grouped-query attention with --kv-heads key/value heads (mean-pooled in groups).
    Gqa,
    /// Multi-head attention: one key/value head per query head (repeated; exact).
    Mha,
    /// Hedgehog linear attention (LoLCATs hybrid with --window > 0); heal it afterwards.
    Hedgehog,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// gqa, mha or hedgehog.
    #[arg(long, value_enum)]
    pub to: Target,
    /// Key/value heads per layer for --to gqa (must divide the query heads; 1 is MQA).
    #[arg(long, value_name = "G", required_if_eq("to", "gqa"))]
    pub kv_heads: Option<usize>,
    /// --to hedgehog: columns of each feature map (the map has twice as many features).
    #[arg(long, value_name = "F")]
    pub feature_dim: Option<usize>,
    /// --to hedgehog: keys per query attended by exact softmax (0: linear attention only).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// --to hedgehog: layers to convert, `all` or a comma-separated list (e.g. 0,5,7).
    #[arg(long, value_name = "all|I,J")]
    pub layers: Option<String>,
    /// --to hedgehog: seed of the feature maps' initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let hedgehog_flags =
        a.feature_dim.is_some() || a.window.is_some() || a.layers.is_some() || a.seed.is_some();
    if a.to != Target::Hedgehog && hedgehog_flags {
        bail!("--feature-dim, --window, --layers and --seed are for --to hedgehog");
    }
    let plan = match a.to {
        Target::Gqa => {
            let g = a.kv_heads.expect("clap requires --kv-heads with --to gqa");
            surgeon_convert::regroup_kv_heads(&plan, g)?
        }
        Target::Mha => {
            if a.kv_heads.is_some() {
                bail!("--kv-heads is for --to gqa (--to mha uses one per query head)");
            }
            let h = plan
                .arch
                .layers
                .first()
                .map_or(0, |l| l.attention.num_heads);
            surgeon_convert::regroup_kv_heads(&plan, h)?
        }
        Target::Hedgehog => {
            if a.kv_heads.is_some() {
                bail!("--kv-heads is for --to gqa");
            }
            surgeon_convert::to_hedgehog(&plan, &hedgehog_options(&a)?)?
        }
    };
    a.output.finish(plan, command_line())
}

fn hedgehog_options(a: &Args) -> Result<HedgehogOptions> {
    let d = HedgehogOptions::default();
    Ok(HedgehogOptions {
        feature_dim: a.feature_dim.unwrap_or(d.feature_dim),
        window: a.window.unwrap_or(d.window),
        layers: match a.layers.as_deref() {
            None | Some("all") => None,
            Some(list) => Some(parse_layers(list)?),
        },
        seed: a.seed.unwrap_or(d.seed),
    })
}

fn parse_layers(list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(|s| {
            s.trim().parse::<usize>().map_err(|_| {
                anyhow::anyhow!("--layers: `{s}` is not a layer index (use `all` or e.g. 0,5,7)")
            })
        })
        .collect()
}
