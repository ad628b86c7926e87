//! Quantisation to ggml block formats. Q8_0, Q4_0 and Q4_1 (32 values per block, an f16 scale
//! first) are written here, bit for bit as ggml's reference (`quantize_row_*_ref`) does; Q5_0, Q5_1
//! and the k-quants Q4_K, Q5_K, Q6_K (256 values per super-block) use candle-core's ports of ggml's
//! reference quantisers (`k_quants::GgmlType::from_float`), the same crate that reads them back.
//! The inverse is [`super::dequantize`].
use super::GgmlType;
use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, GgmlType as CandleBlock,
};
use half::f16;
use rayon::prelude::*;

/// Types [`quantize`] can produce.
pub fn is_supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K)
}

/// Quantises `values` (a whole number of 32-value blocks) to `ty`; `None` for other types or lengths.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let (block, size) = ty.block_layout();
    if !is_supported(ty) || !values.len().is_multiple_of(block) {
        return None;
    }
    let mut out = vec![0u8; values.len() / block * size];
    let f: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => candle_blocks::<BlockQ5_0>,
        GgmlType::Q5_1 => candle_blocks::<BlockQ5_1>,
        GgmlType::Q4_K => candle_blocks::<BlockQ4K>,
        GgmlType::Q5_K => candle_blocks::<BlockQ5K>,
        _ => candle_blocks::<BlockQ6K>,
    };
    out.par_chunks_mut(size * 1024)
        .zip(values.par_chunks(block * 1024))
        .for_each(|(o, x)| {
            for (ob, xb) in o.chunks_mut(size).zip(x.chunks(block)) {
                f(xb, ob);
            }
        });
    Some(out)
}

/// Quantises whole blocks of `x` with candle's block type `B` into `y` (`size_of::<B>()` bytes per
/// block, ggml's on-disk layout).
fn candle_blocks<B: CandleBlock>(x: &[f32], y: &mut [u8]) {
    let nb = x.len() / B::BLCK_SIZE;
    let size = std::mem::size_of::<B>();
    debug_assert_eq!(nb * size, y.len());
    let mut blocks: Vec<B> = Vec::with_capacity(nb);
    // SAFETY: candle's block types are `repr(C)` plain-old-data (f16/f32 scales and integer
    // arrays), valid for every bit pattern, zeros included; `blocks` has room for `nb` of them.
    unsafe {
        std::ptr::write_bytes(blocks.as_mut_ptr(), 0, nb);
        blocks.set_len(nb);
    }
    B::from_float(x, &mut blocks);
    // SAFETY: the same `nb` blocks viewed as their `nb * size` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, nb * size) };
    y.copy_from_slice(bytes);
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, v) in y[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    // The value of largest magnitude, with its sign: it maps to -8.
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

fn q4_1(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, f32::MIN);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    y[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * 0.1) + (i % 7) as f32 * 0.003)
            .collect()
    }

    /// Quantise then dequantise (with candle's ggml decoder) stays within half a quantisation step
    /// of each block.
    #[test]
    fn round_trip_within_half_a_step() {
        let x = values(32 * 70);
        for (ty, levels) in [
            (GgmlType::Q8_0, 254.0),
            // The largest magnitude maps to -8, the other sign clips at 7/8 of it: a full step.
            (GgmlType::Q4_0, 8.0),
            (GgmlType::Q4_1, 15.0),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len() as u64, ty.byte_len(x.len() as u64).unwrap());
            let back = super::super::dequantize(ty, &q, x.len()).unwrap();
            for (b, (xb, yb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let lo = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
                let hi = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
                let amax = lo.abs().max(hi.abs());
                // Q8_0/Q4_0 are symmetric around 0, Q4_1 spans [min, max]; the f16 scale (and
                // Q4_1's f16 minimum) add up to 2^-11 relative, times the largest code.
                let span = if ty == GgmlType::Q4_1 {
                    hi - lo
                } else {
                    2.0 * amax
                };
                let tol = span / levels * 0.5 + amax / 1024.0 + 1e-6;
                for (a, c) in xb.iter().zip(yb) {
                    assert!(
                        (a - c).abs() <= tol,
                        "{ty} block {b}: {a} vs {c} (tol {tol})"
                    );
                }
            }
        }
        assert!(quantize(GgmlType::Q8_0, &x[..31]).is_none());
        assert!(quantize(GgmlType::Q4_K, &x[..32 * 7]).is_none());
        assert!(quantize(GgmlType::Q2_K, &x).is_none());
    }

    /// candle's k-quants and Q5_0/Q5_1 read back (with the importer's decoder) close to the input:
    /// the error of each super-block stays under a fraction of its range that shrinks with the bits.
    #[test]
    fn candle_types_round_trip() {
        let x = values(256 * 12);
        for (ty, frac) in [
            (GgmlType::Q5_0, 1.0 / 16.0),
            (GgmlType::Q5_1, 1.0 / 31.0),
            (GgmlType::Q4_K, 1.0 / 10.0),
            (GgmlType::Q5_K, 1.0 / 20.0),
            (GgmlType::Q6_K, 1.0 / 40.0),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len() as u64, ty.byte_len(x.len() as u64).unwrap(), "{ty}");
            let back = super::super::dequantize(ty, &q, x.len()).unwrap();
            for (xb, yb) in x.chunks(256).zip(back.chunks(256)) {
                let lo = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
                let hi = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
                let tol = (hi - lo) * frac;
                let worst = xb
                    .iter()
                    .zip(yb)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= tol, "{ty}: error {worst} above {tol}");
            }
        }
        // More bits, smaller error.
        let err = |ty| {
            let q = quantize(ty, &x).unwrap();
            let back = super::super::dequantize(ty, &q, x.len()).unwrap();
            x.iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
        };
        assert!(err(GgmlType::Q6_K) < err(GgmlType::Q5_K));
        assert!(err(GgmlType::Q5_K) < err(GgmlType::Q4_K));
    }

    /// Known blocks: all zeros, and a ramp whose codes can be worked out by hand.
    #[test]
    fn known_blocks() {
        let q = quantize(GgmlType::Q8_0, &[0.0; 32]).unwrap();
        assert_eq!(q, vec![0u8; 34]);
        let ramp: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect(); // -16..15
        let q = quantize(GgmlType::Q4_0, &ramp).unwrap();
        // max magnitude 16 at -16: d = 2, codes = round-down(x/2 + 8.5) clipped to 15.
        assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), 2.0);
        assert_eq!(q[2] & 0x0f, 0); // x = -16 -> 0
        assert_eq!(q[2] >> 4, 8); // x = 0 -> 8
        let q = quantize(GgmlType::Q8_0, &ramp).unwrap();
        assert_eq!(q[2] as i8, -127); // -16 is the largest magnitude
    }
}
