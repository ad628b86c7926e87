//! Probes: what one forward pass of the runtime reports, and the collectors that turn it into the
//! plain data (vectors of numbers) that the operator crates consume.
//!
//! [`Probe`] is a push-model callback (ripgrep's `Sink`): [`crate::model::DecoderLayer::forward`]
//! calls it with each layer's input, attention input, MLP input, MLP activations, router logits
//! and output; every method is a no-op by default. Collectors:
//!
//! - [`BlockInfluence`] / [`block_influences`]: ShortGPT's block influence per layer
//!   (`surgeon drop-layers --count`, `surgeon_surgery::lowest_influence`).
//! - [`MlpCapture`] / [`capture_layers`]: per-layer MLP inputs and SwiGLU activations
//!   (`surgeon_surgery::moe` split and router methods).
//! - [`Importance`] / [`importance()`]: Minitron's activation importance of neurons, heads and
//!   hidden channels (`surgeon importance`, `surgeon prune`).
//! - [`AttentionInputs`] / [`attention_inputs`]: every layer's attention input per token
//!   (`surgeon_convert::mla`).
//! - [`RouterLogits`]: router logits of every MoE layer, as tensors, for the load-balancing loss.
use crate::error::{Error, Result};
use crate::model::Llama;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Callbacks of one forward pass; `l` is the decoder layer index. All default to no-ops.
pub trait Probe<B: Backend> {
    /// Hidden states entering layer `l` `[B, T, h]`.
    fn layer_input(&mut self, _l: usize, _x: &Tensor<B, 3>) {}
    /// Input of the attention (after `input_layernorm`) `[B, T, h]`.
    fn attention_input(&mut self, _l: usize, _x: &Tensor<B, 3>) {}
    /// Input of `o_proj`: every head's attention output `[B, T, heads * v_head_dim]`.
    fn attention_heads(&mut self, _l: usize, _y: &Tensor<B, 3>) {}
    /// Input of the MLP (after `post_attention_layernorm`, what a router sees) `[B, T, h]`.
    fn mlp_input(&mut self, _l: usize, _x: &Tensor<B, 3>) {}
    /// SwiGLU activations `silu(gate x) * up x` of a dense MLP `[B, T, i]`.
    fn mlp_activation(&mut self, _l: usize, _a: &Tensor<B, 3>) {}
    /// Router logits of an MoE MLP `[B*T, E]`.
    fn router_logits(&mut self, _l: usize, _r: &Tensor<B, 2>) {}
    /// Hidden states leaving layer `l` `[B, T, h]`.
    fn layer_output(&mut self, _l: usize, _y: &Tensor<B, 3>) {}
}

/// The probe that observes nothing.
pub struct NoProbe;
impl<B: Backend> Probe<B> for NoProbe {}

fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// Token ids `[1, T]` on `model`'s device, after checking they are in its vocabulary.
fn window_tensor<B: Backend>(model: &Llama<B>, w: &[u32]) -> Result<Tensor<B, 2, Int>> {
    let vocab = model.vocab_size();
    if let Some(bad) = w.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
    Ok(Tensor::from_data(
        TensorData::new(ids, [1, w.len()]),
        &model.device(),
    ))
}

/// Block influence of one layer on one token: 1 - cosine(hidden in, hidden out).
/// A zero vector on either side counts as influence 1 (nothing in common).
pub fn token_influence(h_in: &[f32], h_out: &[f32]) -> f64 {
    let (mut dot, mut a, mut b) = (0f64, 0f64, 0f64);
    for (&x, &y) in h_in.iter().zip(h_out) {
        dot += x as f64 * y as f64;
        a += x as f64 * x as f64;
        b += y as f64 * y as f64;
    }
    if a == 0.0 || b == 0.0 {
        return 1.0;
    }
    1.0 - dot / (a.sqrt() * b.sqrt())
}

/// Block influence (ShortGPT, arXiv 2403.03853): per layer, `1 - cos(hidden in, hidden out)`
/// summed over the tokens seen (see [`BlockInfluence::scores`]).
#[derive(Clone, Debug, Default)]
pub struct BlockInfluence {
    sums: Vec<f64>,
    tokens: usize,
    /// Host copy of the current layer's input: `(layer, [tokens, h])`.
    input: Option<(usize, Vec<f32>)>,
}

impl BlockInfluence {
    /// Average influence per layer over all tokens seen.
    pub fn scores(&self) -> Vec<f64> {
        self.sums
            .iter()
            .map(|s| s / self.tokens.max(1) as f64)
            .collect()
    }
}

impl<B: Backend> Probe<B> for BlockInfluence {
    fn layer_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        if self.input.as_ref().is_none_or(|(i, _)| *i != l) {
            self.input = Some((l, host(x)));
        }
    }
    fn layer_output(&mut self, l: usize, y: &Tensor<B, 3>) {
        let [b, t, h] = y.dims();
        let out = host(y);
        let (_, inp) = self.input.take().expect("layer_input comes first");
        let n = b * t;
        let sum: f64 = inp
            .chunks(h)
            .zip(out.chunks(h))
            .map(|(x, y)| token_influence(x, y))
            .sum();
        if self.sums.len() <= l {
            self.sums.resize(l + 1, 0.0);
        }
        // Mean over this pass's tokens, weighted by their number (as averaging window by window).
        self.sums[l] += sum / n as f64 * n as f64;
        if l == 0 {
            self.tokens += n;
        }
        self.input = Some((l + 1, out));
    }
}

/// Influence of every layer of `model` on token ids `ids`, run in independent windows of at most
/// `window` tokens (positions restart at 0 in each window). Each score lies in `[0, 2]`; the
/// average is over all tokens.
pub fn block_influences<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    window: usize,
) -> Result<Vec<f64>> {
    if ids.is_empty() {
        return Err(Error::Invalid(
            "no calibration tokens to score layers on".into(),
        ));
    }
    if window == 0 {
        return Err(Error::Invalid("the scoring window must be positive".into()));
    }
    let mut p = BlockInfluence::default();
    for chunk in ids.chunks(window) {
        p.input = None;
        model.forward_probed(window_tensor(model, chunk)?, &mut p);
    }
    Ok(p.scores())
}

/// What one decoder layer saw on the calibration tokens (row-major f32).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerCapture {
    /// Tokens captured.
    pub tokens: usize,
    /// `[tokens, h]`: input of the MLP (after `post_attention_layernorm`).
    pub mlp_input: Vec<f32>,
    /// `[tokens, i]`: SwiGLU activations `silu(gate x) * up x` (empty for MoE layers).
    pub activations: Vec<f32>,
    /// Intermediate width `i` (0 for MoE layers).
    pub width: usize,
}

/// Collects every layer's MLP input and (when `activations`) dense SwiGLU activations.
#[derive(Clone, Debug, Default)]
pub struct MlpCapture {
    pub activations: bool,
    pub layers: Vec<LayerCapture>,
}

impl MlpCapture {
    fn layer(&mut self, l: usize) -> &mut LayerCapture {
        if self.layers.len() <= l {
            self.layers.resize(l + 1, LayerCapture::default());
        }
        &mut self.layers[l]
    }
}

impl<B: Backend> Probe<B> for MlpCapture {
    fn mlp_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        let [b, t, _] = x.dims();
        let cap = self.layer(l);
        cap.tokens += b * t;
        cap.mlp_input.extend(host(x));
    }
    fn mlp_activation(&mut self, l: usize, a: &Tensor<B, 3>) {
        if self.activations {
            let cap = self.layer(l);
            cap.width = a.dims()[2];
            cap.activations.extend(host(a));
        }
    }
}

/// Runs `model` over `windows` of token ids (one forward per window, positions from 0) and returns
/// per layer the MLP inputs and neuron activations of all tokens, in window order.
pub fn capture_layers<B: Backend>(
    model: &Llama<B>,
    windows: &[&[u32]],
    want_activations: bool,
) -> Result<Vec<LayerCapture>> {
    let mut p = MlpCapture {
        activations: want_activations,
        layers: vec![LayerCapture::default(); model.layers.len()],
    };
    for w in windows.iter().filter(|w| !w.is_empty()) {
        model.forward_probed(window_tensor(model, w)?, &mut p);
    }
    Ok(p.layers)
}

/// Collects every layer's attention input token by token (`[tokens, h]` row-major per layer), for
/// statistics that need each token (`convert-attention --to mla` fits its latent norm on them).
#[derive(Clone, Debug, Default)]
pub struct AttentionInputs {
    pub layers: Vec<Vec<f32>>,
}

impl<B: Backend> Probe<B> for AttentionInputs {
    fn attention_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        if self.layers.len() <= l {
            self.layers.resize(l + 1, vec![]);
        }
        self.layers[l].extend(host(x));
    }
}

/// Runs `model` over `windows` and returns every layer's attention inputs, in window order.
pub fn attention_inputs<B: Backend>(model: &Llama<B>, windows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
    let mut p = AttentionInputs {
        layers: vec![vec![]; model.layers.len()],
    };
    for w in windows.iter().filter(|w| !w.is_empty()) {
        model.forward_probed(window_tensor(model, w)?, &mut p);
    }
    Ok(p.layers)
}

// ---- Minitron activation importance (`surgeon importance`) ----

/// Per-channel sums of squares of window means of |activation| (Minitron's aggregate).
#[derive(Clone, Debug, Default)]
struct SquareSums(Vec<f64>);

impl SquareSums {
    /// Adds one window: the mean of |x| over all its tokens, per channel, squared.
    fn add<B: Backend>(&mut self, x: &Tensor<B, 3>) {
        let [b, t, c] = x.dims();
        let mean = x.clone().abs().reshape([b * t, c]).mean_dim(0);
        let m = host(&mean);
        if self.0.len() != c {
            self.0 = vec![0.0; c];
        }
        for (acc, v) in self.0.iter_mut().zip(m) {
            *acc += (v as f64) * (v as f64);
        }
    }
    fn sqrt(&self) -> Vec<f64> {
        self.0.iter().map(|s| s.sqrt()).collect()
    }
}

/// Minitron's activation importance (NVIDIA Model-Optimizer `mcore_minitron.py`): MLP neurons at
/// the input of `down_proj`, head channels at the input of `o_proj`, hidden channels at every
/// RMSNorm output, and block influence per layer. Feed it one window per forward pass.
#[derive(Clone, Debug, Default)]
pub struct Importance {
    mlp: Vec<SquareSums>,
    heads: Vec<SquareSums>,
    /// Per layer, the attention norm's and the MLP norm's outputs.
    norms: Vec<[SquareSums; 2]>,
    influence: BlockInfluence,
    windows: usize,
}

impl Importance {
    fn grow(&mut self, l: usize) {
        if self.mlp.len() <= l {
            self.mlp.resize(l + 1, SquareSums::default());
            self.heads.resize(l + 1, SquareSums::default());
            self.norms.resize(l + 1, Default::default());
        }
    }

    /// Per layer `(neuron scores, head channel scores)`, the hidden channel scores (summed over
    /// all norms), block influence, and the number of windows seen.
    #[allow(clippy::type_complexity)]
    pub fn scores(&self) -> (Vec<(Vec<f64>, Vec<f64>)>, Vec<f64>, Vec<f64>, usize) {
        let layers = self
            .mlp
            .iter()
            .zip(&self.heads)
            .map(|(m, h)| (m.sqrt(), h.sqrt()))
            .collect();
        let mut hidden: Vec<f64> = vec![];
        for s in self.norms.iter().flatten().filter(|s| !s.0.is_empty()) {
            hidden.resize(s.0.len(), 0.0);
            hidden.iter_mut().zip(s.sqrt()).for_each(|(a, v)| *a += v);
        }
        (layers, hidden, self.influence.scores(), self.windows)
    }
}

impl<B: Backend> Probe<B> for Importance {
    fn layer_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        if l == 0 {
            self.windows += 1;
        }
        Probe::<B>::layer_input(&mut self.influence, l, x);
    }
    fn attention_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        self.grow(l);
        self.norms[l][0].add(x);
    }
    fn attention_heads(&mut self, l: usize, y: &Tensor<B, 3>) {
        self.grow(l);
        self.heads[l].add(y);
    }
    fn mlp_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        self.grow(l);
        self.norms[l][1].add(x);
    }
    fn mlp_activation(&mut self, l: usize, a: &Tensor<B, 3>) {
        self.grow(l);
        self.mlp[l].add(a);
    }
    fn layer_output(&mut self, l: usize, y: &Tensor<B, 3>) {
        self.grow(l);
        Probe::<B>::layer_output(&mut self.influence, l, y);
    }
}

/// Runs `model` over `windows` (one forward each, positions from 0) collecting [`Importance`].
pub fn importance<B: Backend>(model: &Llama<B>, windows: &[&[u32]]) -> Result<Importance> {
    let mut p = Importance::default();
    p.grow(model.layers.len().saturating_sub(1));
    for w in windows.iter().filter(|w| !w.is_empty()) {
        p.influence.input = None;
        model.forward_probed(window_tensor(model, w)?, &mut p);
    }
    if p.windows == 0 {
        return Err(Error::Invalid(
            "no calibration tokens to score importance on".into(),
        ));
    }
    Ok(p)
}

/// Collects the router logits `[B*T, E]` of every MoE layer in order (tensors, so that a loss on
/// them trains the routers). Dense layers contribute nothing.
#[derive(Clone, Debug)]
pub struct RouterLogits<B: Backend> {
    pub logits: Vec<Tensor<B, 2>>,
}

impl<B: Backend> Default for RouterLogits<B> {
    fn default() -> Self {
        RouterLogits { logits: vec![] }
    }
}

impl<B: Backend> Probe<B> for RouterLogits<B> {
    fn router_logits(&mut self, _l: usize, r: &Tensor<B, 2>) {
        self.logits.push(r.clone());
    }
}

// ----- Attention-input second moments (CLOVER's data-aware whitening) -----

/// Sums over the tokens of one layer's attention input `x` (after `input_layernorm`), in f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputMoments {
    pub tokens: usize,
    /// `sum_t x_t x_t^T`, row-major `h x h`.
    pub sum_outer: Vec<f64>,
    /// `sum_t x_t`.
    pub sum: Vec<f64>,
}

/// Collects [`InputMoments`] of every layer's attention input. Each pass's `X^T X` is one matmul
/// on the backend (f32 within a window), accumulated across windows in f64.
#[derive(Clone, Debug, Default)]
pub struct AttentionInputMoments {
    pub layers: Vec<InputMoments>,
}

impl<B: Backend> Probe<B> for AttentionInputMoments {
    fn attention_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        let [b, t, h] = x.dims();
        let x2 = x.clone().reshape([b * t, h]);
        let outer = host(&x2.clone().transpose().matmul(x2.clone()));
        let sum = host(&x2.sum_dim(0));
        if self.layers.len() <= l {
            self.layers.resize(l + 1, InputMoments::default());
        }
        let m = &mut self.layers[l];
        if m.sum.is_empty() {
            m.sum_outer = vec![0.0; h * h];
            m.sum = vec![0.0; h];
        }
        m.tokens += b * t;
        m.sum_outer
            .iter_mut()
            .zip(&outer)
            .for_each(|(a, x)| *a += *x as f64);
        m.sum
            .iter_mut()
            .zip(&sum)
            .for_each(|(a, x)| *a += *x as f64);
    }
}

/// [`InputMoments`] of every layer of `model` over `windows` of token ids (one forward per window,
/// positions from 0). Layers without attention report no tokens.
pub fn attention_input_moments<B: Backend>(
    model: &Llama<B>,
    windows: &[&[u32]],
) -> Result<Vec<InputMoments>> {
    let mut p = AttentionInputMoments {
        layers: vec![InputMoments::default(); model.layers.len()],
    };
    for w in windows.iter().filter(|w| !w.is_empty()) {
        model.forward_probed(window_tensor(model, w)?, &mut p);
    }
    Ok(p.layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use surgeon_formats::synthetic::SyntheticSpec;
    type B = burn::backend::Flex;

    #[test]
    fn token_influence_is_one_minus_cosine() {
        let x = [1.0, 0.0, 0.0, 2.0];
        assert!(token_influence(&x[..2], &x[..2]).abs() < 1e-12);
        assert!((token_influence(&x[..2], &x[2..]) - 1.0).abs() < 1e-12);
        // Opposite directions: the largest influence, 2.
        assert!((token_influence(&[1.0, 1.0], &[-2.0, -2.0]) - 2.0).abs() < 1e-12);
        // A zero vector has nothing in common with anything.
        assert_eq!(token_influence(&[0.0, 0.0], &[1.0, 0.0]), 1.0);
    }

    #[test]
    fn scores_are_finite_and_in_range() {
        let plan = SyntheticSpec {
            num_layers: 4,
            ..SyntheticSpec::tiny()
        }
        .plan();
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 256).collect();
        let s = block_influences(&model, &ids, 16).unwrap();
        assert_eq!(s.len(), 4);
        assert!(
            s.iter().all(|x| x.is_finite() && (0.0..=2.0).contains(x)),
            "{s:?}"
        );
        assert!(s.iter().any(|&x| x > 0.0), "{s:?}");
        // One window or several: same shape of result, still in range.
        let one = block_influences(&model, &ids, 64).unwrap();
        assert!(one.iter().all(|x| (0.0..=2.0).contains(x)));
        assert!(block_influences(&model, &[], 8).is_err());
        assert!(block_influences(&model, &ids, 0).is_err());
    }

    #[test]
    fn attention_input_moments_sum_outer_products() {
        let plan = SyntheticSpec::tiny().plan();
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 256).collect();
        let windows: Vec<&[u32]> = ids.chunks(10).collect();
        let m = attention_input_moments(&model, &windows).unwrap();
        // Against the attention inputs captured one by one.
        struct Inputs(Vec<Vec<f32>>);
        impl Probe<B> for Inputs {
            fn attention_input(&mut self, l: usize, x: &Tensor<B, 3>) {
                if l == 1 {
                    self.0.extend(host(x).chunks(64).map(<[f32]>::to_vec));
                }
            }
        }
        let mut p = Inputs(vec![]);
        for w in &windows {
            model.forward_probed(window_tensor(&model, w).unwrap(), &mut p);
        }
        let m1 = &m[1];
        assert_eq!((m1.tokens, p.0.len()), (24, 24));
        for (i, j) in [(0, 0), (3, 17), (63, 5)] {
            let want: f64 = p.0.iter().map(|x| x[i] as f64 * x[j] as f64).sum();
            let got = m1.sum_outer[i * 64 + j];
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        let want: f64 = p.0.iter().map(|x| x[7] as f64).sum();
        assert!((m1.sum[7] - want).abs() < 1e-4 * want.abs().max(1.0));
    }
}
