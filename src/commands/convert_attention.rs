//! `surgeon convert-attention`: change how attention is computed (regroup key/value heads, or
//! linearise it with Hedgehog feature maps, or turn it into DeepSeek-V3 latent attention).
use super::common::{command_line, BackendArgs, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use surgeon_convert::{HedgehogOptions, LatentNorm, MlaOptions, RopeSelect};
use surgeon_distill::calibrate::{self, Calibration};

/// The attention to convert to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Grouped-query attention with --kv-heads key/value heads (mean-pooled in groups).
    Gqa,
    /// Multi-head attention: one key/value head per query head (repeated; exact).
    Mha,
    /// Hedgehog linear attention (LoLCATs hybrid with --window > 0); heal it afterwards.
    Hedgehog,
    /// DeepSeek-V3 multi-head latent attention (--kv-rank, --rope-dim, --calib); heal it afterwards.
    Mla,
}

/// Which frequency pairs keep RoPE with --to mla.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RopeSelectArg {
    /// The evenly spaced pairs of largest query/key 2-norm on the calibration text.
    #[value(name = "2norm")]
    TwoNorm,
    /// The highest frequencies.
    High,
    /// The lowest frequencies.
    Low,
    /// Evenly spaced from the highest frequency.
    Uniform,
}

/// How --to mla handles DeepSeek-V3's always-applied latent RMSNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LatentNormArg {
    /// Weight fitted to the mean latent energy on the calibration text (approximate; heals).
    Fit,
    /// Latent scaled into the norm's linear regime (exact at full rank; tiny weights, not for healing).
    Linear,
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
    /// --to mla: features of the key/value latent (`kv_lora_rank`).
    #[arg(long, value_name = "R", required_if_eq("to", "mla"))]
    pub kv_rank: Option<usize>,
    /// --to mla: rotary features per head (even; `qk_rope_head_dim`).
    #[arg(long, value_name = "r", required_if_eq("to", "mla"))]
    pub rope_dim: Option<usize>,
    /// --to mla: queries through a low-rank bottleneck of Q features (`q_lora_rank`).
    #[arg(long, value_name = "Q")]
    pub q_rank: Option<usize>,
    /// --to mla: which frequency pairs keep RoPE (high: measured best on SmolLM2, see README).
    #[arg(long, value_enum, default_value = "high")]
    pub rope_select: RopeSelectArg,
    /// --to mla: how the latent RMSNorm is set.
    #[arg(long, value_enum, default_value = "fit")]
    pub latent_norm: LatentNormArg,
    /// --to mla: calibration text (.txt, or .jsonl with a "text" field).
    #[arg(long, value_name = "FILE", required_if_eq("to", "mla"))]
    pub calib: Option<PathBuf>,
    /// --to mla: use at most this many calibration tokens.
    #[arg(long, default_value_t = Calibration::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// --to mla: tokens per calibration forward pass (capped at the model's context).
    #[arg(long, default_value_t = Calibration::DEFAULT_WINDOW)]
    pub calib_window: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
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
    let mla_flags = a.kv_rank.is_some() || a.rope_dim.is_some() || a.q_rank.is_some();
    if a.to != Target::Mla && (mla_flags || a.calib.is_some()) {
        bail!("--kv-rank, --rope-dim, --q-rank and --calib are for --to mla");
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
        Target::Mla => {
            if a.kv_heads.is_some() {
                bail!("--kv-heads is for --to gqa");
            }
            to_mla(&a, &plan)?
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

fn to_mla(a: &Args, plan: &surgeon_formats::Plan) -> Result<surgeon_formats::Plan> {
    let opts = MlaOptions {
        kv_rank: a.kv_rank.expect("clap requires --kv-rank with --to mla"),
        rope_dim: a.rope_dim.expect("clap requires --rope-dim with --to mla"),
        q_rank: a.q_rank,
        rope_select: match a.rope_select {
            RopeSelectArg::TwoNorm => RopeSelect::TwoNorm,
            RopeSelectArg::High => RopeSelect::High,
            RopeSelectArg::Low => RopeSelect::Low,
            RopeSelectArg::Uniform => RopeSelect::Uniform,
        },
        latent_norm: match a.latent_norm {
            LatentNormArg::Fit => LatentNorm::Fit,
            LatentNormArg::Linear => LatentNorm::Linear,
        },
    };
    surgeon_convert::mla::check_options(plan, &opts)?;
    let cal = Calibration {
        data: a
            .calib
            .clone()
            .expect("clap requires --calib with --to mla"),
        max_tokens: a.max_tokens,
        window: a.calib_window,
    };
    let (inputs, tokens) = calibrate::attention_inputs(plan, &cal, a.backend.backend)
        .context("measuring attention inputs on the calibration text")?;
    eprintln!("calibration: attention inputs of every layer on {tokens} tokens");
    let out = surgeon_convert::to_mla(plan, &opts, &inputs)?;
    eprintln!(
        "KV cache per token at 16 bits: {} -> {} bytes",
        2 * plan.arch.kv_cache_values_per_token(),
        2 * out.arch.kv_cache_values_per_token()
    );
    Ok(out)
}
