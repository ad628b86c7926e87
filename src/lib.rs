//! surgeon: surgery on pretrained language models.
//!
//! The library crates do the work; this crate gathers them under one name for the Rust API and
//! holds the pipeline runner behind `surgeon run`.
pub use surgeon_convert as convert;
pub use surgeon_distill as distill;
pub use surgeon_formats as formats;
pub use surgeon_search as search;
pub use surgeon_surgery as surgery;
