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

/// `heal --precision bf16 --checkpoint-activations --devices 0` trains and writes the model; more
/// devices than the CPU backend has, or an unknown precision, is a one-line error writing nothing.
#[test]
fn heal_takes_precision_checkpointing_and_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    // Word-level tokenizer: `t<i>` is token i of the synthetic model's 256.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256).map(|i| (format!("t{i}"), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = tmp.path().join("t.txt");
    let words: Vec<String> = (0..400)
        .map(|i| format!("t{}", 1 + (i * 37) % 255))
        .collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let heal = |out: &Path, extra: &[&str]| {
        let (m, text, out) = (s(&m), s(&text), s(out));
        let mut args = vec![
            "heal",
            &m,
            "--data",
            &text,
            "--out",
            &out,
            "--steps",
            "2",
            "--seq-len",
            "8",
            "--batch",
            "2",
        ];
        args.extend_from_slice(extra);
        surgeon(&args)
    };
    let out = tmp.path().join("h");
    let flags = [
        "--precision",
        "bf16",
        "--checkpoint-activations",
        "--devices",
        "0",
    ];
    let o = heal(&out, &flags);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists() && out.join("metrics.csv").exists());
    let bad = tmp.path().join("bad");
    fails(
        &heal(&bad, &["--devices", "0,1"]),
        "the cpu backend has one device",
        &bad,
    );
    let o = heal(&bad, &["--precision", "fp8"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown precision `fp8`"));
    assert!(!bad.exists());
}
