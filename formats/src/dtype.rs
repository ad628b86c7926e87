//! Element types of stored tensors and exact conversions between them.
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Name used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }
    /// Name used in config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
    /// Parses the CLI spelling (`f32`, `f16`, `bf16`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DType::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (expected f32, f16 or bf16)"))
    }
}

/// Decodes little-endian elements of `dtype` into f32 (exact for every source type).
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out);
    out
}

pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
    }
}

/// Encodes f32 values as little-endian `dtype` (round to nearest even, as PyTorch does).
pub fn from_f32(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in values {
                out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in values {
                out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
    out
}

/// Converts raw little-endian bytes between dtypes. Exact whenever the value is representable.
pub fn convert(bytes: &[u8], from: DType, to: DType) -> Vec<u8> {
    if from == to {
        return bytes.to_vec();
    }
    // Chunked so that a large tensor never holds a full f32 copy beside both buffers.
    const CHUNK: usize = 1 << 16;
    let n = bytes.len() / from.size();
    let mut out = Vec::with_capacity(n * to.size());
    let mut tmp = vec![0f32; CHUNK.min(n)];
    for chunk in bytes.chunks(CHUNK * from.size()) {
        let m = chunk.len() / from.size();
        decode_into(from, chunk, &mut tmp[..m]);
        out.extend_from_slice(&from_f32(to, &tmp[..m]));
    }
    out
}

/// How many elements of little-endian `dtype` bytes are NaN or infinite.
pub fn count_nonfinite(dtype: DType, bytes: &[u8]) -> usize {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count(),
        DType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count(),
    }
}

/// The largest finite value of `dtype`.
pub fn max_finite(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::MAX,
        DType::F16 => f16::MAX.to_f32(),
        DType::BF16 => bf16::MAX.to_f32(),
    }
}

/// Encodes f32 values as `dtype`, clamping finite values beyond its range to the largest finite
/// value of the right sign (instead of infinity).
pub fn from_f32_saturating(dtype: DType, values: &[f32]) -> Vec<u8> {
    let m = max_finite(dtype);
    let clamped: Vec<f32> = values
        .iter()
        .map(|v| if v.is_finite() { v.clamp(-m, m) } else { *v })
        .collect();
    // Values just below the maximum may still round up to infinity: clamp after rounding too.
    let mut out = from_f32(dtype, &clamped);
    if count_nonfinite(dtype, &out) > 0 {
        let fixed: Vec<f32> = to_f32(dtype, &out)
            .iter()
            .zip(&clamped)
            .map(|(r, c)| {
                if r.is_infinite() && c.is_finite() {
                    m.copysign(*c)
                } else {
                    *r
                }
            })
            .collect();
        out = from_f32(dtype, &fixed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_representable_values_round_trip_bitwise() {
        // Every bf16 bit pattern that is not NaN survives f32 -> bf16 -> f32.
        let values: Vec<f32> = (0..=u16::MAX)
            .map(|b| f32::from_bits((b as u32) << 16))
            .filter(|v| !v.is_nan())
            .collect();
        let bf = convert(&from_f32(DType::F32, &values), DType::F32, DType::BF16);
        let back = to_f32(DType::BF16, &bf);
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn f16_conversion_is_exact_for_f16_values() {
        let values: Vec<f32> = (0..=u16::MAX)
            .map(|b| f16::from_bits(b).to_f32())
            .filter(|v| !v.is_nan())
            .collect();
        let h = from_f32(DType::F16, &values);
        let back = to_f32(DType::F16, &h);
        assert_eq!(values.len(), back.len());
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn overflow_is_counted_and_saturated() {
        let v = [1.0f32, 70000.0, -1e6, f32::NAN, 65504.0, 65530.0];
        let h = from_f32(DType::F16, &v);
        // 70000, -1e6 and 65530 (above the midpoint 65520) become infinite; NaN stays NaN.
        assert_eq!(count_nonfinite(DType::F16, &h), 4);
        let s = from_f32_saturating(DType::F16, &v);
        assert_eq!(count_nonfinite(DType::F16, &s), 1);
        let back = to_f32(DType::F16, &s);
        assert_eq!(&back[..3], &[1.0, 65504.0, -65504.0]);
        assert_eq!(back[5], 65504.0);
        assert_eq!(count_nonfinite(DType::F32, &from_f32(DType::F32, &v)), 1);
        let b = from_f32(DType::BF16, &[f32::MAX, f32::INFINITY, 3.0]);
        assert_eq!(count_nonfinite(DType::BF16, &b), 2);
        assert_eq!(max_finite(DType::BF16), half::bf16::MAX.to_f32());
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        let v = 1.0f32 + 2f32.powi(-8);
        let b = from_f32(DType::BF16, &[v]);
        assert_eq!(to_f32(DType::BF16, &b), vec![1.0]);
    }
}
