//! surgeon-convert: operators that change how a layer computes, not how many layers there are.
//!
//! - [`clover`]: CLOVER, every key/value head's value-output pair in its singular basis, optionally
//!   pruned (data-aware with calibration statistics).
//! - [`clover_finetune`]: the factors CLOVER's singular-value fine-tuning trains (`heal --train
//!   clover`), handed to the runtime as plain data.
//! - [`gqa`]: regroup key/value heads (MHA <-> GQA <-> MQA) by mean-pooling or repeating them.
//! - [`hedgehog`]: linearise attention (Hedgehog feature maps, LoLCATs sliding-window hybrid).
//! - [`mla`]: multi-head latent attention in DeepSeek-V3 layout (partial RoPE, PCA latent).
//!
//! Like the structural operators in `surgeon-surgery`, these rewrite plans without touching data;
//! the writer materialises the new tensors while streaming.
pub mod clover;
pub mod clover_finetune;
pub mod error;
pub mod gqa;
pub mod hedgehog;
pub mod mla;

pub use clover::{clover, CloverOptions, CloverReport, InputStats, VoRank};
pub use error::{Error, Result};
pub use gqa::regroup_kv_heads;
pub use hedgehog::{to_hedgehog, HedgehogOptions};
pub use mla::{to_mla, LatentNorm, MlaOptions, RopeSelect};
