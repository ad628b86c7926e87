//! surgeon-formats
pub mod gguf;
