//! surgeon-convert: operators that change how a layer computes, not how many layers there are.
//!
//! - [`gqa`]: regroup key/value heads (MHA <-> GQA <-> MQA) by mean-pooling or repeating them.
//!
//! Like the structural operators in `surgeon-surgery`, these rewrite plans without touching data;
//! the writer materialises the new tensors while streaming.
pub mod error;
pub mod gqa;

pub use error::{Error, Result};
pub use gqa::regroup_kv_heads;
