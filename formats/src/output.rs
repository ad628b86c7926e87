//! The output guard every writer uses: nothing a user owns is ever replaced or removed.
//!
//! - An existing output is replaced only with `force`, and even then only when surgeon wrote it
//!   (it holds the [`MARKER`] file) or it is an empty directory.
//! - An output may never contain, or lie inside, any input (files or directories), even with `force`.
//! - Outputs are written into a temporary sibling `.NAME.surgeon-tmp-PID`, registered here, and
//!   renamed into place at the end. A SIGINT/SIGTERM (see [`install_signal_handlers`]) removes the
//!   registered temporaries and exits with status 130; temporaries left by a process that died
//!   (SIGKILL, power loss) are removed by the next write to the same output.
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The file that marks a directory as written by surgeon (model outputs, heal outputs).
pub const MARKER: &str = ".surgeon-output";

/// Exit status after an interruption (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_INTERRUPTED: i32 = 130;

/// `p` made absolute, with symbolic links of its existing part resolved (the path need not exist).
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => absolute(parent).join(name),
        _ => abs,
    }
}

/// Why writing to `out` must not happen, or `Ok` when it may (replacing it only if `force`).
///
/// `inputs` are the files and directories the command reads: the output must neither contain
/// one nor lie inside one.
pub fn check_output(out: &Path, inputs: &[PathBuf], force: bool) -> Result<()> {
    let refuse = |message: String| {
        Err(Error::Output {
            path: out.to_path_buf(),
            message,
        })
    };
    if out.file_name().is_none() {
        return refuse("has no directory name".into());
    }
    let abs_out = absolute(out);
    for input in inputs {
        let abs_in = absolute(input);
        if abs_in == abs_out {
            return refuse(format!("is the input {}", input.display()));
        }
        if abs_in.starts_with(&abs_out) {
            return refuse(format!(
                "holds the input {} (it would be replaced; even `force` never does that)",
                input.display()
            ));
        }
        if abs_out.starts_with(&abs_in) {
            return refuse(format!("is inside the input {}", input.display()));
        }
    }
    let Ok(md) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !force {
        return refuse("already exists (use `force` to replace it)".into());
    }
    if !md.is_dir() {
        return refuse(
            "already exists and is not a directory surgeon wrote: remove it yourself or choose \
             another --out"
                .into(),
        );
    }
    if is_surgeon_output(out) || is_empty_dir(out) {
        return Ok(());
    }
    refuse(format!(
        "already exists and was not written by surgeon (no {MARKER} file): `force` replaces only \
         surgeon's outputs; remove it yourself or choose another --out"
    ))
}

/// Whether `dir` holds surgeon's marker file.
pub fn is_surgeon_output(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none())
}

/// Writes the marker into `dir` (which must exist).
pub fn write_marker(dir: &Path, command: &str) -> Result<()> {
    let p = dir.join(MARKER);
    let text = serde_json::json!({
        "tool": format!("surgeon {}", env!("CARGO_PKG_VERSION")),
        "command": command,
    })
    .to_string();
    std::fs::write(&p, text + "\n").map_err(|e| Error::io(&p, e))
}

/// Creates `dir` (and its parents) as a surgeon output directory, with the marker.
pub fn create_output_dir(dir: &Path, command: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if !is_surgeon_output(dir) {
        write_marker(dir, command)?;
    }
    Ok(())
}

/// Temporaries of this process that a signal must remove.
static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn temps() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    TEMPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary sibling directory of an output, removed on drop (or on a signal) unless committed.
pub struct TempOutput {
    path: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl TempOutput {
    /// Creates `.NAME.surgeon-tmp-PID` next to `out` (after removing stale temporaries of
    /// processes that no longer run), with the marker inside.
    pub fn create(out: &Path, command: &str) -> Result<TempOutput> {
        let (parent, name) = split(out)?;
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        remove_stale_temporaries(&parent, &name);
        let path = parent.join(format!(".{name}.surgeon-tmp-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        let mut t = temps();
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        t.push(path.clone());
        drop(t);
        let temp = TempOutput {
            path,
            out: out.to_path_buf(),
            committed: false,
        };
        write_marker(&temp.path, command)?;
        Ok(temp)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary into place, replacing an existing output (already checked by
    /// [`check_output`]). A signal cannot interrupt between the renames.
    pub fn commit(mut self) -> Result<()> {
        let (parent, name) = split(&self.out)?;
        let mut t = temps();
        if std::fs::symlink_metadata(&self.out).is_ok() {
            let old = parent.join(format!(".{name}.surgeon-old-{}", std::process::id()));
            std::fs::rename(&self.out, &old).map_err(|e| Error::io(&self.out, e))?;
            if let Err(e) = std::fs::rename(&self.path, &self.out) {
                let _ = std::fs::rename(&old, &self.out);
                return Err(Error::io(&self.out, e));
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.path, &self.out).map_err(|e| Error::io(&self.out, e))?;
        }
        t.retain(|p| p != &self.path);
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let mut t = temps();
            let _ = std::fs::remove_dir_all(&self.path);
            t.retain(|p| p != &self.path);
        }
    }
}

fn split(out: &Path) -> Result<(PathBuf, String)> {
    let abs = absolute(out);
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string_lossy().into_owned())),
        _ => Err(Error::Output {
            path: out.to_path_buf(),
            message: "has no directory name".into(),
        }),
    }
}

/// Whether process `pid` still runs.
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // Signal 0 checks existence; EPERM means it exists but belongs to someone else.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes `.NAME.surgeon-tmp-PID` and `.NAME.surgeon-old-PID` siblings whose process is gone
/// (killed while writing). Returns the paths removed.
pub fn remove_stale_temporaries(parent: &Path, name: &str) -> Vec<PathBuf> {
    let mut removed = vec![];
    let Ok(rd) = std::fs::read_dir(parent) else {
        return removed;
    };
    let own = std::process::id();
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let pid = rest
            .strip_prefix("surgeon-tmp-")
            .or_else(|| rest.strip_prefix("surgeon-old-"))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == own || alive(pid) {
            continue;
        }
        let p = e.path();
        if std::fs::remove_dir_all(&p).is_ok() {
            eprintln!(
                "removed {}, left by process {pid} which no longer runs",
                p.display()
            );
            removed.push(p);
        }
    }
    removed
}

/// Removes every registered temporary (called on a signal, before exiting).
pub fn remove_registered_temporaries() -> Vec<PathBuf> {
    let t = temps();
    for p in t.iter() {
        // Another thread may still be creating files inside: retry a few times.
        for _ in 0..20 {
            if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    // Keep the lock: a writer must not rename a temporary into place while the process exits.
    let removed = t.clone();
    std::mem::forget(t);
    removed
}

/// Handles SIGINT and SIGTERM for a writing command. Without `graceful`, the first signal removes
/// the temporaries and exits with status 130. With `graceful` (training), the first signal sets
/// the flag (the caller checkpoints and stops) and a second one removes temporaries and exits.
pub fn install_signal_handlers(graceful: Option<Arc<AtomicBool>>) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        std::thread::Builder::new()
            .name("surgeon-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    if let Some(flag) = &graceful {
                        if !flag.swap(true, Ordering::SeqCst) {
                            eprintln!(
                                "\n{name}: stopping after the current step and saving a \
                                 checkpoint (send it again to stop at once)"
                            );
                            continue;
                        }
                    }
                    let removed = remove_registered_temporaries();
                    let what = if removed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; removed the unfinished output {}",
                            removed
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    eprintln!("\ninterrupted by {name}{what}");
                    std::process::exit(EXIT_INTERRUPTED);
                }
            })?;
    }
    #[cfg(not(unix))]
    let _ = graceful;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_overlaps_and_foreign_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("train.txt"), "text").unwrap();
        let file = data.join("train.txt");
        // Holding an input, being one, being inside one: refused even with force.
        for (out, input, want) in [
            (data.clone(), &file, "holds the input"),
            (file.clone(), &file, "is the input"),
            (data.join("sub"), &data, "is inside the input"),
        ] {
            let e = check_output(&out, std::slice::from_ref(input), true)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{out:?}: {e}");
        }
        let e = check_output(&data, &[], false).unwrap_err().to_string();
        assert!(e.contains("already exists (use `force`"), "{e}");
        let e = check_output(&data, &[], true).unwrap_err().to_string();
        assert!(e.contains("was not written by surgeon"), "{e}");
        let e = check_output(&file, &[], true).unwrap_err().to_string();
        assert!(e.contains("is not a directory surgeon wrote"), "{e}");
        // Empty directories and surgeon's outputs may be replaced with force.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        check_output(&empty, &[], true).unwrap();
        create_output_dir(&tmp.path().join("ours"), "test").unwrap();
        check_output(&tmp.path().join("ours"), &[], true).unwrap();
        check_output(&tmp.path().join("new"), &[file], false).unwrap();
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // A process that has exited: its pid no longer runs (the child was reaped).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp.path().join(format!(".out.surgeon-tmp-{dead}"));
        let live = tmp
            .path()
            .join(format!(".out.surgeon-tmp-{}", std::process::id()));
        let other = tmp.path().join(format!(".other.surgeon-tmp-{dead}"));
        for d in [&stale, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        let removed = remove_stale_temporaries(tmp.path(), "out");
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && live.exists() && other.exists());
    }

    #[test]
    fn temp_is_removed_unless_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let t = TempOutput::create(&out, "test").unwrap();
        let p = t.path().to_path_buf();
        assert!(p.join(MARKER).is_file());
        drop(t);
        assert!(!p.exists() && !out.exists());
        let t = TempOutput::create(&out, "test").unwrap();
        t.commit().unwrap();
        assert!(is_surgeon_output(&out));
        assert!(temps().is_empty());
    }
}
