//! Flag groups shared by commands: output, backend, calibration.
use anyhow::Result;
use std::path::PathBuf;
use surgeon_distill::calibrate::Calibration;
use surgeon_distill::BackendKind;
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

/// A run stopped by Ctrl-C after saving its state; `main` prints the message (no `error:`) and
/// exits with status 130, as a shell expects of an interrupted program.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The command line as typed, for the model card.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// `--backend`: which burn backend runs the model (every command that runs it).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct BackendArgs {
    /// cpu (burn Flex), wgpu or cuda (those two need the cargo features of the same name).
    #[arg(long, default_value_t = BackendKind::default())]
    pub backend: BackendKind,
}

/// `--data`, `--max-tokens`, `--window`: calibration text for operators that look at activations.
/// The defaults are the library's ([`Calibration`]).
#[derive(clap::Args, Clone, Debug)]
pub struct CalibrationArgs {
    /// Calibration text (.txt, or .jsonl with a "text" field).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Use at most this many calibration tokens (from the start of --data).
    #[arg(long, default_value_t = Calibration::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// Tokens per calibration forward pass (capped at the model's context).
    #[arg(long, default_value_t = Calibration::DEFAULT_WINDOW)]
    pub window: usize,
}

impl CalibrationArgs {
    /// The library's calibration settings, when --data was given.
    pub fn calibration(&self) -> Option<Calibration> {
        self.data.as_ref().map(|data| Calibration {
            data: data.clone(),
            max_tokens: self.max_tokens,
            window: self.window,
        })
    }
}

/// Writes `bytes` to the file `path` through a temporary sibling renamed at the end. An existing
/// file is replaced only with `force`, and never when it is one of `inputs`.
pub fn write_file(
    path: &std::path::Path,
    bytes: &[u8],
    force: bool,
    inputs: &[PathBuf],
) -> Result<()> {
    use anyhow::{bail, Context};
    let abs = surgeon_formats::output::absolute(path);
    if inputs
        .iter()
        .any(|i| surgeon_formats::output::absolute(i) == abs)
    {
        bail!("{}: is an input; choose another output", path.display());
    }
    if path.is_dir() {
        bail!("{}: is a directory, expected a file name", path.display());
    }
    if path.exists() && !force {
        bail!("{}: exists (give --force to replace it)", path.display());
    }
    let name = path
        .file_name()
        .with_context(|| format!("{}: has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.surgeon-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
