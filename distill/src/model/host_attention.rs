//! Causal softmax attention computed on the host for the CPU backend: the forward pass (evaluation,
//! generation, calibration, a KD teacher) and, for training, the backward pass
//! ([`super::host_attention_grad`] makes the pair one autodiff operation).
//!
//! The same blocks as [`super::causal_attention`] (queries in blocks, each against only the keys it
//! can see), fused: per head, one product for the scores, the mask, a softmax with the vectorised
//! exponential of [`crate::rows`] and one product with the values, heads in parallel. burn-flex
//! runs every element-wise operation on one thread and allocates each intermediate, so the
//! tensor-op version spent 42 ms of a SmolLM2 layer's 120 ms (window 512, 2 threads) in attention.
//! The backward pass recomputes each block's weights from the saved log-sum-exp of its rows (as
//! FlashAttention does) instead of keeping the `[T, T]` weights of every layer.
//!
//! The sums differ from the tensor ops in rounding only (f64 row sums here, f32 there): a KD
//! teacher on this path and an identical student under autodiff agree to about 1e-7, not bitwise.
use super::{visible_keys, ScoreRule};
use crate::rows::{self, host_f32};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// Fewer queries than this (decoding) stay on tensor operations: this path first copies every cached
/// key and value out of the cache's buffer, which cost more than it saved when decoding one token
/// (SmolLM2 after a 569-token prompt, 2 threads: 12.4 against 14.5 tokens/s; prefill 4.15 against
/// 4.9 s).
pub(crate) const MIN_QUERIES: usize = 16;

/// Queries per block: the scores of a block (`BLOCK` x visible keys) stay in the L2 cache.
const BLOCK: usize = 64;

/// Sizes of one head's problem: queries, their first position, keys, key and value widths.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    pub t: usize,
    pub start: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
}

/// [`super::causal_attention`] of queries `[B, G, R, T, d]` at positions `start..start + T` over
/// keys `[B, G, Tk, d]` and values `[B, G, Tk, dv]`; returns `[B, G, R, T, dv]`.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
    rule: ScoreRule,
) -> Tensor<B, 5> {
    let [b, g, r, t, _] = q.dims();
    let device = q.device();
    let inputs = Inputs::new(q, k, v, start);
    let dv = inputs.dims.dv;
    let (out, _) = inputs.forward(rule);
    Tensor::from_data(TensorData::new(out, [b, g, r, t, dv]), &device)
}

/// Queries `[B, G, R, T, d]`, keys `[B, G, Tk, d]` and values `[B, G, Tk, dv]` on the host
/// (row-major), with the sizes of one head and the query heads per key head (`R`).
#[derive(Debug)]
pub(super) struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub dims: Head,
    pub group: usize,
}

impl Inputs {
    /// Copies the tensors to the host (no copy on the CPU backend when a tensor is not shared).
    pub fn new<B: Backend>(
        q: Tensor<B, 5>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        start: usize,
    ) -> Self {
        let [_, _, group, t, d] = q.dims();
        let [_, _, tk, dv] = v.dims();
        Inputs {
            q: host_f32(q),
            k: host_f32(k),
            v: host_f32(v),
            dims: Head {
                t,
                start,
                tk,
                d,
                dv,
            },
            group,
        }
    }

    /// Query `head`'s queries and its key head's keys and values.
    fn head(&self, head: usize) -> (&[f32], &[f32], &[f32]) {
        let Head { t, tk, d, dv, .. } = self.dims;
        let kv = head / self.group;
        (
            &self.q[head * t * d..][..t * d],
            &self.k[kv * tk * d..][..tk * d],
            &self.v[kv * tk * dv..][..tk * dv],
        )
    }

    /// The output `[B, G, R, T, dv]` and the log-sum-exp of each query's scores `[B, G, R, T]`.
    pub fn forward(&self, rule: ScoreRule) -> (Vec<f32>, Vec<f32>) {
        let Head { t, d, dv, .. } = self.dims;
        let heads = self.q.len() / (t * d).max(1);
        let mut out = vec![0f32; heads * t * dv];
        let mut lse = vec![0f32; heads * t];
        out.par_chunks_mut((t * dv).max(1))
            .zip(lse.par_chunks_mut(t.max(1)))
            .enumerate()
            .for_each_init(Vec::new, |scores, (head, (out, lse))| {
                attend_head(self.head(head), (out, lse), self.dims, rule, scores)
            });
        (out, lse)
    }

    /// Gradients of the queries, keys and values (shapes as theirs) from the gradient of the
    /// output `d_out`, given [`Inputs::forward`]'s output and log-sum-exp. Each query head
    /// computes its own key and value gradients; a key head's are the sum over its group, in
    /// order, so the result does not depend on the threads.
    pub fn backward(
        &self,
        rule: ScoreRule,
        out: &[f32],
        lse: &[f32],
        d_out: &[f32],
    ) -> [Vec<f32>; 3] {
        let Head { t, tk, d, dv, .. } = self.dims;
        let heads = self.q.len() / (t * d).max(1);
        let mut dq = vec![0f32; heads * t * d];
        let mut dk_heads = vec![0f32; heads * tk * d];
        let mut dv_heads = vec![0f32; heads * tk * dv];
        dq.par_chunks_mut((t * d).max(1))
            .zip(dk_heads.par_chunks_mut((tk * d).max(1)))
            .zip(dv_heads.par_chunks_mut((tk * dv).max(1)))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (head, ((dq, dk), dv_))| {
                let rows = head * t..(head + 1) * t;
                let saved = Saved {
                    out: &out[rows.start * dv..rows.end * dv],
                    lse: &lse[rows.clone()],
                    d_out: &d_out[rows.start * dv..rows.end * dv],
                };
                head_backward(
                    self.head(head),
                    saved,
                    [dq, dk, dv_],
                    self.dims,
                    rule,
                    scratch,
                )
            });
        let sum_group = |per_head: &[f32], width: usize| -> Vec<f32> {
            let size = tk * width;
            let mut sum = vec![0f32; per_head.len() / self.group.max(1)];
            sum.par_chunks_mut(size.max(1))
                .enumerate()
                .for_each(|(kv, sum)| {
                    for r in 0..self.group {
                        let part = &per_head[(kv * self.group + r) * size..][..size];
                        sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                    }
                });
            sum
        };
        [dq, sum_group(&dk_heads, d), sum_group(&dv_heads, dv)]
    }
}

/// One head: `q` `[t, d]`, `k` `[tk, d]`, `v` `[tk, dv]`; writes `out` `[t, dv]` and the
/// log-sum-exp of each query's scores, `lse` `[t]` (row-major).
fn attend_head(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (out, lse): (&mut [f32], &mut [f32]),
    s: Head,
    rule: ScoreRule,
    scores: &mut Vec<f32>,
) {
    for first in (0..s.t).step_by(BLOCK) {
        let n = BLOCK.min(s.t - first);
        let keys = visible_keys(s.start + first, n, rule.window);
        let m = keys.len();
        assert!(keys.end <= s.tk, "keys beyond the cache");
        scores.clear();
        scores.resize(n * m, 0.0);
        // SAFETY (both products): every matrix lies inside its slice: q and out rows
        // first..first + n, k and v rows `keys` (within tk, asserted), scores n x m.
        unsafe {
            // scores = q[first..first + n] @ k[keys]^T * scale
            product(
                [n, m, s.d],
                (scores.as_mut_ptr(), m as isize, false),
                (q[first * s.d..].as_ptr(), s.d as isize, 1),
                (k[keys.start * s.d..].as_ptr(), 1, s.d as isize),
                rule.scale as f32,
            );
        }
        for (i, row) in scores.chunks_mut(m).enumerate() {
            let seen = seen_in_block(s.start + first + i, &keys, rule.window);
            lse[first + i] = softmax_visible(row, seen, rule.softcap);
        }
        unsafe {
            // out[first..first + n] = scores @ v[keys]
            product(
                [n, s.dv, m],
                (out[first * s.dv..].as_mut_ptr(), s.dv as isize, false),
                (scores.as_ptr(), m as isize, 1),
                (v[keys.start * s.dv..].as_ptr(), s.dv as isize, 1),
                1.0,
            );
        }
    }
}

/// The keys that the query at position `p` sees, as a range within a block's visible `keys`.
fn seen_in_block(p: usize, keys: &std::ops::Range<usize>, window: usize) -> std::ops::Range<usize> {
    let seen = visible_keys(p, 1, window);
    seen.start - keys.start..seen.end - keys.start
}

/// Softmax of the scores in `seen` (after the soft-cap), zero elsewhere; returns the log-sum-exp
/// of the (soft-capped) scores in `seen`.
fn softmax_visible(row: &mut [f32], seen: std::ops::Range<usize>, softcap: Option<f64>) -> f32 {
    row[..seen.start].fill(0.0);
    row[seen.end..].fill(0.0);
    let row = &mut row[seen];
    if let Some(c) = softcap {
        let c = c as f32;
        row.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
    }
    let max = rows::max(row);
    let sum = rows::exp_shifted(row, max);
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    (max as f64 + sum.ln()) as f32
}

/// What the backward pass of one head reads: the forward's output `[t, dv]`, log-sum-exps `[t]`
/// and the output's gradient `[t, dv]`.
struct Saved<'a> {
    out: &'a [f32],
    lse: &'a [f32],
    d_out: &'a [f32],
}

/// Scratch rows of one block in the backward pass: the weights (then the scores' gradient), the
/// weights' gradient and the soft-cap's derivative.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    cap: Vec<f32>,
}

/// The backward pass of one head (see [`attend_head`]): writes `dq` `[t, d]` and this head's parts
/// of the key and value gradients, `dk` `[tk, d]` and `dv` `[tk, dv]`. Per block, with the weights
/// `P = exp(S - lse)` recomputed: `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`,
/// `dQ = scale dS K`, `dK += scale dS^T Q` (`dS` times `1 - tanh^2` under a soft-cap).
fn head_backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    saved: Saved<'_>,
    [dq, dk, dv]: [&mut [f32]; 3],
    s: Head,
    rule: ScoreRule,
    x: &mut Scratch,
) {
    let scale = rule.scale as f32;
    for first in (0..s.t).step_by(BLOCK) {
        let n = BLOCK.min(s.t - first);
        let keys = visible_keys(s.start + first, n, rule.window);
        let m = keys.len();
        assert!(keys.end <= s.tk, "keys beyond the cache");
        for buf in [&mut x.p, &mut x.dp] {
            buf.clear();
            buf.resize(n * m, 0.0);
        }
        let d_out = &saved.d_out[first * s.dv..][..n * s.dv];
        // SAFETY (every product): each matrix lies inside its slice: q, dq, d_out rows
        // first..first + n, k, v, dk, dv rows `keys` (within tk, asserted), p and dp n x m.
        unsafe {
            // p = q[first..first + n] @ k[keys]^T * scale, then the weights
            product(
                [n, m, s.d],
                (x.p.as_mut_ptr(), m as isize, false),
                (q[first * s.d..].as_ptr(), s.d as isize, 1),
                (k[keys.start * s.d..].as_ptr(), 1, s.d as isize),
                scale,
            );
        }
        recompute_weights(x, n, m, (first, &keys), s, rule, saved.lse);
        unsafe {
            // dv[keys] += p^T @ d_out
            product(
                [m, s.dv, n],
                (dv[keys.start * s.dv..].as_mut_ptr(), s.dv as isize, true),
                (x.p.as_ptr(), 1, m as isize),
                (d_out.as_ptr(), s.dv as isize, 1),
                1.0,
            );
            // dp = d_out @ v[keys]^T
            product(
                [n, m, s.dv],
                (x.dp.as_mut_ptr(), m as isize, false),
                (d_out.as_ptr(), s.dv as isize, 1),
                (v[keys.start * s.dv..].as_ptr(), 1, s.dv as isize),
                1.0,
            );
        }
        // p becomes dS = p * (dp - rowsum(d_out * out)), times the soft-cap's derivative.
        let out = &saved.out[first * s.dv..][..n * s.dv];
        for (i, (p, dp)) in x.p.chunks_mut(m).zip(x.dp.chunks(m)).enumerate() {
            let row = i * s.dv..(i + 1) * s.dv;
            let delta: f32 = d_out[row.clone()]
                .iter()
                .zip(&out[row])
                .map(|(a, b)| a * b)
                .sum();
            p.iter_mut().zip(dp).for_each(|(p, dp)| *p *= dp - delta);
            if rule.softcap.is_some() {
                let cap = &x.cap[i * m..][..m];
                p.iter_mut().zip(cap).for_each(|(p, c)| *p *= c);
            }
        }
        unsafe {
            // dq[first..first + n] = scale * dS @ k[keys]
            product(
                [n, s.d, m],
                (dq[first * s.d..].as_mut_ptr(), s.d as isize, false),
                (x.p.as_ptr(), m as isize, 1),
                (k[keys.start * s.d..].as_ptr(), s.d as isize, 1),
                scale,
            );
            // dk[keys] += scale * dS^T @ q[first..first + n]
            product(
                [m, s.d, n],
                (dk[keys.start * s.d..].as_mut_ptr(), s.d as isize, true),
                (x.p.as_ptr(), 1, m as isize),
                (q[first * s.d..].as_ptr(), s.d as isize, 1),
                scale,
            );
        }
    }
}

/// Turns the raw scores of a block (`x.p`, `n` x `m`, queries from `first`) into the forward's
/// weights `exp(capped - lse)` (zero for hidden keys); under a soft-cap, `x.cap` receives its
/// derivative `1 - tanh^2` per score.
fn recompute_weights(
    x: &mut Scratch,
    n: usize,
    m: usize,
    (first, keys): (usize, &std::ops::Range<usize>),
    s: Head,
    rule: ScoreRule,
    lse: &[f32],
) {
    if rule.softcap.is_some() {
        x.cap.clear();
        x.cap.resize(n * m, 0.0);
    }
    for (i, row) in x.p.chunks_mut(m).enumerate() {
        let seen = seen_in_block(s.start + first + i, keys, rule.window);
        if let Some(c) = rule.softcap {
            let c = c as f32;
            let cap = &mut x.cap[i * m..][..m];
            for (x, d) in row[seen.clone()].iter_mut().zip(&mut cap[seen.clone()]) {
                let th = (*x / c).tanh();
                *x = c * th;
                *d = 1.0 - th * th;
            }
        }
        row[..seen.start].fill(0.0);
        row[seen.end..].fill(0.0);
        rows::exp_shifted(&mut row[seen], lse[first + i]);
    }
}

/// `dst = scale * lhs @ rhs` (or `dst += ...` when accumulating) for `[m, n, k]`, each matrix a
/// pointer with its row and column strides (`dst`: row stride, and whether to add to it). One
/// thread: heads run in parallel.
unsafe fn product(
    [m, n, k]: [usize; 3],
    (dst, dst_rs, accumulate): (*mut f32, isize, bool),
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
