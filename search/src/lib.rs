//! surgeon-search: importance-driven pruning and neural architecture search.
//!
//! - [`prune`]: sub-network extraction, a plan rewrite that keeps the most important rows and
//!   columns (by `surgeon_formats::ImportanceScores`) for a per-layer [`prune::PruneSpec`].
pub mod error;
pub mod prune;

pub use error::{Error, Result};
pub use prune::{prune, AttentionSpec, LayerSpec, MlpSpec, PruneSpec, UniformPrune};
