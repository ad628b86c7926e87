//! `surgeon expand`: block expansion (LLaMA Pro).
use super::common::{command_line, OutputArgs};
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Number of identity blocks to insert (must divide the layer count unless --positions).
    #[arg(long, value_name = "P")]
    pub add: usize,
    /// Original layers after which to insert a copy, e.g. 3,7 (default: after every n/P-th layer).
    #[arg(long, value_name = "I,J,...")]
    pub positions: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let positions = a
        .positions
        .as_deref()
        .map(surgeon_surgery::parse_indices)
        .transpose()?;
    if let Some(p) = &positions {
        if p.len() != a.add {
            bail!(
                "--positions lists {} layer{} but --add is {}",
                p.len(),
                if p.len() == 1 { "" } else { "s" },
                a.add
            );
        }
    }
    let plan = surgeon_formats::open_model(&a.model)?;
    let plan = match positions {
        Some(p) => surgeon_surgery::expand(&plan, &p)?,
        None => surgeon_surgery::expand_even(&plan, a.add)?,
    };
    a.output.finish(plan, command_line())
}
