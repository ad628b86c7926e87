//! surgeon-convert
