//! surgeon-surgery
