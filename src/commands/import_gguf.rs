use super::common::{command_line, OutputArgs};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Import a llama.cpp GGUF file as a Hugging Face model (dequantised, RoPE rows in HF order,
/// tokenizer rebuilt from the metadata).
#[derive(clap::Args)]
pub struct Args {
    /// The .gguf file.
    pub file: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    if a.file.is_dir() {
        bail!(
            "{}: is a directory, not a .gguf file (a Hugging Face model directory is read by \
             every command as it is; `surgeon convert` rewrites one)",
            a.file.display()
        );
    }
    if !a.file.is_file() {
        bail!("{}: no such file", a.file.display());
    }
    let plan = surgeon_formats::gguf_import::plan_from_gguf(&a.file)?;
    a.output.finish(plan, command_line())
}
