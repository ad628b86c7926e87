//! Errors of importance-driven pruning and search: each renders as one line a user can act on;
//! configuration fields are named in backticks (`heads_per_group`), never as flags.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Formats(#[from] surgeon_formats::Error),
    #[error(transparent)]
    Runtime(#[from] surgeon_distill::Error),
}

/// `Err(Error::Invalid(message))`.
pub fn invalid<T>(message: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(message.into()))
}
