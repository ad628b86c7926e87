//! Matrix-vector products `x W^T` (a few rows of `x`, decoding) on the host for the CPU backend.
//! Decoding reads every weight once per token, so its speed is the memory bandwidth the products
//! reach. flex's GEMM ran them at about half of what two cores can stream (15 against 27 GB/s
//! measured with `torch.mv` on the same machine), and each split of the outputs across threads
//! was a separate GEMM call. Here each thread streams its block of `W`'s rows once, taking the dot
//! product with every row of `x` while the weight row is in L1; the dot product vectorises
//! (AVX-512 or AVX, chosen at run time) with the same order of additions on every path, so the
//! result does not depend on the CPU.
use crate::backend::{cast, cpu_primitive, same, Cpu};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

/// Lanes of the dot product's accumulator (one AVX-512 register of f32).
const LANES: usize = 16;

/// Outputs below which one thread computes the whole product (the split costs more than it saves).
const MIN_SPLIT: usize = 256;

type Pair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// `x W^T` for `x` `[rows, in]` and `W` `[out, in]` (both contiguous f32 on the CPU backend,
/// `in > 0`); otherwise the inputs back.
pub(super) fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Pair<B>> {
    let (x, w) = cast::<_, Pair<Cpu>>((x, w))?;
    let ([rows, k], [n, wk]) = (x.dims(), w.dims());
    let (xp, wp) = (
        x.clone().into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
    );
    let (Some(xs), Some(ws), true) = (xp.as_slice::<f32>(), wp.as_slice::<f32>(), k == wk && k > 0)
    else {
        return Err(same((x, w)));
    };
    let out = gemv(xs, rows, ws, k, rayon::current_num_threads());
    let y = cpu_primitive(out, [rows, n].into());
    Ok(same(Tensor::<Cpu, 2>::from_primitive(
        TensorPrimitive::Float(y),
    )))
}

/// `x W^T` `[rows, n]` for row-major `x` `[rows, k]` and `W` `[n, k]`, over `threads` blocks of
/// `W`'s rows.
pub(crate) fn gemv(x: &[f32], rows: usize, w: &[f32], k: usize, threads: usize) -> Vec<f32> {
    let n = w.len().checked_div(k).unwrap_or(0);
    // Output by weight row ([n, rows]): each block writes one contiguous part.
    let mut by_weight = vec![0f32; n * rows];
    if k == 0 || rows == 0 {
        return by_weight;
    }
    let block = match n >= MIN_SPLIT * threads {
        true => n.div_ceil(threads),
        false => n,
    };
    by_weight
        .par_chunks_mut(block * rows)
        .zip(w.par_chunks(block * k))
        .for_each(|(out, w)| rows_times_block(x, rows, w, k, out));
    if rows == 1 {
        return by_weight;
    }
    let mut out = vec![0f32; n * rows];
    for (j, col) in by_weight.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * n + j] = v;
        }
    }
    out
}

/// The dot products of every row of `x` with every row of the block `w`, into `out`
/// (`[w rows, x rows]`), with the widest vectors the CPU has.
fn rows_times_block(x: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { rows_times_block_with(x, rows, w, k, out, |a, b| dot_avx512(a, b)) };
        }
        if std::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX, checked just above.
            return unsafe { rows_times_block_with(x, rows, w, k, out, |a, b| dot_avx(a, b)) };
        }
    }
    rows_times_block_with(x, rows, w, k, out, dot_portable)
}

#[inline(always)]
fn rows_times_block_with(
    x: &[f32],
    rows: usize,
    w: &[f32],
    k: usize,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        for (xr, o) in x.chunks_exact(k).zip(o.iter_mut()) {
            *o = dot(xr, wr);
        }
    }
}

/// The end of every dot product: the 16 lane sums added pairwise, then the remainder's products
/// in order. With the lane sums each path computes alike, every path gives the same bits.
#[inline(always)]
fn finish(lanes: [f32; LANES], a: &[f32], b: &[f32]) -> f32 {
    let half: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let quarter: [f32; 4] = std::array::from_fn(|i| half[i] + half[i + 4]);
    let sum = (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
    a.iter().zip(b).fold(sum, |s, (p, q)| s + p * q)
}

/// `sum(a * b)`: lane `l` sums the products at `l`, `l + 16`, `l + 32`, ... (multiply, then add:
/// no fused multiply-add, so every instruction set rounds alike), then [`finish`].
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let ((ca, ta), (cb, tb)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    for (p, q) in ca.iter().zip(cb) {
        for l in 0..LANES {
            lanes[l] += p[l] * q[l];
        }
    }
    finish(lanes, ta, tb)
}

/// [`dot_portable`] in one AVX-512 register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let ((ca, ta), (cb, tb)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let mut acc = _mm512_setzero_ps();
    for (p, q) in ca.iter().zip(cb) {
        // SAFETY: each chunk holds 16 f32; unaligned loads.
        let (p, q) = unsafe { (_mm512_loadu_ps(p.as_ptr()), _mm512_loadu_ps(q.as_ptr())) };
        acc = _mm512_add_ps(acc, _mm512_mul_ps(p, q));
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 16 f32.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
    finish(lanes, ta, tb)
}

/// [`dot_portable`] in two AVX registers (lanes 0-7 and 8-15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let ((ca, ta), (cb, tb)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (p, q) in ca.iter().zip(cb) {
        // SAFETY: each chunk holds 16 f32; unaligned loads of its two halves.
        unsafe {
            let (p0, q0) = (_mm256_loadu_ps(p.as_ptr()), _mm256_loadu_ps(q.as_ptr()));
            let (p1, q1) = (
                _mm256_loadu_ps(p[8..].as_ptr()),
                _mm256_loadu_ps(q[8..].as_ptr()),
            );
            lo = _mm256_add_ps(lo, _mm256_mul_ps(p0, q0));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(p1, q1));
        }
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 16 f32.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes[8..].as_mut_ptr(), hi);
    }
    finish(lanes, ta, tb)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x W^T` in f64, the reference.
    fn reference(x: &[f32], rows: usize, w: &[f32], k: usize) -> Vec<f64> {
        let n = w.len() / k;
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // A fixed pseudo-random sequence in [-1, 1).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn gemv_matches_an_f64_reference_for_every_row_count_and_split() {
        // k not a multiple of LANES (a tail), n not a multiple of the block (a short last block).
        for (rows, k, n, threads) in [
            (1, 576, 1537, 2),
            (3, 37, 700, 3),
            (4, 16, 5, 2),
            (2, 1, 9, 1),
        ] {
            let (x, w) = (values(rows * k, 1), values(n * k, 2));
            let got = gemv(&x, rows, &w, k, threads);
            let want = reference(&x, rows, &w, k);
            assert_eq!(got.len(), want.len());
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-6 * (k as f64).sqrt().max(1.0);
                assert!(
                    (g as f64 - r).abs() <= tol,
                    "rows {rows} k {k} n {n}: [{i}] {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn gemv_does_not_depend_on_the_split_and_equals_the_tensor_product() {
        let (rows, k, n) = (2, 576, 1536);
        let (x, w) = (values(rows * k, 3), values(n * k, 4));
        let one = gemv(&x, rows, &w, k, 1);
        assert_eq!(one, gemv(&x, rows, &w, k, 4), "split changed the bits");
        let mut portable = vec![0f32; n * rows];
        rows_times_block_with(&x, rows, &w, k, &mut portable, dot_portable);
        let portable: Vec<f32> = (0..rows * n)
            .map(|i| portable[(i % n) * rows + i / n])
            .collect();
        assert_eq!(
            one, portable,
            "the vector path's bits differ from the portable one's"
        );
        let device = Default::default();
        let xt = Tensor::<Cpu, 2>::from_data(burn::tensor::TensorData::new(x, [rows, k]), &device);
        let wt = Tensor::<Cpu, 2>::from_data(burn::tensor::TensorData::new(w, [n, k]), &device);
        let host = crate::rows::host_f32(product(xt.clone(), wt.clone()).expect("CPU f32"));
        assert_eq!(host, one);
        let flex = crate::rows::host_f32(xt.matmul(wt.transpose()));
        let diff = crate::model::attention_tests::relative_diff(&host, &flex);
        assert!(diff <= 1e-6, "host vs flex GEMM: relative |diff| {diff}");
    }
}
