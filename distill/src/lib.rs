//! surgeon-distill
pub mod heal;
