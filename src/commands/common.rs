//! Flags shared by every command that writes a model.
use anyhow::Result;
use std::path::PathBuf;
use surgeon_formats::writer::{parse_size, WriteOptions};
use surgeon_formats::{DType, Plan};

#[derive(clap::Args, Clone, Debug)]
pub struct OutputArgs {
    /// Output directory (Hugging Face layout). Written to a temporary sibling, renamed at the end.
    #[arg(long)]
    pub out: PathBuf,
    /// Store tensors in this dtype (default: keep each tensor's dtype).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Largest safetensors shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dtype: clamp values beyond the dtype's range to its largest finite value
    /// (without it such an overflow is an error that names the first tensor).
    #[arg(long)]
    pub allow_overflow: bool,
}

impl OutputArgs {
    /// Applies `--dtype`, then prints the plan (`--dry-run`) or writes it.
    pub fn finish(&self, mut plan: Plan, description: String) -> Result<()> {
        if let Some(d) = self.dtype {
            plan.set_dtype(d);
        }
        if self.dry_run {
            print!("{}", plan.render());
            return Ok(());
        }
        let opts = WriteOptions {
            shard_size: parse_size(&self.shard_size)?,
            force: self.force,
            allow_overflow: self.allow_overflow,
            progress: true,
            description,
            ..Default::default()
        };
        let report = surgeon_formats::write_model(&plan, &self.out, &opts)?;
        eprintln!(
            "wrote {} ({} tensors, {} parameters, {} shard{})",
            report.dir.display(),
            report.tensors,
            surgeon_formats::plan::group_digits(report.parameters),
            report.shards.len(),
            if report.shards.len() == 1 { "" } else { "s" }
        );
        if !report.overflow.tensors.is_empty() {
            eprintln!(
                "warning: clamped {} to the largest finite value of the dtype (--allow-overflow)",
                report.overflow.describe(&plan)
            );
        }
        Ok(())
    }
}

/// The command line as typed, for the model card.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}
