//! surgeon-surgery
pub mod moe;
