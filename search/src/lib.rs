//! surgeon-search: importance-driven pruning and neural architecture search.
//!
//! - [`prune`]: sub-network extraction, a plan rewrite that keeps the most important rows and
//!   columns (by `surgeon_formats::ImportanceScores`) for a per-layer [`prune::PruneSpec`].
//! - [`library`]: the block library, every layer's variants scored by KL to the parent.
//! - [`nsga`]: NSGA-II over the library (genetic-rs), constrained by a parameter budget, and the
//!   exact dynamic-programming baseline over additive scores.
//! - [`front`]: `surgeon search` as one call: library, DP, NSGA-II, re-measured KL, front.json.
pub mod error;
pub mod front;
pub mod library;
pub mod nsga;
pub mod prune;

pub use error::{Error, Result};
pub use prune::{prune, AttentionSpec, LayerSpec, MlpSpec, PruneSpec, UniformPrune};
