//! Softmax reductions over rows of logits on the host: the log-sum-exp of each row of the
//! vocabulary, for perplexity and the fused training losses (`heal::loss`).
//!
//! The exponential is a polynomial in plain multiplies and adds (Cephes' `expf`, about 2 ulp), in
//! lanes that the compiler vectorises; [`exp_shifted`] picks AVX-512 or AVX2 at run time and the
//! portable build elsewhere. No fused multiply-add is used, so every path gives the same bits. A
//! scalar libm `expf` per logit was 5% of a training step and most of an evaluation's loss.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The values of `x` on the host, as f32 (no copy on the CPU backend when `x` is not shared).
pub fn host_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("float tensor data converts to f32")
}

/// Lanes of the vectorised loops (one AVX-512 register of f32).
const LANES: usize = 16;

/// `exp(x)` for one value, the arithmetic of [`exp_shifted`]. Accurate on `[-87, 88]`; below, it
/// returns about `1e-38` instead of a subnormal or 0; above, `exp(88)`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let r = x * LOG2E + ROUND;
    let n = r - ROUND;
    let k = r.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let x = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * x + 1.398_199_9e-3;
    p = p * x + 8.333_452e-3;
    p = p * x + 4.166_579_6e-2;
    p = p * x + 1.666_666_5e-1;
    p = p * x + 0.5;
    let y = p * x * x + x + 1.0;
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// Writes `exp(x - shift)` of each `x` of `row` over it and returns their sum (accumulated in f32
/// lanes per block of 256 and in f64 across blocks: the same value on every machine and thread count).
pub fn exp_shifted(row: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { exp_shifted_avx512(row, shift) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { exp_shifted_avx2(row, shift) };
        }
    }
    exp_shifted_portable(row, shift)
}

/// `ln(sum(exp(x)))` of `row` (max-shifted), leaving `row` unchanged.
pub fn log_sum_exp(row: &[f32], scratch: &mut Vec<f32>) -> f64 {
    let m = max(row);
    scratch.clear();
    scratch.extend_from_slice(row);
    exp_shifted(scratch, m).ln() + m as f64
}

/// The largest value of `row` (`-inf` when empty). A NaN is skipped here but still reaches the
/// result of [`exp_shifted`], whose exponential keeps it.
pub fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let m = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
    chunks
        .remainder()
        .iter()
        .fold(m, |m, &x| if x > m { x } else { m })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], shift: f32) -> f64 {
    exp_shifted_portable(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(row: &mut [f32], shift: f32) -> f64 {
    exp_shifted_portable(row, shift)
}

#[inline(always)]
fn exp_shifted_portable(row: &mut [f32], shift: f32) -> f64 {
    let mut total = 0f64;
    for block in row.chunks_mut(256) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *x = exp(*x - shift);
                *l += *x;
            }
        }
        let mut sum = 0f64;
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            sum += *x as f64;
        }
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + sum;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_3_ulp_of_libm_on_its_range() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.000_37;
        }
        assert!(worst <= 3, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let row: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 20.0)
            .collect();
        let m = max(&row);
        let (mut a, mut b) = (row.clone(), row.clone());
        let sa = exp_shifted(&mut a, m);
        let sb = exp_shifted_portable(&mut b, m);
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let exact: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!((sa - exact).abs() < 1e-6 * exact, "{sa} vs {exact}");
    }

    #[test]
    fn max_sees_the_remainder_and_nan_reaches_the_sum() {
        let mut row = vec![1.0f32; 35];
        row[34] = 5.0;
        assert_eq!(max(&row), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        row[3] = f32::NAN;
        assert!(exp_shifted(&mut row, 5.0).is_nan());
    }
}
