//! `surgeon moe`: a mixture of experts from a dense model (sparse upcycling or expert splitting).
use super::common::{command_line, BackendArgs, CalibrationArgs, OutputArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use surgeon_distill::backend::BackendJob;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::calibrate::{self, Calibration};
use surgeon_distill::moe_stats::{self, LayerCapture};
use surgeon_distill::{text, Llama};
use surgeon_formats::{Mlp, Plan};
use surgeon_surgery::moe::{self as op, MoeMethod, MoeOptions, RouterInit, SplitStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Router {
    /// Small normal values (std --router-std), seeded.
    Random,
    /// All zeros (uniform routing).
    Zeros,
    /// Mean normalised MLP input of each expert's prompts, per layer (mergekit-moe "hidden"; --prompts).
    Hidden,
    /// Mean normalised token embedding of each expert's prompts (mergekit-moe "cheap_embed"; --prompts).
    CheapEmbed,
    /// split-importance only: the normalised centroid of the calibration-token group whose important
    /// neurons each expert received.
    Clusters,
}

#[derive(clap::Args)]
pub struct Args {
    /// Dense model: directory, .gguf file or Hub id.
    pub model: String,
    /// Number of experts per layer.
    #[arg(long)]
    pub experts: usize,
    /// Experts selected per token.
    #[arg(long)]
    pub top_k: usize,
    /// upcycle, split-random, split-cluster, split-coactivation or split-importance.
    #[arg(long)]
    pub method: MoeMethod,
    /// Router initialisation.
    #[arg(long, value_enum, default_value = "random")]
    pub router: Router,
    /// Standard deviation of the random router.
    #[arg(long, default_value_t = 0.02)]
    pub router_std: f32,
    /// Prompts per expert for --router hidden/cheap-embed: blocks separated by blank lines (one block
    /// per expert, one prompt per line), or exactly one line per expert.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Calibration text for split-coactivation / split-importance.
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// split-coactivation: a neuron fires on a token when its |activation| is in this top fraction.
    #[arg(long, default_value_t = 0.1)]
    pub fire_fraction: f64,
    /// Split methods: fold LLaMA-MoE's E/K output scale into every expert's w2 so that stock Mixtral
    /// code (transformers) computes the same function.
    #[arg(long)]
    pub fold_scale: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

struct HiddenJob<'a> {
    plan: &'a Plan,
    prompts: Vec<Vec<Vec<u32>>>,
}

impl BackendJob for HiddenJob<'_> {
    type Output = surgeon_distill::Result<Vec<Vec<f32>>>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = Llama::<B>::from_plan(self.plan, &device)?;
        moe_stats::router_rows_hidden(&model, &self.prompts)
    }
}

fn read_prompts(a: &Args, plan: &Plan) -> Result<Vec<Vec<Vec<u32>>>> {
    let path = a.prompts.as_ref().with_context(|| {
        format!(
            "--router {} needs --prompts FILE (prompts per expert)",
            match a.router {
                Router::Hidden => "hidden",
                _ => "cheap-embed",
            }
        )
    })?;
    let txt =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let blocks = moe_stats::parse_prompts(&txt, a.experts)
        .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
    let tok = text::load_tokenizer(plan)?;
    blocks
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|p| Ok(text::encode(&tok, p)?))
                .collect::<Result<Vec<_>>>()
        })
        .collect()
}

fn dense_width(plan: &Plan, l: usize) -> usize {
    match plan.arch.layers[l].mlp {
        Mlp::Dense { intermediate_size } => intermediate_size,
        Mlp::Moe { .. } | Mlp::NoOp => 0,
    }
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let mut opts = MoeOptions::new(a.method, a.experts, a.top_k);
    opts.seed = a.seed;
    opts.fold_scale = a.fold_scale;
    opts.router = match a.router {
        Router::Zeros => RouterInit::Zeros,
        _ => RouterInit::Random { std: a.router_std },
    };
    // Fail on a bad request before any forward pass.
    op::check_request(&plan.arch, &opts)?;
    check_flags(&a)?;
    if let Some(router) = router_from_prompts(&a, &plan)? {
        opts.router = router;
    }
    let stats = match a.calibration.calibration() {
        Some(cal) => Some(split_stats(&a, &plan, &cal, &mut opts)?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let moe = op::build(&plan, &opts, stats.as_ref())?;
    eprintln!(
        "{}: {} experts x {} per layer, top-{} ({:.2}s)",
        a.method,
        a.experts,
        match moe.arch.layers[0].mlp {
            Mlp::Moe {
                intermediate_size, ..
            } => intermediate_size,
            _ => 0,
        },
        a.top_k,
        t0.elapsed().as_secs_f64()
    );
    a.output.finish(moe, command_line())
}

/// Flag combinations that make no sense, refused before any work.
fn check_flags(a: &Args) -> Result<()> {
    if !(a.fire_fraction > 0.0 && a.fire_fraction <= 1.0) {
        bail!("--fire-fraction must be in (0, 1], got {}", a.fire_fraction);
    }
    if a.router == Router::Clusters && a.method != MoeMethod::SplitImportance {
        bail!("--router clusters needs --method split-importance");
    }
    let data = a.calibration.data.is_some();
    if a.method.needs_activations() && !data {
        bail!("--method {} needs calibration text (--data FILE)", a.method);
    }
    if !a.method.needs_activations() && data {
        bail!("--data is only used by split-coactivation and split-importance");
    }
    if a.prompts.is_some() && !matches!(a.router, Router::Hidden | Router::CheapEmbed) {
        bail!("--prompts is only used by --router hidden or cheap-embed");
    }
    Ok(())
}

/// Router rows from prompts per expert (`--router hidden` or `cheap-embed`), else `None`.
fn router_from_prompts(a: &Args, plan: &Plan) -> Result<Option<RouterInit>> {
    Ok(match a.router {
        Router::Hidden => {
            let prompts = read_prompts(a, plan)?;
            eprintln!(
                "router: hidden states of {} prompts",
                prompts.iter().map(Vec::len).sum::<usize>()
            );
            let job = HiddenJob { plan, prompts };
            let rows = a
                .backend
                .backend
                .run(job)?
                .context("computing prompt hidden states")?;
            Some(RouterInit::Given {
                label: "hidden states of expert prompts".into(),
                rows,
            })
        }
        Router::CheapEmbed => {
            let prompts = read_prompts(a, plan)?;
            let rows = moe_stats::router_rows_embed(plan, &prompts)?;
            Some(RouterInit::Given {
                label: "token embeddings of expert prompts".into(),
                rows: vec![rows],
            })
        }
        _ => None,
    })
}

/// Calibration statistics for the split methods; `--router clusters` also sets the router.
fn split_stats(
    a: &Args,
    plan: &Plan,
    cal: &Calibration,
    opts: &mut MoeOptions,
) -> Result<SplitStats> {
    let (caps, tokens) = calibrate::mlp_captures(plan, cal, true, a.backend.backend)
        .context("capturing activations")?;
    if tokens < a.experts {
        bail!(
            "{}: only {tokens} calibration tokens, need at least --experts = {}",
            cal.data.display(),
            a.experts
        );
    }
    eprintln!("calibration: {tokens} tokens");
    if a.method == MoeMethod::SplitCoactivation {
        let features = caps
            .iter()
            .enumerate()
            .map(|(l, c)| {
                op::coactivation_features(
                    &c.activations,
                    tokens,
                    dense_width(plan, l),
                    a.fire_fraction,
                )
            })
            .collect();
        return Ok(SplitStats::Coactivation { features, tokens });
    }
    let (scores, centroids) = importance(a, plan, &caps)?;
    if a.router == Router::Clusters {
        opts.router = RouterInit::Given {
            label: "centroids of calibration-token groups".into(),
            rows: centroids,
        };
    }
    Ok(SplitStats::Importance { scores })
}

/// split-importance: per layer, neuron importance per token group `[E, i]` and the groups'
/// centroids.
fn importance(
    a: &Args,
    plan: &Plan,
    caps: &[LayerCapture],
) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>)> {
    let h = plan.arch.hidden_size;
    let mut scores = vec![];
    let mut centroids = vec![];
    for (l, c) in caps.iter().enumerate() {
        let i = dense_width(plan, l);
        let (shape, down) = plan.load_f32(&format!("model.layers.{l}.mlp.down_proj.weight"))?;
        let norms = op::column_norms(&down, shape[0], i);
        let (s, cent) = op::importance_scores(
            &c.mlp_input,
            &c.activations,
            &norms,
            c.tokens,
            h,
            i,
            a.experts,
            a.seed.wrapping_add(l as u64),
        );
        scores.push(s);
        centroids.push(cent);
    }
    Ok((scores, centroids))
}
