//! Checkpoints of a healing run on disk: which ones are complete, the latest complete one for
//! `--resume`, and errors that name the file at fault.
//!
//! A checkpoint `OUT/checkpoints/step-N` is a model directory plus `trainer_state/` (state.json,
//! optimizer.bin, metrics.csv). It is written whole into a temporary sibling and renamed into
//! place, so a crash or a full disk leaves no `step-N` at all; directories left half-written by
//! older versions are skipped with a warning.
use super::{HealError, Result};
use std::path::{Path, PathBuf};

/// Subdirectory of a checkpoint holding everything but the weights.
pub const STATE_DIR: &str = "trainer_state";
/// The trainer state inside [`STATE_DIR`].
pub const STATE_FILE: &str = "state.json";
/// The optimizer record inside [`STATE_DIR`] (burn's recorder appends `.bin`).
pub const OPTIM_FILE: &str = "optimizer";

/// Why `dir` is not a complete checkpoint, or `None` when it is.
pub fn incomplete_reason(dir: &Path) -> Option<String> {
    let state = dir.join(STATE_DIR);
    let missing = |p: PathBuf| Some(format!("{} is missing", p.display()));
    if !dir.join("config.json").is_file() {
        return missing(dir.join("config.json"));
    }
    if !dir.join("model.safetensors").is_file()
        && !dir.join("model.safetensors.index.json").is_file()
    {
        return missing(dir.join("model.safetensors"));
    }
    let state_file = state.join(STATE_FILE);
    match std::fs::read_to_string(&state_file) {
        Err(_) => return missing(state_file),
        Ok(s) if serde_json::from_str::<serde_json::Value>(&s).is_err() => {
            return Some(format!("{} is not valid JSON", state_file.display()))
        }
        Ok(_) => {}
    }
    let optim = state.join(format!("{OPTIM_FILE}.bin"));
    match std::fs::metadata(&optim) {
        Err(_) => missing(optim),
        Ok(md) if md.len() == 0 => Some(format!("{} is empty", optim.display())),
        Ok(_) => None,
    }
}

/// The checkpoint to resume from: `dir` itself when it is one, else the latest complete
/// `dir/checkpoints/step-*`. Incomplete ones are skipped with a warning on stderr.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        return Err(HealError::Checkpoint(format!(
            "--resume {}: no such directory",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(HealError::Checkpoint(format!(
            "--resume {}: not a directory (give a checkpoint or a heal output directory)",
            dir.display()
        )));
    }
    if dir.join(STATE_DIR).exists() {
        return match incomplete_reason(dir) {
            None => Ok(dir.to_path_buf()),
            Some(why) => Err(HealError::Checkpoint(format!(
                "{} is an incomplete checkpoint: {why}",
                dir.display()
            ))),
        };
    }
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("checkpoints"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix("step-")?.parse::<u64>().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    for (_, path) in steps.iter().rev() {
        match incomplete_reason(path) {
            None => return Ok(path.clone()),
            Some(why) => eprintln!(
                "warning: skipping the incomplete checkpoint {}: {why}",
                path.display()
            ),
        }
    }
    Err(HealError::Checkpoint(format!(
        "{} holds no complete checkpoint (no {STATE_DIR}/{STATE_FILE} in it, and no complete \
         checkpoints/step-*{})",
        dir.display(),
        if steps.is_empty() {
            ""
        } else {
            "; the incomplete ones are listed above"
        }
    )))
}

/// The error for an optimizer record that does not load: names the file and keeps the
/// recorder's (often very long) message to its first line.
pub fn optimizer_error(path: &Path, e: impl std::fmt::Display) -> HealError {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let short: String = first.chars().take(160).collect();
    let ellipsis = if short.len() < text.len() { "..." } else { "" };
    HealError::Checkpoint(format!(
        "{}: the optimizer state does not load (truncated or corrupt; resume from an earlier \
         checkpoint): {short}{ellipsis}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(dir: &Path, optimizer: &[u8]) {
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "x").unwrap();
        std::fs::write(dir.join(STATE_DIR).join(STATE_FILE), "{}").unwrap();
        std::fs::write(dir.join(STATE_DIR).join("optimizer.bin"), optimizer).unwrap();
    }

    #[test]
    fn resume_skips_incomplete_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let ck = out.join("checkpoints");
        fake_checkpoint(&ck.join("step-000002"), b"opt");
        fake_checkpoint(&ck.join("step-000004"), b"");
        std::fs::create_dir_all(ck.join("step-000006")).unwrap();
        std::fs::write(ck.join("step-000006/config.json"), "{}").unwrap();
        assert_eq!(find_checkpoint(&out).unwrap(), ck.join("step-000002"));
        assert!(incomplete_reason(&ck.join("step-000004"))
            .unwrap()
            .ends_with("optimizer.bin is empty"));
        assert!(incomplete_reason(&ck.join("step-000006"))
            .unwrap()
            .ends_with("model.safetensors is missing"));
        // Named directly, an incomplete checkpoint is an error saying what is missing.
        let e = find_checkpoint(&ck.join("step-000004"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is an incomplete checkpoint"), "{e}");
        let e = find_checkpoint(&tmp.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("nope: no such directory"), "{e}");
        std::fs::remove_dir_all(ck.join("step-000002")).unwrap();
        let e = find_checkpoint(&out).unwrap_err().to_string();
        assert!(e.contains("holds no complete checkpoint"), "{e}");
    }

    #[test]
    fn optimizer_errors_name_the_file_in_one_short_line() {
        let long = format!("DeserializeError(\"{}\")\nmore", "x".repeat(5000));
        let e = optimizer_error(Path::new("ck/trainer_state/optimizer.bin"), long).to_string();
        assert!(e.starts_with("checkpoint: ck/trainer_state/optimizer.bin: the optimizer state"));
        assert!(e.len() < 400 && !e.contains('\n'), "{e}");
    }
}
