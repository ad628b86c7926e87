//! Errors of the surgery operators: each renders as one line a user can act on.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {layer} is out of range: the model has {n} layers (0..{n})")]
    LayerOutOfRange { layer: usize, n: usize },
    #[error("slice {start}..{end} is out of range: the model has {n} layers (0..{n})")]
    SliceOutOfRange { start: usize, end: usize, n: usize },
    #[error("slice {at}..{at} is empty (slices are half-open ranges A..B with A < B)")]
    EmptySlice { at: usize },
    #[error("slice {start}..{end} is reversed (slices are half-open ranges A..B with A < B)")]
    ReversedSlice { start: usize, end: usize },
    #[error(
        "cannot add {p} blocks to {n} layers evenly: {p} does not divide {n} (give `positions`)"
    )]
    NotDivisible { n: usize, p: usize },
    #[error("layer {layer} is named twice")]
    DuplicateLayer { layer: usize },
    #[error("cannot drop all {n} layers: at least one must remain")]
    DropAll { n: usize },
    #[error("cannot up-scale {n} layers to {s}: SOLAR needs an even target between {n} and {} (exclusive), e.g. {}", 2 * n, solar_example(*n))]
    InvalidTarget { n: usize, s: usize },
    #[error("{0}")]
    Syntax(String),
    /// A request the operator cannot carry out on this model (MoE, vocabulary).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Formats(#[from] surgeon_formats::Error),
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

/// A valid SOLAR target for `n` layers (3n/2 rounded to even), for error messages.
fn solar_example(n: usize) -> String {
    let s = (n * 3 / 2) & !1;
    if s > n && s < 2 * n {
        s.to_string()
    } else {
        "none exists for so few layers; use `slices`".into()
    }
}
