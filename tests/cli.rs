//! The command line: exit codes, one-line errors, nothing left at the output path on failure.
mod common;

use common::*;
use std::path::Path;
use std::process::Output;

fn synth(dir: &Path) {
    let out = surgeon(&["synth", "--out", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    let out = surgeon(&["inspect", m.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["num_layers"], 2);
    assert_eq!(v["num_kv_heads"], 2);
    assert_eq!(v["parameters"], 106_816);
}

#[test]
fn convert_dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    let out_dir = tmp.path().join("out");
    let out = surgeon(&[
        "convert",
        m.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("model.norm.weight"), "{plan}");
    assert!(plan.contains("as bf16"), "{plan}");
    assert!(!out_dir.exists());
}

#[test]
fn errors_are_one_line_nonzero_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    // Existing output without --force.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let out = surgeon(&[
        "convert",
        m.to_str().unwrap(),
        "--out",
        existing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);

    // Output inside the input.
    let inside = m.join("sub");
    let out = surgeon(&[
        "convert",
        m.to_str().unwrap(),
        "--out",
        inside.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is inside the input"));
    assert!(!inside.exists());

    // Missing config.json.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        m.join("model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    let target = tmp.path().join("never");
    let out = surgeon(&[
        "convert",
        broken.to_str().unwrap(),
        "--out",
        target.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("missing config.json"), "{e}");
    assert!(!target.exists());
    // No temporary siblings left behind.
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("surgeon-tmp")));
}
