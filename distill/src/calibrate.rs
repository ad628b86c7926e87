//! Calibration: the statistics that calibration-driven operators consume, computed by running the
//! model over calibration text on any backend. The CLI's `--data`, `--max-tokens` and `--window`
//! map onto [`Calibration`]; the Rust API calls the same functions.
//!
//! - [`block_influence`]: ShortGPT's block influence per layer (`drop-layers --count`).
//! - [`mlp_captures`]: per-layer MLP inputs and SwiGLU activations (`moe` split methods).
//! - [`attention_input_moments`]: per-layer second moments of the attention input (`clover`'s
//!   data-aware whitening).
//! - [`attention_inputs`]: per-layer attention inputs token by token (`convert-attention --to mla`).
//! - [`importance`]: Minitron's activation importance (`importance`, `prune`, `search`).
use crate::backend::{BackendJob, BackendKind};
use crate::error::{Error, Result};
use crate::probe::{self, LayerCapture};
use crate::{text, Llama};
use burn::tensor::backend::Backend;
use std::path::PathBuf;
use surgeon_formats::Plan;

/// Which calibration text, and how much of it, an operator sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// Plain text, or `.jsonl` with a `text` field.
    pub data: PathBuf,
    /// At most this many tokens from the start of `data`.
    pub max_tokens: usize,
    /// Tokens per forward pass (capped at the model's context); positions restart in each window.
    pub window: usize,
}

impl Calibration {
    /// The defaults every calibrating command shares: 4096 tokens in windows of 512.
    pub const DEFAULT_MAX_TOKENS: usize = 4096;
    pub const DEFAULT_WINDOW: usize = 512;

    pub fn new(data: impl Into<PathBuf>) -> Self {
        Calibration {
            data: data.into(),
            max_tokens: Self::DEFAULT_MAX_TOKENS,
            window: Self::DEFAULT_WINDOW,
        }
    }

    /// The first `max_tokens` token ids of the text; an error names the file when there are none.
    pub fn tokens(&self, plan: &Plan) -> Result<Vec<u32>> {
        let data = crate::eval::read_text(&self.data)?;
        let tok = text::load_tokenizer(plan)?;
        let mut ids = text::encode(&tok, &data)?;
        ids.truncate(self.max_tokens);
        if ids.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no calibration tokens (the text is empty or `max_tokens` is 0)",
                self.data.display()
            )));
        }
        Ok(ids)
    }

    /// The window length used on `plan`: `window`, at least 1, at most the model's context.
    pub fn window_for(&self, plan: &Plan) -> usize {
        self.window
            .max(1)
            .min(plan.arch.max_position_embeddings.max(1))
    }
}

/// Block influence of every layer and the number of tokens it was measured on.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockInfluence {
    /// Per layer, `1 - cos(hidden in, hidden out)` averaged over tokens, in `[0, 2]`.
    pub scores: Vec<f64>,
    pub tokens: usize,
}

/// Block influence of every layer of `plan` on the calibration text, run on `backend`.
pub fn block_influence(
    plan: &Plan,
    cal: &Calibration,
    backend: BackendKind,
) -> Result<BlockInfluence> {
    struct Job<'a> {
        plan: &'a Plan,
        ids: &'a [u32],
        window: usize,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<Vec<f64>>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let model = Llama::<B>::from_plan(self.plan, &device)?;
            probe::block_influences(&model, self.ids, self.window)
        }
    }
    let ids = cal.tokens(plan)?;
    let scores = backend.run(Job {
        plan,
        ids: &ids,
        window: cal.window_for(plan),
    })??;
    Ok(BlockInfluence {
        scores,
        tokens: ids.len(),
    })
}

/// MLP inputs (and, with `activations`, dense SwiGLU activations) of every layer of `plan` on the
/// calibration text, run on `backend`, with the number of tokens captured.
pub fn mlp_captures(
    plan: &Plan,
    cal: &Calibration,
    activations: bool,
    backend: BackendKind,
) -> Result<(Vec<LayerCapture>, usize)> {
    struct Job<'a> {
        plan: &'a Plan,
        windows: Vec<&'a [u32]>,
        activations: bool,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<Vec<LayerCapture>>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let model = Llama::<B>::from_plan(self.plan, &device)?;
            probe::capture_layers(&model, &self.windows, self.activations)
        }
    }
    let ids = cal.tokens(plan)?;
    let windows = ids.chunks(cal.window_for(plan)).collect();
    let caps = backend.run(Job {
        plan,
        windows,
        activations,
    })??;
    Ok((caps, ids.len()))
}

// ----- Attention-input second moments (CLOVER) -----

/// Second moments of every layer's attention input on the calibration text, run on `backend`,
/// with the number of tokens they cover.
pub fn attention_input_moments(
    plan: &Plan,
    cal: &Calibration,
    backend: BackendKind,
) -> Result<(Vec<probe::InputMoments>, usize)> {
    struct Job<'a> {
        plan: &'a Plan,
        windows: Vec<&'a [u32]>,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<Vec<probe::InputMoments>>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let model = Llama::<B>::from_plan(self.plan, &device)?;
            probe::attention_input_moments(&model, &self.windows)
        }
    }
    let ids = cal.tokens(plan)?;
    let windows = ids.chunks(cal.window_for(plan)).collect();
    let moments = backend.run(Job { plan, windows })??;
    Ok((moments, ids.len()))
}

/// Every layer's attention input per token (`[tokens, h]` row-major) on the calibration text, run
/// on `backend`, with the number of tokens.
pub fn attention_inputs(
    plan: &Plan,
    cal: &Calibration,
    backend: BackendKind,
) -> Result<(Vec<Vec<f32>>, usize)> {
    struct Job<'a> {
        plan: &'a Plan,
        windows: Vec<&'a [u32]>,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<Vec<Vec<f32>>>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let model = Llama::<B>::from_plan(self.plan, &device)?;
            probe::attention_inputs(&model, &self.windows)
        }
    }
    let ids = cal.tokens(plan)?;
    let windows = ids.chunks(cal.window_for(plan)).collect();
    let inputs = backend.run(Job { plan, windows })??;
    Ok((inputs, ids.len()))
}

// ---- Minitron activation importance (`surgeon importance`) ----

/// Minitron's activation importance of every MLP neuron, attention head and hidden channel of
/// `plan`, and block influence per layer, on the calibration text run on `backend` (one window
/// of `cal.window` tokens per sample).
pub fn importance(
    plan: &Plan,
    cal: &Calibration,
    backend: BackendKind,
) -> Result<surgeon_formats::ImportanceScores> {
    struct Job<'a> {
        plan: &'a Plan,
        windows: Vec<&'a [u32]>,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<probe::Importance>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let model = Llama::<B>::from_plan(self.plan, &device)?;
            probe::importance(&model, &self.windows)
        }
    }
    let ids = cal.tokens(plan)?;
    let windows = ids.chunks(cal.window_for(plan)).collect();
    let p = backend.run(Job { plan, windows })??;
    let (layers, hidden, block_influence, samples) = p.scores();
    let layers = layers
        .into_iter()
        .zip(&plan.arch.layers)
        .map(|((mlp, channels), l)| {
            let a = &l.attention;
            let heads = match a.is_no_op() {
                true => vec![],
                false => channels
                    .chunks(a.v_head_dim)
                    .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
                    .collect(),
            };
            surgeon_formats::LayerImportance {
                mlp,
                heads,
                num_kv_heads: if a.is_no_op() { 0 } else { a.num_kv_heads },
            }
        })
        .collect();
    Ok(surgeon_formats::ImportanceScores {
        format: surgeon_formats::importance::IMPORTANCE_FORMAT.into(),
        model: plan.origin.clone(),
        tokens: ids.len(),
        samples,
        hidden,
        block_influence,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use surgeon_formats::synthetic::SyntheticSpec;

    #[test]
    fn window_is_capped_at_the_context_and_at_least_one() {
        let plan = SyntheticSpec::tiny().plan();
        let ctx = plan.arch.max_position_embeddings;
        let mut cal = Calibration::new("x.txt");
        cal.window = ctx + 100;
        assert_eq!(cal.window_for(&plan), ctx);
        cal.window = 0;
        assert_eq!(cal.window_for(&plan), 1);
    }

    #[test]
    fn missing_text_names_the_file() {
        let plan = SyntheticSpec::tiny().plan();
        let cal = Calibration::new("/nonexistent/calib.txt");
        let e = block_influence(&plan, &cal, BackendKind::Cpu).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/calib.txt"), "{e}");
    }
}
