//! `surgeon importance`: Minitron's activation importance of every MLP neuron, attention head and
//! hidden channel, and block influence per layer, on calibration text, written as scores.json for
//! `surgeon prune --scores` and `surgeon search`.
use super::common::{write_file, BackendArgs, CalibrationArgs};
use anyhow::{Context, Result};
use std::path::PathBuf;
use surgeon_distill::calibrate;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Calibration samples: windows of --window tokens (Minitron uses 1024 of 4096); sets
    /// --max-tokens to N x --window.
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Scores file to write (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing scores file.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let Some(mut cal) = a.calibration.calibration() else {
        anyhow::bail!("give calibration text with --data FILE");
    };
    if let Some(n) = a.samples {
        anyhow::ensure!(n > 0, "--samples must be at least 1");
        cal.max_tokens = n * cal.window_for(&plan);
    }
    let scores =
        calibrate::importance(&plan, &cal, a.backend.backend).context("scoring importance")?;
    let inputs = [PathBuf::from(&a.model), cal.data.clone()];
    write_file(&a.out, scores.to_json().as_bytes(), a.force, &inputs)?;
    eprintln!(
        "wrote {} ({} layers, {} samples, {} tokens)",
        a.out.display(),
        scores.layers.len(),
        scores.samples,
        scores.tokens
    );
    Ok(())
}
