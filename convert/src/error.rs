//! Errors of the conversion operators: each renders as one line a user can act on, naming the
//! configuration field (`kv_heads`) rather than a command-line flag.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that this model cannot satisfy.
    #[error("{0}")]
    Invalid(String),
    /// A layer kind the operator does not handle (it says which and why).
    #[error("layer {layer}: {message}")]
    Unsupported { layer: usize, message: String },
    #[error(transparent)]
    Formats(#[from] surgeon_formats::Error),
}
