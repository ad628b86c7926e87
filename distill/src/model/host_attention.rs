//! Causal softmax attention computed on the host, for the CPU backend outside autodiff (evaluation,
//! generation, calibration, a KD teacher).
//!
//! The same blocks as [`super::causal_attention`] (queries in blocks, each against only the keys it
//! can see), fused: per head, one product for the scores, the mask, a softmax with the vectorised
//! exponential of [`crate::rows`] and one product with the values, heads in parallel. burn-flex
//! runs every element-wise operation on one thread and allocates each intermediate, so the
//! tensor-op version spent 42 ms of a SmolLM2 layer's 120 ms (window 512, 2 threads) in attention.
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

/// Sizes of one head's problem.
#[derive(Clone, Copy)]
struct Head {
    /// Queries, their first position, keys, key and value widths.
    t: usize,
    start: usize,
    tk: usize,
    d: usize,
    dv: usize,
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
    let [b, g, r, t, d] = q.dims();
    let [_, _, tk, dv] = v.dims();
    let device = q.device();
    let (q, k, v) = (host_f32(q), host_f32(k), host_f32(v));
    let dims = Head {
        t,
        start,
        tk,
        d,
        dv,
    };
    let mut out = vec![0f32; b * g * r * t * dv];
    out.par_chunks_mut((t * dv).max(1))
        .enumerate()
        .for_each_init(Vec::new, |scores, (head, out)| {
            let kv = head / r;
            attend_head(
                &q[head * t * d..][..t * d],
                &k[kv * tk * d..][..tk * d],
                &v[kv * tk * dv..][..tk * dv],
                out,
                dims,
                rule,
                scores,
            )
        });
    Tensor::from_data(TensorData::new(out, [b, g, r, t, dv]), &device)
}

/// One head: `q` `[t, d]`, `k` `[tk, d]`, `v` `[tk, dv]`, `out` `[t, dv]` (row-major).
fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: Head,
    rule: ScoreRule,
    scores: &mut Vec<f32>,
) {
    for first in (0..s.t).step_by(BLOCK) {
        let n = BLOCK.min(s.t - first);
        let keys = visible_keys(s.start + first, n, rule.window);
        let m = keys.len();
        debug_assert!(keys.end <= s.tk, "keys beyond the cache");
        scores.clear();
        scores.resize(n * m, 0.0);
        // scores = q[first..first + n] @ k[keys]^T * scale
        // SAFETY: every matrix lies inside its slice: q rows first..first + n of width d, k rows
        // `keys` (within tk: the caller's positions end at tk), scores n x m.
        unsafe {
            product(
                [n, m, s.d],
                (scores.as_mut_ptr(), m as isize, false),
                (q[first * s.d..].as_ptr(), s.d as isize, 1),
                (k[keys.start * s.d..].as_ptr(), 1, s.d as isize),
                rule.scale as f32,
            );
        }
        for (i, row) in scores.chunks_mut(m).enumerate() {
            let p = s.start + first + i;
            let seen = visible_keys(p, 1, rule.window);
            let seen = seen.start - keys.start..seen.end - keys.start;
            softmax_visible(row, seen, rule.softcap);
        }
        // out[first..first + n] = scores @ v[keys]
        // SAFETY: v rows `keys` of width dv, out rows first..first + n of width dv.
        unsafe {
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

/// Softmax of the scores in `seen` (after the soft-cap), zero elsewhere.
fn softmax_visible(row: &mut [f32], seen: std::ops::Range<usize>, softcap: Option<f64>) {
    row[..seen.start].fill(0.0);
    row[seen.end..].fill(0.0);
    let row = &mut row[seen];
    if let Some(c) = softcap {
        let c = c as f32;
        row.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
    }
    let sum = rows::exp_shifted(row, rows::max(row));
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `dst = scale * lhs @ rhs` for `[m, n, k]`, each matrix a pointer with its row and column strides
/// (`dst`: row stride, and whether to add to it). One thread: heads run in parallel.
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
