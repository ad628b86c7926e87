//! surgeon-formats
