use anyhow::{bail, Result};
use std::path::PathBuf;
use surgeon_formats::synthetic::{SyntheticSpec, Variant};
use surgeon_formats::writer::parse_size;
use surgeon_formats::DType;

/// Writes a synthetic Llama checkpoint (deterministic random weights) for tests and benchmarks.
#[derive(clap::Args)]
pub struct Args {
    /// `tiny` (2 layers, hidden 64), `hetero` (tiny with 4 layers and MLP width 256, the base of the
    /// variants), `smollm2-135m` (SmolLM2-135M's shape) or `llama-1b` (TinyLlama's 1.1B shape).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Number of layers (overrides the preset).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Make layers differ: uniform, mlp-widths, odd-mlp-widths, kv-groups, no-op-attention,
    /// no-op-mlp, v-head-dim, mixed (see `surgeon_formats::synthetic::Variant`).
    #[arg(long, default_value = "uniform")]
    pub variant: String,
    #[arg(long)]
    pub dtype: Option<DType>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    /// Replace an existing output directory (only one surgeon wrote, or an empty one).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut spec = match a.preset.as_str() {
        "tiny" => SyntheticSpec::tiny(),
        "hetero" => SyntheticSpec::hetero(),
        "smollm2-135m" => SyntheticSpec::smollm2_135m(),
        "llama-1b" => SyntheticSpec::llama_1b(),
        other => bail!("unknown preset `{other}` (tiny, hetero, smollm2-135m, llama-1b)"),
    };
    if let Some(l) = a.layers {
        spec.num_layers = l;
    }
    if let Some(d) = a.dtype {
        spec.dtype = d;
    }
    spec.seed = a.seed;
    let variant = Variant::from_name(&a.variant).ok_or_else(|| {
        let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
        anyhow::anyhow!("unknown variant `{}` ({})", a.variant, names.join(", "))
    })?;
    let plan = spec.plan_of(spec.variant_arch(variant));
    let opts = surgeon_formats::WriteOptions {
        shard_size: parse_size(&a.shard_size)?,
        force: a.force,
        ..Default::default()
    };
    spec.write_plan_with(&plan, &a.out, &opts)?;
    eprintln!(
        "wrote {} ({} parameters)",
        a.out.display(),
        surgeon_formats::plan::group_digits(plan.arch.parameter_count())
    );
    Ok(())
}
