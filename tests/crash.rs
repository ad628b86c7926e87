//! Crash safety of the writers (issues 20 and 21), simulated for real:
//!
//! - SIGKILL: `convert` and `upscale` are killed with `kill -KILL` at several points while they
//!   write (when the temporary appears, and after 1, 3 and 6 of its shards exist); the output
//!   path is then absent or complete, the input is byte-for-byte untouched, and the next run to
//!   the same output removes the dead process's temporary.
//! - SIGINT / SIGTERM: sent with `kill -INT` / `kill -TERM` while `convert` writes: exit status
//!   130, a message, no temporary, no output.
//! - Full disk: a 24 MB tmpfs mounted for the test when running as root (ENOSPC); otherwise (and
//!   in addition) the file-size limit `ulimit -f` makes writes fail with EFBIG the same way.
//! - Read-only output directory: a tmpfs mounted read-only when root (root ignores permission
//!   bits), otherwise a directory with mode 0555.
#![cfg(unix)]
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, DType};

fn surgeon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_surgeon"));
    c.env("RAYON_NUM_THREADS", "2");
    c
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A synthetic Llama of about 60 MB (f32), big enough that writing it takes a while.
fn big_model(dir: &Path) -> PathBuf {
    let spec = SyntheticSpec {
        hidden_size: 512,
        num_layers: 6,
        num_heads: 8,
        num_kv_heads: 2,
        intermediate_size: 1536,
        vocab_size: 8000,
        dtype: DType::F32,
        ..SyntheticSpec::tiny()
    };
    let p = dir.join("in");
    spec.write(&p, Some(8_000_000)).unwrap();
    p
}

/// sha256 of every file below `dir`, by relative path.
fn digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            format!("{:x}", Sha256::digest(&bytes)),
        );
    }
    out
}

/// Every tensor's bytes (as written), for comparing two outputs whose headers differ only in
/// provenance.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let plan = open_hf_dir(dir).unwrap();
    plan.tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.materialize().unwrap().data))
        .collect()
}

fn temporaries(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".surgeon-tmp-"))
        .map(|e| e.path())
        .collect()
}

fn shard_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .unwrap_or(0)
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until the child's temporary next to `out` holds at least `shards` shard files (0: until
/// it exists), then sends `sig`. Returns false if the child finished first.
fn signal_when(child: &mut Child, out: &Path, shards: usize, sig: &str) -> bool {
    let tmp = out.parent().unwrap().join(format!(
        ".{}.surgeon-tmp-{}",
        out.file_name().unwrap().to_string_lossy(),
        child.id()
    ));
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if tmp.is_dir() && shard_files(&tmp) >= shards {
            signal(child, sig);
            return true;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn spawn(args: &[&str]) -> Child {
    surgeon()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGKILL at several points: afterwards the output is absent or equal to a complete reference
/// output, and the input is untouched. Then a rerun cleans the dead temporary and completes.
fn kill_at_several_points(what: &str, args: &[&str], input: &Path, reference: &Path) {
    let before = digest(input);
    let want = tensors(reference);
    let parent = reference.parent().unwrap();
    let mut mid_write = 0;
    for (i, shards) in [0usize, 1, 3, 6].into_iter().enumerate() {
        let out = parent.join(format!("{what}-killed-{i}"));
        let mut a = args.to_vec();
        a.extend(["--out", s(&out)]);
        let mut child = spawn(&a);
        let killed = signal_when(&mut child, &out, shards, "-KILL");
        let st = child.wait().unwrap();
        if killed && st.code().is_none() {
            mid_write += 1;
            // The output is absent, or (killed after the rename) complete.
            if out.exists() {
                assert_eq!(tensors(&out), want, "{what}: killed output differs");
            }
            // Rerun to the same output: the dead process's temporary is removed.
            let left = temporaries(parent);
            let o = surgeon().args(&a).output().unwrap();
            if out.exists() && o.status.code() == Some(1) {
                assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
            } else {
                assert!(o.status.success(), "{what}: {}", stderr(&o));
                for t in &left {
                    assert!(stderr(&o).contains(&format!("removed {}", t.display())));
                }
            }
            assert_eq!(tensors(&out), want, "{what}: rerun output differs");
        }
        assert!(
            temporaries(parent).is_empty(),
            "{what}: temporaries left after the rerun: {:?}",
            temporaries(parent)
        );
        assert_eq!(digest(input), before, "{what}: the input changed");
    }
    assert!(
        mid_write >= 2,
        "{what}: only {mid_write} kills landed mid-write"
    );
}

#[test]
fn sigkill_during_convert_and_upscale_leaves_absent_or_complete_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = big_model(tmp.path());
    // convert to bf16 (every tensor decoded and re-encoded), in 6 MB shards.
    let convert = ["convert", s(&m), "--dtype", "bf16", "--shard-size", "3MB"];
    let reference = tmp.path().join("convert-ref");
    let mut a = convert.to_vec();
    a.extend(["--out", s(&reference)]);
    let o = surgeon().args(&a).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    kill_at_several_points("convert", &convert, &m, &reference);

    // upscale 6 -> 10 layers (bytes copied file to file), in 8 MB shards.
    let upscale = [
        "upscale",
        s(&m),
        "--slices",
        "0..5,1..6",
        "--shard-size",
        "8MB",
    ];
    let reference = tmp.path().join("upscale-ref");
    let mut a = upscale.to_vec();
    a.extend(["--out", s(&reference)]);
    let o = surgeon().args(&a).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    kill_at_several_points("upscale", &upscale, &m, &reference);
}

#[test]
fn sigint_and_sigterm_remove_the_temporary_and_exit_130() {
    let tmp = tempfile::tempdir().unwrap();
    let m = big_model(tmp.path());
    let before = digest(&m);
    let mut landed = 0;
    for sig in ["-INT", "-TERM", "-INT"] {
        let out = tmp.path().join("out");
        let mut child = spawn(&[
            "convert",
            s(&m),
            "--dtype",
            "bf16",
            "--shard-size",
            "3MB",
            "--out",
            s(&out),
        ]);
        let sent = signal_when(&mut child, &out, 1, sig);
        let o = child.wait_with_output().unwrap();
        if !sent {
            // Finished before the signal: a complete output; try again.
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        landed += 1;
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(130), "{sig}: {e}");
        let name = if sig == "-INT" { "SIGINT" } else { "SIGTERM" };
        assert!(
            e.contains(&format!(
                "interrupted by {name}; removed the unfinished output"
            )),
            "{e}"
        );
        assert!(!out.exists());
        assert!(temporaries(tmp.path()).is_empty());
    }
    assert!(landed >= 2, "only {landed} signals landed mid-write");
    assert_eq!(digest(&m), before);
}

/// SIGINT during `import-gguf` of the real model (skipped when it is not fetched).
#[test]
fn sigint_during_import_gguf_removes_the_temporary() {
    let Ok(gguf) = surgeon_formats::gguf::smollm2_gguf_path() else {
        eprintln!("skipped: SmolLM2 GGUF not fetched (scripts/fetch-smollm2.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    let mut child = spawn(&["import-gguf", s(&gguf), "--out", s(&out)]);
    assert!(
        signal_when(&mut child, &out, 0, "-INT"),
        "finished too soon"
    );
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(temporaries(tmp.path()).is_empty());
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tmpfs mounted for the test (root only), unmounted on drop.
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Option<Mount> {
        if !is_root() {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs", s(dir)])
            .stderr(Stdio::null())
            .status()
            .ok()?;
        st.success().then(|| Mount(dir.to_path_buf()))
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn used_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        let md = e.metadata().unwrap();
                        if md.is_dir() {
                            walk(&e.path())
                        } else {
                            md.len()
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

#[test]
fn full_disk_gives_a_clear_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = big_model(tmp.path());
    let before = digest(&m);
    let mut simulated = 0;
    // A real full disk: a 24 MB tmpfs (the bf16 output needs about 30 MB).
    if let Some(mnt) = Mount::tmpfs(&tmp.path().join("small"), "size=24m") {
        let out = mnt.0.join("out");
        let o = surgeon()
            .args(["convert", s(&m), "--dtype", "bf16", "--out", s(&out)])
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains("No space left on device"), "{e}");
        assert!(e.contains(".surgeon-tmp-") || e.contains(s(&out)), "{e}");
        assert!(!out.exists());
        assert!(temporaries(&mnt.0).is_empty());
        assert_eq!(used_bytes(&mnt.0), 0, "bytes left on the full disk");
        simulated += 1;
    } else {
        eprintln!("not root or no mount: the full disk is simulated with ulimit -f only");
    }
    // The file-size limit: writes beyond 4 MB fail (EFBIG) as on a full disk.
    let out = tmp.path().join("limited");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 8192; exec \"$0\" convert {} --dtype bf16 --out {}",
            s(&m),
            s(&out)
        ))
        .arg(env!("CARGO_BIN_EXE_surgeon"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("File too large"), "{e}");
    assert!(!out.exists());
    assert!(temporaries(tmp.path()).is_empty());
    simulated += 1;
    assert!(simulated >= 1);
    assert_eq!(digest(&m), before);
}

#[test]
fn read_only_output_directory_gives_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    SyntheticSpec::tiny().write(&m, None).unwrap();
    let ro = tmp.path().join("ro");
    let (mount, want) = match Mount::tmpfs(&ro, "size=1m,ro") {
        Some(mnt) => (Some(mnt), "Read-only file system"),
        None => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            (None, "Permission denied")
        }
    };
    let out = ro.join("out");
    let o = surgeon()
        .args(["convert", s(&m), "--out", s(&out)])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(want), "{e}");
    assert!(e.contains(s(&ro)), "the message names the directory: {e}");
    assert!(!out.exists());
    drop(mount);
}
