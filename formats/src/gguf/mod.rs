//! GGUF checkpoints (llama.cpp's format). Reading: container parsing, dequantisation, llama.cpp → HF
//! tensor names and RoPE row order, model hyper-parameters and the tokenizer rebuilt from metadata.
//! Writing ([`writer`]): a plan as a llama.cpp-ready GGUF, quantised with [`quant`].
//!
//! ```no_run
//! use surgeon_formats::gguf::{self, GgufFile};
//! let f = GgufFile::open("model.gguf")?;
//! let hyper = gguf::LlamaHyper::from_gguf(&f)?;
//! for t in f.tensors() {
//!     let hf = gguf::names::hf_tensor_name(&t.name)?;
//!     let mut data = f.dequantize_tensor(t)?; // f32, row-major over `t.hf_shape()`
//!     if let Some(n_head) = hf.rope_heads(&hyper) {
//!         let shape = t.hf_shape(); // [rows, cols] for weights, [rows] for biases
//!         let cols = shape.get(1).copied().unwrap_or(1);
//!         gguf::names::unpermute_rope_rows(&mut data, shape[0], cols, n_head)?;
//!     }
//! }
//! let tok = gguf::tokenizer::build_hf_tokenizer(&f)?;
//! # Ok::<(), gguf::GgufError>(())
//! ```

pub mod dequant;
pub mod names;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use dequant::{dequantize, dequantize_into};
pub use names::{hf_tensor_name, unpermute_rope_rows, HfTensorName};
pub use reader::{GgmlType, GgufFile, GgufTensorInfo, GgufValue};
pub use tokenizer::{build_hf_tokenizer, HfTokenizerFiles};
pub use writer::{export_gguf, ExportOptions, ExportReport, ExportType};

/// Errors of GGUF reading. Each message is one line naming the file (`<memory>` for in-memory buffers), the
/// tensor or metadata key when there is one, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic { file: String, found: [u8; 4] },
    #[error("{file}: unsupported GGUF version {version} (supported: 2 and 3; big-endian files are not supported)")]
    UnsupportedVersion { file: String, version: u32 },
    #[error("{file}: truncated while reading {what} at byte {offset}: need {needed} bytes, {available} left")]
    Truncated {
        file: String,
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{file}: {what} is {count}, more than the remaining bytes can hold (at most {max})")]
    AbsurdCount {
        file: String,
        what: String,
        count: u64,
        max: u64,
    },
    #[error("{file}: {what} has length {len}, but only {available} bytes remain")]
    AbsurdLength {
        file: String,
        what: String,
        len: u64,
        available: u64,
    },
    #[error("{file}: metadata key `{key}` has unknown value type {type_id}")]
    InvalidValueType {
        file: String,
        key: String,
        type_id: u32,
    },
    #[error("{file}: metadata key `{key}`: {reason}")]
    InvalidValue {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: duplicate metadata key `{key}`")]
    DuplicateKey { file: String, key: String },
    #[error("{file}: duplicate tensor `{tensor}`")]
    DuplicateTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has unknown ggml type id {type_id}")]
    UnknownGgmlType {
        file: String,
        tensor: String,
        type_id: u32,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    BadTensor {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error(
        "{file}: tensor `{tensor}` offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedOffset {
        file: String,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("{file}: tensor `{tensor}` (data offset {offset}, {byte_len} bytes) extends past the end of the data section ({data_len} bytes)")]
    TensorOutOfBounds {
        file: String,
        tensor: String,
        offset: u64,
        byte_len: u64,
        data_len: u64,
    },
    #[error("{ctx}cannot dequantize {ggml_type}: {reason}")]
    Dequantize {
        /// `"<file>: tensor `<name>`: "` when known, else empty.
        ctx: String,
        ggml_type: GgmlType,
        reason: String,
    },
    #[error("{file}: missing metadata key `{key}`")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key `{key}` should be {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{file}: metadata key `{key}`: {reason}")]
    BadMetadata {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: unsupported architecture `{arch}` (supported: llama, qwen3, qwen3moe, phi3, gemma2, gemma3)")]
    UnsupportedArchitecture { file: String, arch: String },
    #[error("unknown llama.cpp tensor name `{name}`: {reason}")]
    UnknownTensorName { name: String, reason: String },
    #[error("cannot un-permute RoPE rows: {0}")]
    BadRopeShape(String),
}

impl GgufError {
    /// Adds the file and tensor to a [`GgufError::Dequantize`] error.
    pub(crate) fn in_tensor(self, file: &str, tensor: &str) -> GgufError {
        match self {
            GgufError::Dequantize {
                ctx: _,
                ggml_type,
                reason,
            } => GgufError::Dequantize {
                ctx: format!("{file}: tensor `{tensor}`: "),
                ggml_type,
                reason,
            },
            other => other,
        }
    }
}

/// File name of the SmolLM2 test model inside the cache directory.
pub const SMOLLM2_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF used by tests: `$SURGEON_SMOLLM2_GGUF`, else
/// `$SURGEON_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf`, else `~/.cache/surgeon/SmolLM2-135M-Instruct.Q4_1.gguf`.
/// The error says to run `scripts/fetch-smollm2.sh` when the file is missing.
pub fn smollm2_gguf_path() -> Result<PathBuf, String> {
    let path = if let Some(p) = std::env::var_os("SURGEON_SMOLLM2_GGUF") {
        PathBuf::from(p)
    } else if let Some(c) = std::env::var_os("SURGEON_CACHE") {
        PathBuf::from(c).join(SMOLLM2_GGUF_NAME)
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h)
            .join(".cache")
            .join("surgeon")
            .join(SMOLLM2_GGUF_NAME)
    } else {
        return Err(format!(
            "cannot locate {SMOLLM2_GGUF_NAME}: none of SURGEON_SMOLLM2_GGUF, SURGEON_CACHE, HOME is set; \
             run scripts/fetch-smollm2.sh and set SURGEON_CACHE"
        ));
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: run scripts/fetch-smollm2.sh (with the same SURGEON_CACHE) or set SURGEON_SMOLLM2_GGUF",
            path.display()
        ))
    }
}

/// `general.architecture` values surgeon imports: `llama` (Llama, Mistral, Mixtral as llama.cpp
/// writes them) and `qwen3` (Qwen3: per-head q/k norms, `attention.key_length`, no RoPE row permutation).
pub const SUPPORTED_ARCHITECTURES: [&str; 6] =
    ["llama", "qwen3", "qwen3moe", "phi3", "gemma2", "gemma3"];

/// Hyper-parameters of a Llama-family GGUF model (keys `<arch>.*`, `tokenizer.ggml.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHyper {
    /// `general.architecture` (one of [`SUPPORTED_ARCHITECTURES`]).
    pub architecture: String,
    /// `attention.key_length`: the query/key head size when it is not `embedding_length / head_count`.
    pub key_length: Option<usize>,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    /// `head_count_kv`, or `head_count` when absent.
    pub head_count_kv: usize,
    /// `rope.freq_base`; 10000 only when the key is absent.
    pub rope_freq_base: f64,
    /// `rope.dimension_count`, or the head dimension when absent.
    pub rope_dimension_count: usize,
    pub rms_norm_eps: f64,
    pub context_length: Option<usize>,
    /// Length of `tokenizer.ggml.tokens` (falls back to `<arch>.vocab_size`).
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub expert_count: Option<usize>,
    pub expert_used_count: Option<usize>,
    /// `expert_feed_forward_length`: each expert's width (Qwen3-MoE), when it is not `feed_forward_length`.
    pub expert_feed_forward_length: Option<usize>,
    /// Whether the file has no `output.weight`, i.e. the LM head is tied to the token embedding.
    pub tie_word_embeddings: bool,
    /// `attention.sliding_window` (Gemma: the window of its sliding layers).
    pub sliding_window: Option<usize>,
    /// `attn_logit_softcapping` and `final_logit_softcapping` (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// `rope.scaling.type` and `rope.scaling.factor`, when the type is not `none`.
    pub rope_scaling: Option<(String, f64)>,
}

impl LlamaHyper {
    /// Reads the hyper-parameters of a `llama` GGUF; other architectures are a clear error.
    pub fn from_gguf(f: &GgufFile) -> Result<LlamaHyper, GgufError> {
        let arch = f.require_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(GgufError::UnsupportedArchitecture {
                file: f.label(),
                arch,
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let usize_of = |key: &str| -> Result<usize, GgufError> { Ok(f.require_u64(key)? as usize) };
        let opt_usize = |key: &str| -> Result<Option<usize>, GgufError> {
            Ok(f.get_u64(key)?.map(|v| v as usize))
        };
        let head_count = usize_of(&k("attention.head_count"))?;
        let embedding_length = usize_of(&k("embedding_length"))?;
        if head_count == 0 {
            return Err(GgufError::BadMetadata {
                file: f.label(),
                key: k("attention.head_count"),
                reason: "is 0".to_string(),
            });
        }
        let vocab_size = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(a) => a.len(),
            None => usize_of(&k("vocab_size"))?,
        };
        let rms_norm_eps = rms_norm_eps(f, &k("attention.layer_norm_rms_epsilon"))?;
        let rope_freq_base = rope_freq_base(f, &k("rope.freq_base"))?;
        let block_count = usize_of(&k("block_count"))?;
        check_block_count(f, &k("block_count"), block_count)?;
        Ok(LlamaHyper {
            block_count,
            embedding_length,
            feed_forward_length: usize_of(&k("feed_forward_length"))?,
            head_count,
            head_count_kv: opt_usize(&k("attention.head_count_kv"))?.unwrap_or(head_count),
            rope_freq_base,
            rope_dimension_count: opt_usize(&k("rope.dimension_count"))?.unwrap_or(
                opt_usize(&k("attention.key_length"))?.unwrap_or(embedding_length / head_count),
            ),
            rms_norm_eps,
            context_length: opt_usize(&k("context_length"))?,
            vocab_size,
            bos_token_id: opt_token_id(f, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: opt_token_id(f, "tokenizer.ggml.eos_token_id")?,
            pad_token_id: opt_token_id(f, "tokenizer.ggml.padding_token_id")?,
            unk_token_id: opt_token_id(f, "tokenizer.ggml.unknown_token_id")?,
            expert_count: opt_usize(&k("expert_count"))?,
            expert_used_count: opt_usize(&k("expert_used_count"))?,
            expert_feed_forward_length: opt_usize(&k("expert_feed_forward_length"))?,
            key_length: opt_usize(&k("attention.key_length"))?,
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            sliding_window: opt_usize(&k("attention.sliding_window"))?,
            attn_logit_softcapping: f.get_f64(&k("attn_logit_softcapping"))?,
            final_logit_softcapping: f.get_f64(&k("final_logit_softcapping"))?,
            rope_scaling: rope_scaling(f, &arch)?,
            architecture: arch,
        })
    }

    /// Head dimension (`attention.key_length`, else `embedding_length / head_count`).
    pub fn head_dim(&self) -> usize {
        self.key_length
            .unwrap_or(self.embedding_length / self.head_count)
    }

    /// Whether llama.cpp permuted the q/k rows for its RoPE layout (only its `llama` converter does).
    pub fn rope_permuted(&self) -> bool {
        self.architecture == "llama"
    }
}

/// `rope.scaling.{type,factor}`: `None` when absent or `none`; the factor is required otherwise.
fn rope_scaling(f: &GgufFile, arch: &str) -> Result<Option<(String, f64)>, GgufError> {
    let kind = match f.get_str(&format!("{arch}.rope.scaling.type"))? {
        None | Some("none") => return Ok(None),
        Some(kind) => kind.to_string(),
    };
    let key = format!("{arch}.rope.scaling.factor");
    match f.get_f64(&key)? {
        Some(x) if x.is_finite() && x > 0.0 => Ok(Some((kind, x))),
        x => Err(GgufError::BadMetadata {
            file: f.label(),
            key,
            reason: format!("must be a positive number with rope.scaling.type {kind}, got {x:?}"),
        }),
    }
}

/// The RMS norm epsilon at `key`: required, and in (0, 1) (anything else is a corrupt file).
fn rms_norm_eps(f: &GgufFile, key: &str) -> Result<f64, GgufError> {
    let eps = f.get_f64(key)?.ok_or_else(|| GgufError::MissingKey {
        file: f.label(),
        key: key.to_string(),
    })?;
    if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
        return Err(GgufError::BadMetadata {
            file: f.label(),
            key: key.to_string(),
            reason: format!("must be in (0, 1), got {eps}"),
        });
    }
    Ok(eps)
}

/// The RoPE base at `key`: 10000 only when absent, else a positive finite number.
fn rope_freq_base(f: &GgufFile, key: &str) -> Result<f64, GgufError> {
    let base = f.get_f64(key)?.unwrap_or(10000.0);
    if !(base.is_finite() && base > 0.0) {
        return Err(GgufError::BadMetadata {
            file: f.label(),
            key: key.to_string(),
            reason: format!("must be a positive finite number, got {base}"),
        });
    }
    Ok(base)
}

/// Checks that the `blk.N.*` tensors cover exactly blocks `0..block_count`. Tensors of blocks the
/// count leaves out, or blocks it names that have no tensors: one message naming the key, not one
/// per tensor.
fn check_block_count(f: &GgufFile, key: &str, block_count: usize) -> Result<(), GgufError> {
    let blocks: std::collections::BTreeSet<usize> = f
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
        .collect();
    // `blocks` holds distinct indices, so it is exactly 0..block_count when it has block_count of
    // them and the largest is block_count - 1. (Never build 0..block_count itself: a corrupt count
    // of billions would allocate gigabytes.)
    let exact =
        blocks.len() == block_count && blocks.last().is_none_or(|&last| last == block_count - 1);
    if !exact {
        let found = match (blocks.first(), blocks.last()) {
            (Some(a), Some(b)) => {
                format!("tensors for {} blocks (blk.{a} .. blk.{b})", blocks.len())
            }
            _ => "no block tensors".to_string(),
        };
        return Err(GgufError::BadMetadata {
            file: f.label(),
            key: key.to_string(),
            reason: format!("says {block_count} blocks but the file has {found}"),
        });
    }
    Ok(())
}

/// An optional token id at `key`; a value beyond `u32` is an error, not a silent truncation.
fn opt_token_id(f: &GgufFile, key: &str) -> Result<Option<u32>, GgufError> {
    f.get_u64(key)?
        .map(|v| {
            u32::try_from(v).map_err(|_| GgufError::BadMetadata {
                file: f.label(),
                key: key.to_string(),
                reason: format!("{v} does not fit a token id"),
            })
        })
        .transpose()
}

/// Opens the real test model, SmolLM2-135M-Instruct, from [`smollm2_gguf_path`]. The error says how
/// to fetch it; tests on the real model fail with it rather than skip.
pub fn open_smollm2() -> Result<crate::Plan, String> {
    let path = smollm2_gguf_path()?;
    crate::gguf_import::plan_from_gguf(&path).map_err(|e| e.to_string())
}
