//! Errors of the runtime: loading a plan into a model, tokenising, templating, evaluating.

/// Everything that can go wrong in `surgeon-distill`'s runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the plan's tensors or files failed.
    #[error(transparent)]
    Formats(#[from] surgeon_formats::Error),
    /// The plan's tensors do not match what the runtime expects from its architecture.
    #[error("{origin}: {message}")]
    Mismatch { origin: String, message: String },
    /// The architecture uses a feature the runtime does not implement.
    #[error("unsupported by the runtime: {0}")]
    Unsupported(String),
    /// Tokenizer missing or failing.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template missing or failing.
    #[error("chat template: {0}")]
    Template(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A configuration value out of range, named by its field.
    #[error("{0}")]
    Invalid(String),
    /// A training checkpoint that cannot be written or resumed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
