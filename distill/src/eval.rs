//! Windowed next-token perplexity.
//!
//! The first `max_tokens` token ids are cut into consecutive, non-overlapping windows of `window + 1`
//! tokens (the last one may be shorter; one of a single token is dropped). In each window token `t + 1`
//! is predicted from tokens `0..=t`, so a full window scores `window` tokens and nothing crosses a window
//! boundary. `scripts/bench-eval.sh` runs the same windows in PyTorch.
use crate::backend::{cast, Cpu, CpuView};
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
    /// Windows of equal length run together in batches of this size; `None`: [`auto_batch`].
    pub batch_size: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            window: 512,
            max_tokens: None,
            batch_size: None,
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

/// Positions per batch that [`auto_batch`] aims at. Each batch packs every weight for the GEMM once
/// and wakes the threads once per product, so on the CPU backend bigger batches amortise that:
/// SmolLM2, windows of 512, 2 threads: 415, 484, 474, 508, 523 tok/s at 1, 2, 4, 8, 16 windows per
/// batch, peak RSS 1.18 -> 1.32 GB at 8.
pub const AUTO_BATCH_POSITIONS: usize = 4096;

/// Bytes of whole logits `[B, T, V]` that [`auto_batch`] allows per batch off the CPU backend
/// (where [`nll_of_tokens`] makes them whole).
const AUTO_BATCH_LOGIT_BYTES: usize = 256 << 20;

/// Windows of `window` positions per batch when the caller sets none: about
/// [`AUTO_BATCH_POSITIONS`] positions, at least one window; off the CPU backend also at most
/// [`AUTO_BATCH_LOGIT_BYTES`] of f32 logits over `vocab` entries.
pub fn auto_batch<B: Backend>(window: usize, vocab: usize) -> usize {
    let window = window.max(1);
    let by_positions = AUTO_BATCH_POSITIONS / window;
    let by_logits = match crate::backend::is_cpu::<B>() {
        true => usize::MAX,
        false => AUTO_BATCH_LOGIT_BYTES / (4 * window * vocab.max(1)),
    };
    by_positions.min(by_logits).max(1)
}

/// Sum of `-log p(target)` over all positions of `logits` `[B, T, V]` for `targets` (`B * T` ids,
/// row-major), in f64. On the CPU backend each row of the logits is reduced on the host in one fused
/// pass ([`crate::rows`]: max, then the sum of exponentials) instead of materialising a log-softmax
/// over the vocabulary; elsewhere on the device by [`crate::heal::loss::nll_sum`].
pub fn nll_total<B: Backend>(logits: Tensor<B, 3>, targets: &[u32]) -> f64 {
    let mut per_row = Vec::with_capacity(targets.len());
    nll_rows(logits, targets, &mut per_row);
    // Summed in order: the same value whatever the threads did.
    per_row.iter().sum()
}

/// [`nll_total`] of `model` on token ids `input` `[B, T]`. On the CPU backend the logits are never
/// made whole: with a plain f32 output projection, [`nll_by_vocab_chunks`]; otherwise
/// [`LOGIT_CHUNK_BYTES`] of rows at a time ([`chunked_nll`]). A window's whole logits (100 MB for
/// SmolLM2 at 512 tokens) were a fresh mapping every window, page faults and all.
pub fn nll_of_tokens<B: Backend>(
    model: &Llama<B>,
    input: Tensor<B, 2, Int>,
    targets: &[u32],
) -> f64 {
    let mut per_row = Vec::with_capacity(targets.len());
    nll_rows_of_tokens(model, input, targets, &mut per_row);
    per_row.iter().sum()
}

/// Appends what [`nll_of_tokens`] sums to `out`: on the CPU backend `-log p(target)` of every
/// position, row-major (so sums in order do not depend on how the windows were batched),
/// elsewhere one sum for the whole batch.
pub fn nll_rows_of_tokens<B: Backend>(
    model: &Llama<B>,
    input: Tensor<B, 2, Int>,
    targets: &[u32],
    out: &mut Vec<f64>,
) {
    if !crate::backend::is_cpu::<B>() {
        return nll_rows(model.forward(input), targets, out);
    }
    if let Some(head) = host_head(model) {
        let hidden = model.hidden(input, None);
        let h = hidden.dims()[2];
        let hidden = CpuView::of(hidden);
        return out.extend(nll_by_vocab_chunks(&hidden, &head, h, targets));
    }
    chunked_nll(
        model,
        input,
        targets,
        logit_chunk_rows(model.vocab_size()),
        out,
    )
}

/// The output projection's weight `[V, h]` on the host when the logits are exactly `hidden W^T`
/// in f32 (no final soft-capping, no mixed-precision compute dtype).
fn host_head<B: Backend>(model: &Llama<B>) -> Option<CpuView> {
    if model.final_softcap.is_some() || model.compute.is_some() {
        return None;
    }
    let w = match &model.lm_head {
        Some(w) => w.val(),
        None => model.embed_tokens.val(),
    };
    let w = cast::<_, Tensor<Cpu, 2>>(w).ok()?;
    (w.dtype() == burn::tensor::DType::F32).then(|| CpuView::new(w.into_primitive().tensor()))
}

/// Vocabulary entries per product of [`nll_by_vocab_chunks`]: 9 MB of SmolLM2's head, its logits
/// for 512 positions 8 MB.
const VOCAB_CHUNK: usize = 4096;

/// `-log p(target)` of every row of `hidden` `[N, h]` under the logits `hidden W^T` (`W`: `[V, h]`),
/// without making the logits whole: each block of [`VOCAB_CHUNK`] vocabulary entries is one
/// product (on one thread, blocks in parallel), reduced at once to each row's maximum and sum of
/// exponentials, and the blocks' partial sums are merged in order (the same value whatever the
/// threads did). Against row chunks of the whole vocabulary, each weight is packed for the GEMM
/// once instead of once per chunk (packing was 13% of `surgeon eval`), and each block's logits are
/// reduced while they are still in cache.
fn nll_by_vocab_chunks(hidden: &[f32], w: &[f32], h: usize, targets: &[u32]) -> Vec<f64> {
    use crate::model::host_linear::{x_wt, Threads};
    let rows = hidden.len() / h.max(1);
    let vocab = w.len() / h.max(1);
    assert_eq!(targets.len(), rows, "one target per position");
    assert!(
        targets.iter().all(|&t| (t as usize) < vocab),
        "a target id is outside the vocabulary of {vocab}"
    );
    let blocks: Vec<VocabBlock> = w
        .par_chunks(VOCAB_CHUNK * h)
        .enumerate()
        .map(|(b, wb)| {
            let first = b * VOCAB_CHUNK;
            let n = wb.len() / h;
            let mut z = x_wt(hidden, wb, h, Threads::One);
            let mut hits = Vec::new();
            let stats = z
                .chunks_mut(n)
                .zip(targets)
                .enumerate()
                .map(|(r, (row, &t))| {
                    if (first..first + n).contains(&(t as usize)) {
                        hits.push((r, row[t as usize - first]));
                    }
                    let m = rows::max(row);
                    (m, rows::exp_shifted(row, m))
                })
                .collect();
            VocabBlock { stats, hits }
        })
        .collect();
    let mut target = vec![f32::NAN; rows];
    for &(r, z) in blocks.iter().flat_map(|b| &b.hits) {
        target[r] = z;
    }
    (0..rows)
        .map(|r| {
            let stats = || blocks.iter().map(|b| b.stats[r]);
            let m = stats().map(|s| s.0).fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = stats().map(|(bm, bs)| bs * ((bm - m) as f64).exp()).sum();
            sum.ln() - (target[r] - m) as f64
        })
        .collect()
}

/// One vocabulary block of [`nll_by_vocab_chunks`].
struct VocabBlock {
    /// Each row's maximum logit in the block and its sum of `exp(z - max)`.
    stats: Vec<(f32, f64)>,
    /// (row, logit) of the rows whose target lies in the block.
    hits: Vec<(usize, f32)>,
}

/// [`nll_rows_of_tokens`] on the CPU backend, logits made `rows` rows at a time.
fn chunked_nll<B: Backend>(
    model: &Llama<B>,
    input: Tensor<B, 2, Int>,
    targets: &[u32],
    rows: usize,
    out: &mut Vec<f64>,
) {
    let hidden = model.hidden(input, None);
    let [b, t, h] = hidden.dims();
    let hidden = hidden.reshape([b * t, h]);
    for start in (0..b * t).step_by(rows) {
        let n = rows.min(b * t - start);
        let logits = model.logits(hidden.clone().narrow(0, start, n).reshape([1, n, h]));
        nll_rows(logits, &targets[start..start + n], out);
    }
}

/// Bytes of logits [`nll_of_tokens`] makes at a time: under glibc's largest mmap threshold (32 MiB),
/// so the buffer is reused from the heap.
const LOGIT_CHUNK_BYTES: usize = 24 << 20;

/// Rows per chunk of [`nll_of_tokens`]: a multiple of 64 (the row block of the GEMM's AVX-512
/// kernel), at least 64.
fn logit_chunk_rows(vocab: usize) -> usize {
    (LOGIT_CHUNK_BYTES / (4 * vocab.max(1)) / 64).max(1) * 64
}

/// Appends `-log p(target)` of each row of `logits` `[B, T, V]` to `out`. On the CPU backend the
/// logits are read where they lie, each row through a scratch copy (in cache) for its
/// exponentials.
fn nll_rows<B: Backend>(logits: Tensor<B, 3>, targets: &[u32], out: &mut Vec<f64>) {
    let [b, t, _] = logits.dims();
    assert_eq!(targets.len(), b * t, "one target per position");
    let logits = match cast::<_, Tensor<Cpu, 3>>(logits) {
        Ok(cpu) => return nll_rows_on_host(cpu, targets, out),
        Err(other) => other,
    };
    let device = logits.device();
    let ids = targets.iter().map(|&x| x as i64).collect::<Vec<_>>();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let sum: f64 = crate::heal::loss::nll_sum(logits, targets)
        .into_scalar()
        .elem();
    // One value for the whole batch: its rows are not told apart off the CPU.
    out.push(sum);
}

fn nll_rows_on_host(logits: Tensor<Cpu, 3>, targets: &[u32], out: &mut Vec<f64>) {
    let v = logits.dims()[2].max(1);
    let values = CpuView::new(logits.into_primitive().tensor());
    let per_row: Vec<f64> = values
        .par_chunks(v)
        .zip(targets.par_iter())
        .map_init(Vec::new, |scratch: &mut Vec<f32>, (row, &t)| {
            let m = rows::max(row);
            scratch.clear();
            scratch.extend_from_slice(row);
            rows::exp_shifted(scratch, m).ln() - (row[t as usize] - m) as f64
        })
        .collect();
    out.extend(per_row);
}

/// Perplexity of `model` on token ids `ids` (see the module docs for the windows).
pub fn perplexity<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    opts: &EvalOptions,
) -> Result<EvalReport> {
    if opts.window == 0 {
        return Err(Error::Invalid("`window` must be at least 1".into()));
    }
    if opts.batch_size == Some(0) {
        return Err(Error::Invalid("`batch_size` must be at least 1".into()));
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
    let batch_size = opts
        .batch_size
        .unwrap_or_else(|| auto_batch::<B>(opts.window, vocab));
    // Summed in order, value by value: on the CPU backend the same bits for any batch size.
    let (mut total, mut count) = (0f64, 0usize);
    let mut values = Vec::new();
    let mut i = 0;
    while i < wins.len() {
        let len = wins[i].len();
        let mut j = i;
        while j < wins.len() && j - i < batch_size && wins[j].len() == len {
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
        values.clear();
        nll_rows_of_tokens(model, inp, &tgt, &mut values);
        total = values.iter().fold(total, |sum, v| sum + v);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heal::trainer::load_model;
    use surgeon_formats::synthetic::SyntheticSpec;

    #[test]
    fn chunked_logits_give_the_nll_of_the_whole_logits_to_the_bit() {
        let plan = SyntheticSpec::tiny().plan();
        let device = Default::default();
        let model = load_model::<Cpu>(&plan, &|_| false, &device).unwrap();
        let (b, t) = (2, 100);
        let ids: Vec<u32> = (0..b * (t + 1)).map(|i| (i * 37 % 251) as u32).collect();
        let (mut inp, mut tgt) = (vec![], vec![]);
        for w in ids.chunks(t + 1) {
            inp.extend(w[..t].iter().map(|&x| x as i64));
            tgt.extend_from_slice(&w[1..]);
        }
        let input =
            || Tensor::<Cpu, 2, Int>::from_data(TensorData::new(inp.clone(), [b, t]), &device);
        let whole = nll_total(model.forward(input()), &tgt);
        assert!(whole.is_finite() && whole > 0.0);
        // 200 rows: three full chunks of 64 and a short one; then one chunk for all.
        for rows in [64, 256] {
            let mut per_row = Vec::new();
            chunked_nll(&model, input(), &tgt, rows, &mut per_row);
            let chunked: f64 = per_row.iter().sum();
            assert_eq!(chunked.to_bits(), whole.to_bits(), "{rows} rows per chunk");
        }
        assert_eq!(logit_chunk_rows(49152), 128);
        assert_eq!(logit_chunk_rows(256_000), 64);
        // The path nll_of_tokens takes for this model: vocabulary blocks, partial sums merged.
        let blocks = nll_of_tokens(&model, input(), &tgt);
        assert!(
            (blocks - whole).abs() <= 1e-9 * whole,
            "{blocks} vs {whole}"
        );
    }

    /// Several vocabulary blocks (the last one short), targets in each of them: every row's nll
    /// against the log-sum-exp of logits computed in f64.
    #[test]
    fn vocabulary_blocks_give_the_nll_of_whole_rows() {
        let (rows, h, v) = (37usize, 24usize, 2 * VOCAB_CHUNK + 300);
        let val = |i: usize, s: usize| ((i * s % 1009) as f32 / 1009.0 - 0.5) * 2.0;
        let x: Vec<f32> = (0..rows * h).map(|i| val(i, 7)).collect();
        let w: Vec<f32> = (0..v * h).map(|i| val(i, 13)).collect();
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 2311) % v) as u32).collect();
        let got = nll_by_vocab_chunks(&x, &w, h, &targets);
        for (r, &t) in targets.iter().enumerate() {
            let z: Vec<f64> = (0..v)
                .map(|j| {
                    (0..h)
                        .map(|k| x[r * h + k] as f64 * w[j * h + k] as f64)
                        .sum()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
            let want = lse - z[t as usize];
            assert!(
                (got[r] - want).abs() < 1e-5 * want.abs().max(1.0),
                "row {r}: {} vs {want}",
                got[r]
            );
        }
    }
}
