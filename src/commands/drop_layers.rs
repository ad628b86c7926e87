//! `surgeon drop-layers`: remove decoder layers.
use super::common::{command_line, OutputArgs};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Layers to remove, e.g. 3,7,12 (the rest are renumbered).
    #[arg(long, value_name = "I,J,...")]
    pub layers: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let layers = surgeon_surgery::parse_indices(&a.layers)?;
    let plan = surgeon_formats::open_model(&a.model)?;
    let plan = surgeon_surgery::drop_layers(&plan, &layers)?;
    a.output.finish(plan, command_line())
}
