//! surgeon-surgery
pub mod vocab;
