//! Dequantisation of ggml tensor data to f32.
//!
//! The quantised block formats use candle-core's block types (`candle_core::quantized::k_quants`) and their
//! `GgmlType::to_float`, run in parallel over chunks of blocks. Results are bitwise identical to gguf-py's
//! `gguf.quants.dequantize` (checked by the golden tests in `tests/fixtures/gguf/`).

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, GgmlType as CandleBlock,
};
use rayon::prelude::*;

use super::{GgmlType, GgufError};

/// Blocks handled per parallel task.
const BLOCKS_PER_TASK: usize = 1024;

/// Whether [`dequantize`] supports `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q8_0
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
    )
}

/// Dequantises `n_elements` elements of type `ty` stored in `bytes` (exactly `ty.byte_len(n_elements)` bytes).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantises `bytes` of type `ty` into `out`, whose length is the element count.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let err = |reason: String| GgufError::Dequantize {
        ctx: String::new(),
        ggml_type: ty,
        reason,
    };
    let n = out.len();
    let expected = ty
        .byte_len(n as u64)
        .ok_or_else(|| err(format!("{n} elements are not a whole number of blocks")))?;
    if expected != bytes.len() as u64 {
        return Err(err(format!(
            "{n} elements need {expected} bytes, got {}",
            bytes.len()
        )));
    }
    use GgmlType::*;
    match ty {
        F32 => par_elems(bytes, out, 4, |b| {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        F16 => par_elems(bytes, out, 2, |b| {
            half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        BF16 => par_elems(bytes, out, 2, |b| {
            f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
        }),
        Q4_0 => par_blocks::<BlockQ4_0>(bytes, out),
        Q4_1 => par_blocks::<BlockQ4_1>(bytes, out),
        Q5_0 => par_blocks::<BlockQ5_0>(bytes, out),
        Q5_1 => par_blocks::<BlockQ5_1>(bytes, out),
        Q8_0 => par_blocks::<BlockQ8_0>(bytes, out),
        Q2_K => par_blocks::<BlockQ2K>(bytes, out),
        Q3_K => par_blocks::<BlockQ3K>(bytes, out),
        Q4_K => par_blocks::<BlockQ4K>(bytes, out),
        Q5_K => par_blocks::<BlockQ5K>(bytes, out),
        Q6_K => par_blocks::<BlockQ6K>(bytes, out),
        Q8_K => par_blocks::<BlockQ8K>(bytes, out),
        other => return Err(err(format!("dequantisation of {other} is not supported"))),
    }
    Ok(())
}

fn par_elems(bytes: &[u8], out: &mut [f32], size: usize, f: impl Fn(&[u8]) -> f32 + Sync) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(o, b)| {
            for (y, x) in o.iter_mut().zip(b.chunks_exact(size)) {
                *y = f(x);
            }
        });
}

/// Dequantises whole blocks of candle block type `B`; sizes were validated by the caller.
fn par_blocks<B: CandleBlock>(bytes: &[u8], out: &mut [f32]) {
    let block_bytes = std::mem::size_of::<B>();
    let block_elems = B::BLCK_SIZE;
    out.par_chunks_mut(BLOCKS_PER_TASK * block_elems)
        .zip(bytes.par_chunks(BLOCKS_PER_TASK * block_bytes))
        .for_each(|(o, b)| {
            let nb = b.len() / block_bytes;
            debug_assert_eq!(nb * block_elems, o.len());
            let mut blocks: Vec<B> = Vec::with_capacity(nb);
            // SAFETY: candle's block types are `repr(C)` plain-old-data (f16/f32 scales and integer arrays),
            // valid for every bit pattern; `blocks` has capacity for `nb` properly aligned blocks and we copy
            // exactly `nb * size_of::<B>()` bytes into it before setting the length.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    b.as_ptr(),
                    blocks.as_mut_ptr() as *mut u8,
                    nb * block_bytes,
                );
                blocks.set_len(nb);
            }
            B::to_float(&blocks, o);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's block structs must have exactly ggml's on-disk block sizes for the byte copy to be right.
    #[test]
    fn candle_block_sizes_match_ggml() {
        fn check<B: CandleBlock>(t: GgmlType) {
            assert_eq!(
                (B::BLCK_SIZE, std::mem::size_of::<B>()),
                t.block_layout(),
                "{t}"
            );
        }
        check::<BlockQ4_0>(GgmlType::Q4_0);
        check::<BlockQ4_1>(GgmlType::Q4_1);
        check::<BlockQ5_0>(GgmlType::Q5_0);
        check::<BlockQ5_1>(GgmlType::Q5_1);
        check::<BlockQ8_0>(GgmlType::Q8_0);
        check::<BlockQ2K>(GgmlType::Q2_K);
        check::<BlockQ3K>(GgmlType::Q3_K);
        check::<BlockQ4K>(GgmlType::Q4_K);
        check::<BlockQ5K>(GgmlType::Q5_K);
        check::<BlockQ6K>(GgmlType::Q6_K);
        check::<BlockQ8K>(GgmlType::Q8_K);
    }

    #[test]
    fn q8_k_is_scale_times_quant() {
        // Q8_K: f32 d, 256 x i8 qs, 16 x i16 bsums (unused for dequantisation).
        let mut raw = Vec::new();
        raw.extend_from_slice(&0.5f32.to_le_bytes());
        for i in 0..256i32 {
            raw.push((i - 128) as i8 as u8);
        }
        raw.extend_from_slice(&[0u8; 32]);
        let f = dequantize(GgmlType::Q8_K, &raw, 256).unwrap();
        for (i, v) in f.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 128.0) * 0.5);
        }
    }

    #[test]
    fn size_mismatch_and_unsupported_are_errors() {
        let e = dequantize(GgmlType::Q4_0, &[0u8; 17], 32).unwrap_err();
        assert!(e.to_string().contains("need 18 bytes, got 17"), "{e}");
        let e = dequantize(GgmlType::Q4_0, &[0u8; 18], 31).unwrap_err();
        assert!(e.to_string().contains("whole number of blocks"), "{e}");
        let e = dequantize(GgmlType::IQ4_NL, &[0u8; 18], 32).unwrap_err();
        assert!(e.to_string().contains("IQ4_NL is not supported"), "{e}");
    }
}
