//! surgeon-distill: burn models for surgeon plans — forward pass, evaluation, generation (and healing).
//!
//! - [`model::Llama`]: the Llama-family decoder, generic over the burn backend (trainable under autodiff).
//! - [`backend::BackendKind`]: the CLI's `--backend cpu|wgpu|cuda` choice.
//! - [`eval::perplexity`]: windowed next-token perplexity.
//! - [`generate`]: sampling with a KV cache, streaming text.
//! - [`text`]: tokenizer and chat template of a plan.
//! - [`calibrate`]: calibration statistics on a text file (block influence, MLP captures), the
//!   library form of the CLI's `--data`/`--max-tokens`/`--window`.
//! - [`probe`]: hooks into the forward pass and the calibration statistics built on them (block
//!   influence for `drop-layers --count`, MLP captures for `moe`, router logits for healing).
//! - [`rows`]: softmax reductions over rows of logits on the host (vectorised exponential).
//! - [`plot`]: line and bar charts (SVG/PNG) with an embedded font.
pub mod backend;
pub mod calibrate;
pub mod error;
pub mod eval;
pub mod generate;
pub mod heal;
pub mod model;
pub mod moe_aux;
pub mod moe_stats;
pub mod plot;
pub mod probe;
pub mod rows;
pub mod text;

pub use backend::BackendKind;
pub use error::{Error, Result};
pub use model::{KvCache, Llama};

/// The burn version this crate is built against (pinned), for downstream crates.
pub use burn;
