//! `surgeon upscale`: depth up-scaling (SOLAR).
use super::common::{command_line, OutputArgs};
use anyhow::Result;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("stack").required(true).args(["layers", "slices"])))]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// SOLAR target depth S: keep layers 0..S/2 of one copy and n-S/2..n of the other
    /// (S even, n < S < 2n; 32 -> 48 drops 8 layers from each copy).
    #[arg(long, value_name = "S")]
    pub layers: Option<usize>,
    /// Half-open layer ranges stacked in order, e.g. 0..24,8..32 (mergekit passthrough slices).
    #[arg(long, value_name = "A..B,C..D")]
    pub slices: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    // Check the arguments before opening (and possibly downloading) the model.
    let slices = a
        .slices
        .as_deref()
        .map(surgeon_surgery::parse_slices)
        .transpose()?;
    let plan = surgeon_formats::open_model(&a.model)?;
    let plan = match (slices, a.layers) {
        (Some(slices), _) => surgeon_surgery::upscale(&plan, &slices)?,
        (None, Some(s)) => surgeon_surgery::upscale_solar(&plan, s)?,
        (None, None) => unreachable!("clap requires --layers or --slices"),
    };
    a.output.finish(plan, command_line())
}
