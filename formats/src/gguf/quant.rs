//! Quantisation to ggml block formats, bit for bit as ggml's reference (`quantize_row_*_ref`) does:
//! Q8_0, Q4_0 and Q4_1 (32 values per block, an f16 scale first). The inverse is [`super::dequantize`].
use super::GgmlType;
use half::f16;
use rayon::prelude::*;

/// Types [`quantize`] can produce.
pub fn is_supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
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
        _ => q4_1,
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
        assert!(quantize(GgmlType::Q4_K, &x).is_none());
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
