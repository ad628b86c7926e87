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
//! Heads are read where they lie ([`Order`]): heads first (`[B, n, T, e]`, the KV cache's layout)
//! or tokens first (`[B, T, n, e]`, the projections' output), so that a forward without a cache
//! needs no transposes: RoPE is applied in place on the projections ([`rope`]) and the output is
//! written in `[B, T, H, dv]`, the input of `o_proj`.
//!
//! The sums differ from the tensor ops in rounding only (f64 row sums here, f32 there); a KD teacher
//! and an identical student both run this code, so their logits are bitwise equal.
use super::{visible_keys, ScoreRule};
use crate::rows;
use rayon::prelude::*;

/// Fewer queries than this (decoding) stay on tensor operations: this path first copies every cached
/// key and value out of the cache's buffer, which cost more than it saved when decoding one token
/// (SmolLM2 after a 569-token prompt, 2 threads: 12.4 against 14.5 tokens/s; prefill 4.15 against
/// 4.9 s).
pub(crate) const MIN_QUERIES: usize = 16;

/// Queries per block: the scores of a block (`BLOCK` x visible keys) stay in the L2 cache.
const BLOCK: usize = 64;

/// How the heads of a buffer lie: `[B, n, T, e]` or `[B, T, n, e]` (row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    HeadsFirst,
    TokensFirst,
}

impl Order {
    /// Offset and row stride of head `h` (of `n` per sequence) of sequence `seq`, with `rows`
    /// rows of `width` numbers.
    fn place(self, seq: usize, h: usize, n: usize, rows: usize, width: usize) -> (usize, usize) {
        match self {
            Order::HeadsFirst => ((seq * n + h) * rows * width, width),
            Order::TokensFirst => (seq * rows * n * width + h * width, n * width),
        }
    }
}

/// Sizes: sequences, key heads, query heads per key head, queries and their first position, keys,
/// key and value widths.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub b: usize,
    pub g: usize,
    pub r: usize,
    pub t: usize,
    pub start: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    fn query_heads(&self) -> usize {
        self.b * self.g * self.r
    }
}

/// A matrix inside a buffer: its first element and its row stride (columns are contiguous).
#[derive(Clone, Copy)]
struct Mat<P> {
    ptr: P,
    rs: usize,
}

// SAFETY: a `Mat` is a view that the code below reads, or writes in rows no other task writes.
unsafe impl<P> Send for Mat<P> {}
unsafe impl<P> Sync for Mat<P> {}

impl Mat<*const f32> {
    /// Row `i`, `n` numbers.
    unsafe fn row(&self, i: usize, n: usize) -> &[f32] {
        std::slice::from_raw_parts(self.ptr.add(i * self.rs), n)
    }
}

/// Query head `i`'s queries and its key head's keys and values.
struct HeadView {
    q: Mat<*const f32>,
    k: Mat<*const f32>,
    v: Mat<*const f32>,
}

/// Queries, keys and values on the host in `order` (queries `[B, G * R, T, d]` or
/// `[B, T, G * R, d]`, keys and values alike with `G` heads), with their sizes.
#[derive(Debug)]
pub(super) struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub dims: Dims,
    pub order: Order,
}

impl Inputs {
    /// Where query head `i` (of all sequences) lies in a buffer of `width` numbers per row.
    fn query_place(&self, i: usize, width: usize) -> (usize, usize) {
        let Dims { g, r, t, .. } = self.dims;
        self.order.place(i / (g * r), i % (g * r), g * r, t, width)
    }

    /// Where key head `j` (of all sequences) lies in a buffer of `width` numbers per row.
    fn key_place(&self, j: usize, width: usize) -> (usize, usize) {
        let Dims { g, tk, .. } = self.dims;
        self.order.place(j / g, j % g, g, tk, width)
    }

    /// Query head `i`'s queries and its key head's keys and values.
    fn head(&self, i: usize) -> HeadView {
        let Dims { r, d, dv, .. } = self.dims;
        let view = |buf: &[f32], (at, rs): (usize, usize)| Mat {
            ptr: buf[at..].as_ptr(),
            rs,
        };
        HeadView {
            q: view(&self.q, self.query_place(i, d)),
            k: view(&self.k, self.key_place(i / r, d)),
            v: view(&self.v, self.key_place(i / r, dv)),
        }
    }

    /// A writable view of query head `i` in `buf` (laid out like the queries, `width` per row).
    fn query_mat(&self, buf: &mut [f32], i: usize, width: usize) -> Mat<*mut f32> {
        let (at, rs) = self.query_place(i, width);
        Mat {
            ptr: buf[at..].as_mut_ptr(),
            rs,
        }
    }

    /// The output (laid out like the queries, `dv` per row) and the log-sum-exp of each query's
    /// scores (`[B, G * R, T]`).
    pub fn forward(&self, rule: ScoreRule) -> (Vec<f32>, Vec<f32>) {
        let Dims { t, dv, .. } = self.dims;
        let heads = self.dims.query_heads();
        let mut out = vec![0f32; heads * t * dv];
        let mut lse = vec![0f32; heads * t];
        let outs: Vec<Mat<*mut f32>> = (0..heads)
            .map(|i| self.query_mat(&mut out, i, dv))
            .collect();
        lse.par_chunks_mut(t.max(1))
            .zip(outs.into_par_iter())
            .enumerate()
            .for_each_init(Vec::new, |scores, (i, (lse, out))| {
                // SAFETY: head i's views lie inside the buffers (query_place, key_place), and
                // its output rows are written by this task alone.
                unsafe { attend_head(&self.head(i), (out, lse), self.dims, rule, scores) }
            });
        (out, lse)
    }

    /// Gradients of the queries, keys and values (laid out as they are) from the gradient of the
    /// output `d_out`, given [`Inputs::forward`]'s output and log-sum-exp. Each query head computes
    /// its own key and value gradients; a key head's are the sum over its group, in order, so the
    /// result does not depend on the threads.
    pub fn backward(
        &self,
        rule: ScoreRule,
        out: &[f32],
        lse: &[f32],
        d_out: &[f32],
    ) -> [Vec<f32>; 3] {
        let Dims { t, tk, d, dv, .. } = self.dims;
        let heads = self.dims.query_heads();
        let mut dq = vec![0f32; self.q.len()];
        let mut dk_heads = vec![0f32; heads * tk * d];
        let mut dv_heads = vec![0f32; heads * tk * dv];
        let dqs: Vec<Mat<*mut f32>> = (0..heads).map(|i| self.query_mat(&mut dq, i, d)).collect();
        dqs.into_par_iter()
            .zip(dk_heads.par_chunks_mut((tk * d).max(1)))
            .zip(dv_heads.par_chunks_mut((tk * dv).max(1)))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (i, ((dq, dk), dv_))| {
                let at = |buf: &[f32]| Mat {
                    ptr: buf[self.query_place(i, dv).0..].as_ptr(),
                    rs: self.query_place(i, dv).1,
                };
                let saved = Saved {
                    out: at(out),
                    d_out: at(d_out),
                    lse: &lse[i * t..(i + 1) * t],
                };
                let dk = Mat {
                    ptr: dk.as_mut_ptr(),
                    rs: d,
                };
                let dv_ = Mat {
                    ptr: dv_.as_mut_ptr(),
                    rs: dv,
                };
                // SAFETY: as in `forward`; dq rows of head i are written by this task alone, dk
                // and dv are this head's own buffers.
                unsafe {
                    head_backward(
                        &self.head(i),
                        saved,
                        [dq, dk, dv_],
                        self.dims,
                        rule,
                        scratch,
                    )
                }
            });
        let dk = self.sum_groups(&dk_heads, d, self.k.len());
        let dv = self.sum_groups(&dv_heads, dv, self.v.len());
        [dq, dk, dv]
    }

    /// Key-head gradients from per-query-head ones (`[B * G * R, Tk, width]`): the sum over each
    /// group, laid out like the keys.
    fn sum_groups(&self, per_head: &[f32], width: usize, len: usize) -> Vec<f32> {
        let Dims { r, tk, .. } = self.dims;
        let size = tk * width;
        let mut sum = vec![0f32; len];
        let kv_heads = self.dims.b * self.dims.g;
        let dsts: Vec<Mat<*mut f32>> = (0..kv_heads)
            .map(|j| {
                let (at, rs) = self.key_place(j, width);
                Mat {
                    ptr: sum[at..].as_mut_ptr(),
                    rs,
                }
            })
            .collect();
        dsts.into_par_iter().enumerate().for_each(|(j, dst)| {
            for i in 0..tk {
                // SAFETY: row i of key head j lies inside `sum` and only this task writes it.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.rs), width) };
                for q in 0..r {
                    let part = &per_head[(j * r + q) * size + i * width..][..width];
                    row.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                }
            }
        });
        sum
    }
}

/// One query head (see [`Inputs::head`]): writes its output rows `out` (`t` x `dv`) and the
/// log-sum-exp of each query's scores, `lse` `[t]`.
///
/// # Safety
/// The views must hold `t` query rows of `d`, `tk` key rows of `d` and value rows of `dv`, and
/// `out` `t` rows of `dv` that nothing else touches meanwhile.
unsafe fn attend_head(
    h: &HeadView,
    (out, lse): (Mat<*mut f32>, &mut [f32]),
    s: Dims,
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
        // scores = q[first..first + n] @ k[keys]^T * scale
        product(
            [n, m, s.d],
            (scores.as_mut_ptr(), m, false),
            (h.q.ptr.add(first * h.q.rs), h.q.rs, 1),
            (h.k.ptr.add(keys.start * h.k.rs), 1, h.k.rs),
            rule.scale as f32,
        );
        for (i, row) in scores.chunks_mut(m).enumerate() {
            let seen = seen_in_block(s.start + first + i, &keys, rule.window);
            lse[first + i] = softmax_visible(row, seen, rule.softcap);
        }
        // out[first..first + n] = scores @ v[keys]
        product(
            [n, s.dv, m],
            (out.ptr.add(first * out.rs), out.rs, false),
            (scores.as_ptr(), m, 1),
            (h.v.ptr.add(keys.start * h.v.rs), h.v.rs, 1),
            1.0,
        );
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

/// What the backward pass of one head reads: the forward's output rows, the output's gradient
/// rows (both `t` x `dv`, laid out like the output) and the log-sum-exps `[t]`.
struct Saved<'a> {
    out: Mat<*const f32>,
    d_out: Mat<*const f32>,
    lse: &'a [f32],
}

/// Scratch rows of one block in the backward pass: the weights (then the scores' gradient), the
/// weights' gradient and the soft-cap's derivative.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    cap: Vec<f32>,
}

/// The backward pass of one head (see [`attend_head`]): writes `dq` (`t` x `d`, rows where the
/// queries lie) and this head's parts of the key and value gradients, `dk` `[tk, d]` and `dv`
/// `[tk, dv]`. Per block, with the weights `P = exp(S - lse)` recomputed: `dV += P^T dO`,
/// `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = scale dS K`, `dK += scale dS^T Q`
/// (`dS` times `1 - tanh^2` under a soft-cap).
///
/// # Safety
/// As [`attend_head`]; `dq`, `dk` and `dv` are written by this call alone.
unsafe fn head_backward(
    h: &HeadView,
    saved: Saved<'_>,
    [dq, dk, dv]: [Mat<*mut f32>; 3],
    s: Dims,
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
        let d_out = saved.d_out.ptr.add(first * saved.d_out.rs);
        let q = h.q.ptr.add(first * h.q.rs);
        // p = q[first..first + n] @ k[keys]^T * scale, then the weights
        product(
            [n, m, s.d],
            (x.p.as_mut_ptr(), m, false),
            (q, h.q.rs, 1),
            (h.k.ptr.add(keys.start * h.k.rs), 1, h.k.rs),
            scale,
        );
        recompute_weights(x, n, m, (first, &keys), s, rule, saved.lse);
        // dv[keys] += p^T @ d_out
        product(
            [m, s.dv, n],
            (dv.ptr.add(keys.start * dv.rs), dv.rs, true),
            (x.p.as_ptr(), 1, m),
            (d_out, saved.d_out.rs, 1),
            1.0,
        );
        // dp = d_out @ v[keys]^T
        product(
            [n, m, s.dv],
            (x.dp.as_mut_ptr(), m, false),
            (d_out, saved.d_out.rs, 1),
            (h.v.ptr.add(keys.start * h.v.rs), 1, h.v.rs),
            1.0,
        );
        // p becomes dS = p * (dp - rowsum(d_out * out)), times the soft-cap's derivative.
        for (i, (p, dp)) in x.p.chunks_mut(m).zip(x.dp.chunks(m)).enumerate() {
            let o = saved.out.row(first + i, s.dv);
            let g = saved.d_out.row(first + i, s.dv);
            let delta: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
            p.iter_mut().zip(dp).for_each(|(p, dp)| *p *= dp - delta);
            if rule.softcap.is_some() {
                let cap = &x.cap[i * m..][..m];
                p.iter_mut().zip(cap).for_each(|(p, c)| *p *= c);
            }
        }
        // dq[first..first + n] = scale * dS @ k[keys]
        product(
            [n, s.d, m],
            (dq.ptr.add(first * dq.rs), dq.rs, false),
            (x.p.as_ptr(), m, 1),
            (h.k.ptr.add(keys.start * h.k.rs), h.k.rs, 1),
            scale,
        );
        // dk[keys] += scale * dS^T @ q[first..first + n]
        product(
            [m, s.d, n],
            (dk.ptr.add(keys.start * dk.rs), dk.rs, true),
            (x.p.as_ptr(), 1, m),
            (q, h.q.rs, 1),
            scale,
        );
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
    s: Dims,
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

/// Rotary position embedding in place on `x` `[B, T, n, d]` (tokens first), with the tables
/// `cos` and `sin` `[T, d]`: the arithmetic of [`super::apply_rope`], `x * cos + rotate(x) * sin`
/// with `rotate(x) = [-x2, x1]`, so the values are the same bits. With `transpose`, the
/// transposed map instead (the backward pass: `dx = dy * cos + rotate^T(dy * sin)`,
/// `rotate^T(z) = [z2, -z1]`).
pub(super) fn rope(
    x: &mut [f32],
    (cos, sin): (&[f32], &[f32]),
    [t, n, d]: [usize; 3],
    transpose: bool,
) {
    let half = d / 2;
    x.par_chunks_mut((t * n * d).max(1)).for_each(|seq| {
        for (p, token) in seq.chunks_mut((n * d).max(1)).enumerate() {
            let (c, s) = (&cos[p * d..][..d], &sin[p * d..][..d]);
            for head in token.chunks_mut(d.max(1)) {
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    let (a, b) = match transpose {
                        // x1 cos + (-x2) sin, x2 cos + x1 sin
                        false => (x1 * c[i] + -x2 * s[i], x2 * c[i + half] + x1 * s[i + half]),
                        true => (x1 * c[i] + x2 * s[i + half], x2 * c[i + half] - x1 * s[i]),
                    };
                    head[i] = a;
                    head[i + half] = b;
                }
            }
        }
    });
}

/// `dst = scale * lhs @ rhs` (or `dst += ...` when accumulating) for `[m, n, k]`, each matrix a
/// pointer with its row and column strides (`dst`: row stride, and whether to add to it). One
/// thread: heads run in parallel.
///
/// # Safety
/// Every matrix must lie inside its allocation; `dst` must not overlap the others.
unsafe fn product(
    [m, n, k]: [usize; 3],
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
