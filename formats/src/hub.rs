//! Hugging Face Hub ids (`org/name[@revision]`) resolved to a local snapshot directory.

use crate::{Error, Result};
use std::path::PathBuf;

/// `org/name` or `org/name@revision`, with no path-like parts.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves a Hub id to a snapshot directory in the local cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    Err(Error::invalid(format!(
        "{spec}: Hub models are not supported yet"
    )))
}
