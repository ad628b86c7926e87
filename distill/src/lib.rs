//! surgeon-distill
