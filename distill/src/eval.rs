//! Windowed next-token perplexity.
//!
//! The first `max_tokens` token ids are cut into consecutive, non-overlapping windows of `window + 1`
//! tokens (the last one may be shorter; one of a single token is dropped). In each window token `t + 1`
//! is predicted from tokens `0..=t`, so a full window scores `window` tokens and nothing crosses a window
//! boundary. `scripts/bench-eval.sh` runs the same windows in PyTorch.
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::rows;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// How [`perplexity`] cuts and scores the token stream.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Predicted tokens per window (windows hold `window + 1` tokens).
    pub window: usize,
    /// Use only the first this many tokens.
    pub max_tokens: Option<usize>,
    /// Windows of equal length run together in batches of this size.
    pub batch_size: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            window: 512,
            max_tokens: None,
            batch_size: 1,
            progress: false,
        }
    }
}

/// What [`perplexity`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Tokens scored (predicted).
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Scored tokens per second of model time (excludes loading and tokenising).
    pub tokens_per_s: f64,
    pub windows: usize,
    pub seconds: f64,
}

/// The windows [`perplexity`] scores: slices of `window + 1` tokens (the last may be shorter).
pub fn windows(ids: &[u32], window: usize, max_tokens: Option<usize>) -> Vec<&[u32]> {
    let n = max_tokens.map_or(ids.len(), |m| m.min(ids.len()));
    ids[..n]
        .chunks(window.max(1) + 1)
        .filter(|w| w.len() >= 2)
        .collect()
}

/// Sum of `-log p(target)` over all positions of `logits` `[B, T, V]` for `targets` (`B * T` ids,
/// row-major), in f64. On the CPU backend each row of the logits is reduced on the host in one fused
/// pass ([`crate::rows`]: max, then the sum of exponentials) instead of materialising a log-softmax
/// over the vocabulary; elsewhere on the device by [`crate::heal::loss::nll_sum`].
pub fn nll_total<B: Backend>(logits: Tensor<B, 3>, targets: &[u32]) -> f64 {
    let [b, t, v] = logits.dims();
    assert_eq!(targets.len(), b * t, "one target per position");
    if !crate::backend::is_cpu::<B>() {
        let device = logits.device();
        let ids = targets.iter().map(|&x| x as i64).collect::<Vec<_>>();
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        return crate::heal::loss::nll_sum(logits, targets)
            .into_scalar()
            .elem();
    }
    let mut logits = rows::host_f32(logits);
    let per_row: Vec<f64> = logits
        .par_chunks_mut(v.max(1))
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let m = rows::max(row);
            let zt = row[t as usize];
            rows::exp_shifted(row, m).ln() - (zt - m) as f64
        })
        .collect();
    // Summed in order: the same value whatever the threads did.
    per_row.iter().sum()
}

/// Perplexity of `model` on token ids `ids` (see the module docs for the windows).
pub fn perplexity<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    opts: &EvalOptions,
) -> Result<EvalReport> {
    if opts.window == 0 {
        return Err(Error::Invalid("window must be at least 1".into()));
    }
    let vocab = model.vocab_size();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let wins = windows(ids, opts.window, opts.max_tokens);
    if wins.is_empty() {
        return Err(Error::Invalid(
            "not enough tokens to score (need at least 2)".into(),
        ));
    }
    let device = model.device();
    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new(wins.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} windows {elapsed}<{eta} {msg}",
            )
            .unwrap(),
        );
        b
    });
    let start = Instant::now();
    let (mut total, mut count) = (0f64, 0usize);
    let mut i = 0;
    while i < wins.len() {
        let len = wins[i].len();
        let mut j = i;
        while j < wins.len() && j - i < opts.batch_size.max(1) && wins[j].len() == len {
            j += 1;
        }
        let batch = &wins[i..j];
        let b = batch.len();
        let t = len - 1;
        let mut inp = Vec::with_capacity(b * t);
        let mut tgt = Vec::with_capacity(b * t);
        for w in batch {
            inp.extend(w[..t].iter().map(|&x| x as i64));
            tgt.extend_from_slice(&w[1..]);
        }
        let inp = Tensor::<B, 2, Int>::from_data(TensorData::new(inp, [b, t]), &device);
        let s = nll_total(model.forward(inp), &tgt);
        total += s;
        count += b * t;
        if let Some(bar) = &bar {
            bar.inc(b as u64);
            bar.set_message(format!("ppl {:.3}", (total / count as f64).exp()));
        }
        i = j;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    let nll = total / count as f64;
    Ok(EvalReport {
        tokens: count,
        nll,
        ppl: nll.exp(),
        tokens_per_s: count as f64 / seconds,
        windows: wins.len(),
        seconds,
    })
}

/// Reads evaluation text: a `.jsonl` file (the `text` field of every line, joined by blank lines) or
/// plain text.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        return Ok(raw);
    }
    let mut texts = vec![];
    for (n, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), n + 1)))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::Invalid(format!(
                "{}:{}: no string field `text`",
                path.display(),
                n + 1
            ))
        })?;
        texts.push(t.to_string());
    }
    Ok(texts.join("\n\n"))
}
