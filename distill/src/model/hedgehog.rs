//! Hedgehog linear attention (arXiv 2402.04347) and the LoLCATs sliding-window hybrid (arXiv
//! 2410.10254), as HazyResearch/lolcats computes them.
//!
//! Per query head, trainable feature maps for queries and keys (after RoPE, keys and values
//! repeated to the query heads): `phi(x) = [softmax(x W), softmax(-x W)]`, `W` `[head_dim, f]`,
//! clamped below at 1e-12. Query `i` attends to key `j <= i` with weight
//!
//! - `sigmoid(w_h) * exp(q_i.k_j / sqrt(d) - m_i)` when `j` is among the last `window` keys
//!   (`i - window < j`), `m_i` the largest such score (the reference's max, not detached);
//! - `phi(q_i).phi(k_j)` for older keys (`j <= i - window`);
//!
//! divided by the row sum. Without a window (`window = 0`) it is plain Hedgehog linear attention.
//!
//! One algorithm serves training, evaluation and generation: queries go in chunks of [`CHUNK`];
//! keys older than every query of a chunk's window live in a state `S = sum phi(k) v^T`,
//! `z = sum phi(k)`, the others in a quadratic block. Generation is the same with one query per
//! call: the cache holds the state and the last `window - 1` keys and values, so memory per token
//! is constant.
use super::{softmax, LayerCache, VarBuilder};
use crate::error::Result;
use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

/// Queries per block of the chunked form.
pub const CHUNK: usize = 256;

/// Lower clamp of the feature maps (the reference's `eps`).
const PHI_EPS: f64 = 1e-12;

/// A Hedgehog feature map, `weight` `[heads, head_dim, f]` (LoLCATs' `hdf` layout).
#[derive(Module, Debug)]
pub struct FeatureMap<B: Backend> {
    pub weight: Param<Tensor<B, 3>>,
}

impl<B: Backend> FeatureMap<B> {
    /// `[B, H, T, d]` -> `[B, H, T, 2f]`: `[softmax(x W), softmax(-x W)]` per head.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, _, d] = x.dims();
        let f = self.weight.dims()[2];
        let w = self.weight.val().unsqueeze_dim::<4>(0).expand([b, h, d, f]);
        let xw = x.matmul(w);
        Tensor::cat(vec![softmax(xw.clone(), 3), softmax(xw.neg(), 3)], 3).clamp_min(PHI_EPS)
    }
}

/// The trainable part of a Hedgehog attention: feature maps for queries and keys and, for the
/// hybrid, one mixing logit per head.
#[derive(Module, Debug)]
pub struct Hedgehog<B: Backend> {
    pub feature_map_q: FeatureMap<B>,
    pub feature_map_k: FeatureMap<B>,
    /// `[heads]`; the softmax terms are weighted by `sigmoid` of these (window > 0 only).
    pub window_factors: Option<Param<Tensor<B, 1>>>,
    /// Keys seen by exact softmax, the query's own included; 0: linear attention only.
    pub window: usize,
}

/// Linear-attention state `(S [B, H, F, dv], z [B, H, 1, F])` of the keys folded in.
pub type LinearState<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// Queries and keys of one block: their positions and feature-mapped forms.
struct Block<B: Backend> {
    q: Tensor<B, 4>,
    fq: Tensor<B, 4>,
    k: Tensor<B, 4>,
    fk: Tensor<B, 4>,
    v: Tensor<B, 4>,
    /// Position of the first query and the first key.
    q_start: usize,
    k_start: usize,
}

impl<B: Backend> Hedgehog<B> {
    /// Loads `feature_map_q`, `feature_map_k` and (window > 0) `window_factors` under `vb`.
    pub fn load(vb: &mut VarBuilder<'_, '_, B>, window: usize) -> Result<Self> {
        Ok(Hedgehog {
            feature_map_q: FeatureMap {
                weight: vb.pp("feature_map_q").param("weight")?,
            },
            feature_map_k: FeatureMap {
                weight: vb.pp("feature_map_k").param("weight")?,
            },
            window_factors: match window {
                0 => None,
                _ => Some(vb.param("window_factors")?),
            },
            window,
        })
    }

    /// Attention of queries `q` `[B, H, T, d]` at positions `start..start + T` over keys `k` and
    /// values `v` `[B, H, n, *]` (already repeated to the query heads) at positions
    /// `start + T - n..start + T`, with `state` holding every older key. Returns the per-head
    /// outputs `[B, H, T, dv]` and, when `keep` is set, the state extended for the next position
    /// together with the position of the first key still needed.
    pub fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        start: usize,
        state: Option<LinearState<B>>,
        keep: bool,
    ) -> (Tensor<B, 4>, Option<LinearState<B>>, usize) {
        let t = q.dims()[2];
        let p0 = start + t - k.dims()[2];
        let fq = self.feature_map_q.forward(q.clone());
        let fk = self.feature_map_k.forward(k.clone());
        let (mut state, mut folded) = (state, p0);
        let mut ys = Vec::with_capacity(t.div_ceil(CHUNK));
        for s in (start..start + t).step_by(CHUNK) {
            let e = (s + CHUNK).min(start + t);
            let cut = self.first_kept(s).max(folded);
            state = fold(state, &fk, &v, folded - p0, cut - p0);
            folded = cut;
            let block = Block {
                q: q.clone().narrow(2, s - start, e - s),
                fq: fq.clone().narrow(2, s - start, e - s),
                k: k.clone().narrow(2, cut - p0, e - cut),
                fk: fk.clone().narrow(2, cut - p0, e - cut),
                v: v.clone().narrow(2, cut - p0, e - cut),
                q_start: s,
                k_start: cut,
            };
            ys.push(self.block(block, state.as_ref()));
        }
        if keep {
            let cut = self.first_kept(start + t).max(folded);
            state = fold(state, &fk, &v, folded - p0, cut - p0);
            folded = cut;
        }
        (Tensor::cat(ys, 2), state, folded)
    }

    /// The first key position that a query at `pos` (or later) may see other than through the
    /// state: the oldest key of its window, or `pos` itself without a window.
    fn first_kept(&self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.window.max(1))
    }

    /// Outputs of one block of queries: the quadratic terms over the block's keys plus the
    /// state's linear terms, normalised.
    fn block(&self, blk: Block<B>, state: Option<&LinearState<B>>) -> Tensor<B, 4> {
        let [b, h, tq, _] = blk.q.dims();
        let fq = blk.fq.clone();
        let v = blk.v.clone();
        let a = self.weights_unnormalised(&blk);
        let mut num = a.clone().matmul(v);
        let mut den = a.sum_dim(3);
        if let Some((s, z)) = state {
            let f = z.dims()[3];
            num = num + fq.clone().matmul(s.clone());
            den = den + (fq * z.clone().expand([b, h, tq, f])).sum_dim(3);
        }
        num / den
    }

    /// `[B, H, tq, tk]`: every query's unnormalised weight of every key of the block (0 for keys
    /// it does not see).
    fn weights_unnormalised(&self, blk: &Block<B>) -> Tensor<B, 4> {
        let [b, h, tq, d] = blk.q.dims();
        let tk = blk.k.dims()[2];
        let device = blk.q.device();
        let (linear, outside) = masks(blk.q_start, tq, blk.k_start, tk, self.window);
        let linear = Tensor::<B, 2>::from_data(TensorData::new(linear, [tq, tk]), &device)
            .reshape([1, 1, tq, tk])
            .expand([b, h, tq, tk]);
        let a = blk.fq.clone().matmul(blk.fk.clone().swap_dims(2, 3)) * linear;
        let Some(factors) = &self.window_factors else {
            return a;
        };
        let outside = Tensor::<B, 2, Bool>::from_data(TensorData::new(outside, [tq, tk]), &device)
            .reshape([1, 1, tq, tk])
            .expand([b, h, tq, tk]);
        let scores = blk
            .q
            .clone()
            .matmul(blk.k.clone().swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt())
            .mask_fill(outside, -1.0e30);
        let m = scores.clone().max_dim(3);
        let wf = sigmoid(factors.val()).reshape([1, h, 1, 1]);
        a + (scores - m).exp() * wf
    }

    /// Attention weights `[B, H, T, T]` of queries and keys at positions `0..T` (tests and
    /// inspection; the forward never builds them): rows are non-negative and sum to 1.
    pub fn attention_weights(&self, q: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
        let blk = Block {
            fq: self.feature_map_q.forward(q.clone()),
            fk: self.feature_map_k.forward(k.clone()),
            v: k.clone(),
            q,
            k,
            q_start: 0,
            k_start: 0,
        };
        let a = self.weights_unnormalised(&blk);
        a.clone() / a.sum_dim(3)
    }

    /// The per-head outputs `[B, H, T, dv]` of queries at `start..`, reading and updating the
    /// layer's cache (keys/values `[B, g, n, *]` not yet repeated; `repeat` repeats them).
    pub fn attend_cached(
        &self,
        q: Tensor<B, 4>,
        kv: (Tensor<B, 4>, Tensor<B, 4>),
        start: usize,
        cache: Option<&mut LayerCache<B>>,
        repeat: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (mut k, mut v) = kv;
        let Some(c) = cache else {
            return self.attend(q, repeat(k), repeat(v), start, None, false).0;
        };
        if let Some((pk, pv)) = c.kv.take() {
            k = Tensor::cat(vec![pk, k], 2);
            v = Tensor::cat(vec![pv, v], 2);
        }
        let t = q.dims()[2];
        let n = k.dims()[2];
        let (y, state, kept) = self.attend(
            q,
            repeat(k.clone()),
            repeat(v.clone()),
            start,
            c.state.take(),
            true,
        );
        let p0 = start + t - n;
        let left = start + t - kept;
        c.kv = (left > 0).then(|| (k.narrow(2, kept - p0, left), v.narrow(2, kept - p0, left)));
        c.state = state;
        y
    }
}

/// The state with keys `from..to` (indices into `fk`, `v`) folded in.
fn fold<B: Backend>(
    state: Option<LinearState<B>>,
    fk: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    from: usize,
    to: usize,
) -> Option<LinearState<B>> {
    if to <= from {
        return state;
    }
    let fk = fk.clone().narrow(2, from, to - from);
    let v = v.clone().narrow(2, from, to - from);
    let s = fk.clone().swap_dims(2, 3).matmul(v);
    let z = fk.sum_dim(2);
    Some(match state {
        Some((s0, z0)) => (s0 + s, z0 + z),
        None => (s, z),
    })
}

/// For queries at `qs..qs + tq` and keys at `ks..ks + tk`: `(linear, outside)`, row-major
/// `[tq, tk]`: 1.0 where the key is older than the query's window (linear term), and true where
/// the key is not in the window (no softmax term).
fn masks(qs: usize, tq: usize, ks: usize, tk: usize, w: usize) -> (Vec<f32>, Vec<bool>) {
    let mut linear = vec![0f32; tq * tk];
    let mut outside = vec![true; tq * tk];
    for i in 0..tq {
        let qi = qs + i;
        for j in 0..tk {
            let kj = ks + j;
            if kj + w <= qi {
                linear[i * tk + j] = 1.0;
            } else if kj <= qi {
                outside[i * tk + j] = false;
            }
        }
    }
    (linear, outside)
}

#[cfg(test)]
mod tests {
    use super::masks;

    #[test]
    fn masks_split_causal_keys_at_the_window() {
        // Queries 2..4 over keys 0..4 with a window of 2: query 2 sees 1,2 exactly and 0 linearly.
        let (linear, outside) = masks(2, 2, 0, 4, 2);
        assert_eq!(linear, [1., 0., 0., 0., 1., 1., 0., 0.]);
        let inside: Vec<bool> = outside.iter().map(|o| !o).collect();
        assert_eq!(inside, [false, true, true, false, false, false, true, true]);
        // No window: every causal key is linear.
        let (linear, outside) = masks(0, 2, 0, 2, 0);
        assert_eq!(linear, [1., 0., 1., 1.]);
        assert!(outside.iter().all(|&o| o));
    }
}
