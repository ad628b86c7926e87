//! Hugging Face Hub ids (`org/name[@revision]`) resolved to a local snapshot directory.
//!
//! The local cache (laid out as `huggingface_hub` does: `models--org--name/{refs,snapshots,blobs}`)
//! is consulted first, so cached models work offline. Otherwise hf-hub downloads the snapshot,
//! honouring HF_ENDPOINT and HF_TOKEN; HF_HUB_OFFLINE=1 forbids the network.
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// `org/name` or `org/name@revision`, with no path-like parts.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    if rev.is_some_and(|r| r.is_empty() || r.contains("..")) {
        return false;
    }
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

/// The hub cache directory: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, then `$HF_HOME/hub`
/// (HF_HOME defaulting to `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`).
pub fn cache_dir() -> PathBuf {
    hf_hub::resolve_cache_dir()
}

fn split_spec(spec: &str) -> (&str, &str, &str) {
    let (id, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = id.split_once('/').unwrap_or(("", id));
    (org, name, rev)
}

/// Looks a model up in a hub cache directory without any network access.
pub fn resolve_in_cache(cache: &Path, spec: &str) -> Option<PathBuf> {
    let (org, name, rev) = split_spec(spec);
    let repo = cache.join(format!("models--{org}--{name}"));
    let is_hash = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_hash {
        rev.to_string()
    } else {
        std::fs::read_to_string(repo.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = repo.join("snapshots").join(commit);
    snapshot.join("config.json").is_file().then_some(snapshot)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

/// Resolves a Hub id to a snapshot directory: the cache first, then a download.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    if let Some(dir) = resolve_in_cache(&cache, spec) {
        return Ok(dir);
    }
    let (org, name, rev) = split_spec(spec);
    if offline() {
        return Err(Error::invalid(format!(
            "{spec}: not in the local Hub cache {} and HF_HUB_OFFLINE is set",
            cache.display()
        )));
    }
    let client = hf_hub::HFClientSync::new()
        .map_err(|e| Error::invalid(format!("{spec}: cannot start the Hub client: {e}")))?;
    let patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    client
        .model(org, name)
        .snapshot_download()
        .revision(rev)
        .allow_patterns(patterns)
        .send()
        .map_err(|e| {
            Error::invalid(format!(
                "{spec}: not in the local Hub cache {} and the download failed: {e}",
                cache.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_hub_ids() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M"));
        assert!(looks_like_hub_id("org/name@v1.0"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("name"));
        assert!(!looks_like_hub_id("org/name@"));
    }

    #[test]
    fn resolves_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--tiny");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(sha)).unwrap();
        std::fs::write(repo.join("refs/main"), sha).unwrap();
        std::fs::write(repo.join("refs/v1"), sha).unwrap();
        std::fs::write(repo.join("snapshots").join(sha).join("config.json"), "{}").unwrap();
        let want = repo.join("snapshots").join(sha);
        assert_eq!(resolve_in_cache(tmp.path(), "org/tiny"), Some(want.clone()));
        assert_eq!(
            resolve_in_cache(tmp.path(), "org/tiny@v1"),
            Some(want.clone())
        );
        assert_eq!(
            resolve_in_cache(tmp.path(), &format!("org/tiny@{sha}")),
            Some(want)
        );
        assert_eq!(resolve_in_cache(tmp.path(), "org/tiny@v2"), None);
        assert_eq!(resolve_in_cache(tmp.path(), "org/other"), None);
    }
}
