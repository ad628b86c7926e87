//! `surgeon convert-attention`: change how attention is computed (regroup key/value heads).
use super::common::{command_line, OutputArgs};
use anyhow::Result;

/// The attention to convert to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Grouped-query attention with --kv-heads key/value heads (mean-pooled in groups).
    Gqa,
    /// Multi-head attention: one key/value head per query head (repeated; exact).
    Mha,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// gqa or mha.
    #[arg(long, value_enum)]
    pub to: Target,
    /// Key/value heads per layer for --to gqa (must divide the query heads; 1 is MQA).
    #[arg(long, value_name = "G", required_if_eq("to", "gqa"))]
    pub kv_heads: Option<usize>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let kv_heads = match a.to {
        Target::Gqa => a.kv_heads.expect("clap requires --kv-heads with --to gqa"),
        Target::Mha => {
            if a.kv_heads.is_some() {
                anyhow::bail!("--kv-heads is for --to gqa (--to mha uses one per query head)");
            }
            plan.arch
                .layers
                .first()
                .map(|l| l.attention.num_heads)
                .unwrap_or(0)
        }
    };
    let plan = surgeon_convert::regroup_kv_heads(&plan, kv_heads)?;
    a.output.finish(plan, command_line())
}
