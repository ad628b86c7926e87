//! Autoregressive generation with a KV cache: greedy or temperature + nucleus (top-p) sampling.
use crate::backend::on_worker;
use crate::model::{KvCache, Llama};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after emitting one of these (EOS ids).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: vec![],
        }
    }
}

/// What [`generate`] produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerateReport {
    /// New tokens (including a final stop token when one was produced).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub stopped: bool,
    /// Seconds spent on the prompt (prefill).
    pub prefill_s: f64,
    /// Seconds spent on the tokens after the first.
    pub decode_s: f64,
    /// New tokens per second after the first (decode speed).
    pub tokens_per_s: f64,
}

impl GenerateOptions {
    /// Checks the sampling settings: `temperature` finite and not negative (0 is greedy),
    /// `top_p` in (0, 1].
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "`temperature` must be a finite number >= 0 (0 is greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Picks the next token from a row of logits.
pub fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, (((v - max) / opts.temperature) as f64).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = probs.len();
    if opts.top_p < 1.0 {
        let mut c = 0.0;
        for (k, p) in probs.iter().enumerate() {
            c += p.1;
            if c >= opts.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
    }
    let probs = &probs[..keep];
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * total;
    for p in probs {
        r -= p.1;
        if r <= 0.0 {
            return p.0 as u32;
        }
    }
    probs[probs.len() - 1].0 as u32
}

fn last_row<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 logits")
}

/// Generates after `prompt` (at least one token). `on_token` sees each new token as it is produced and
/// may return `false` to stop.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> GenerateReport {
    assert!(
        !prompt.is_empty(),
        "generate needs a prompt of at least one token"
    );
    let device = model.device();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut cache = model.new_cache();
    let ids = |t: &[u32]| {
        let v: Vec<i64> = t.iter().map(|&x| x as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, t.len()]), &device)
    };
    // Each forward pass runs on a worker of rayon's pool (see `backend::on_worker`).
    let step = |t: Tensor<B, 2, Int>, cache: &mut KvCache<B>| {
        on_worker(|| last_row(model.forward_cached(t, cache)))
    };
    let t0 = Instant::now();
    let mut row = step(ids(prompt), &mut cache);
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = vec![];
    let mut stopped = false;
    while out.len() < opts.max_new_tokens {
        let next = sample(&row, opts, &mut rng);
        out.push(next);
        let go_on = on_token(next);
        if opts.stop_tokens.contains(&next) {
            stopped = true;
            break;
        }
        if !go_on || out.len() == opts.max_new_tokens {
            break;
        }
        row = if model.rope_switches(cache.len(), 1) {
            // LongRoPE changes every position's frequencies here: recompute the whole sequence,
            // as transformers' Phi-3 does when generation first passes the pretraining length.
            cache.clear();
            let seq: Vec<u32> = prompt.iter().chain(&out).copied().collect();
            step(ids(&seq), &mut cache)
        } else {
            step(ids(&[next]), &mut cache)
        };
    }
    let decode_s = t1.elapsed().as_secs_f64();
    GenerateReport {
        prompt_tokens: prompt.len(),
        stopped,
        prefill_s,
        decode_s,
        tokens_per_s: if decode_s > 0.0 {
            out.len().saturating_sub(1) as f64 / decode_s
        } else {
            0.0
        },
        tokens: out,
    }
}

/// Decodes a growing token sequence into text pieces, holding back incomplete UTF-8.
pub struct TextStream<'a> {
    tok: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a tokenizers::Tokenizer, skip_special: bool) -> Self {
        TextStream {
            tok,
            ids: vec![],
            emitted: 0,
            skip_special,
        }
    }

    /// Adds a token; returns the text that became final.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self
            .tok
            .decode(&self.ids, self.skip_special)
            .unwrap_or_default();
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return String::new();
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        piece
    }

    /// All text decoded so far.
    pub fn text(&self) -> String {
        self.tok
            .decode(&self.ids, self.skip_special)
            .unwrap_or_default()
    }
}
