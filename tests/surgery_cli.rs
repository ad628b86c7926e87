//! `surgeon upscale`, `surgeon expand` and `surgeon drop-layers` end to end: outputs, dry runs, and
//! every user error (one line on stderr, non-zero exit, nothing written).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, DType};

fn surgeon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .args(args)
        .output()
        .expect("run surgeon")
}

/// An 8-layer synthetic Llama in `dir/in`.
fn model(dir: &Path) -> PathBuf {
    let spec = SyntheticSpec {
        num_layers: 8,
        hidden_size: 16,
        num_heads: 2,
        num_kv_heads: 1,
        intermediate_size: 32,
        vocab_size: 32,
        dtype: DType::BF16,
        ..SyntheticSpec::tiny()
    };
    let p = dir.join("in");
    spec.write(&p, None).unwrap();
    p
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "surgeon failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts a one-line error containing `want`, a non-zero exit, and no output directory.
fn fails(out: &Output, want: &str, out_dir: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(want), "`{want}` not in: {err}");
    assert!(!out_dir.exists(), "{} was written", out_dir.display());
    let parent = out_dir.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("surgeon-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn upscale_writes_solar_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let out = dir.path().join("up");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&surgeon(&[
        "upscale",
        &s(&m),
        "--layers",
        "12",
        "--out",
        &s(&out),
    ]));
    let plan = open_hf_dir(&out).unwrap();
    assert_eq!(plan.arch.num_layers(), 12);
    assert_eq!(
        plan.arch.surgeon.history,
        vec!["upscale: depth up-scaling 8 -> 12 layers, slices 0..6,2..8"]
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("\"num_hidden_layers\": 12"), "{config}");

    // The same stack via --slices, as a dry run: a plan on stdout, nothing written.
    let dry = dir.path().join("dry");
    let text = ok(&surgeon(&[
        "upscale",
        &s(&m),
        "--slices",
        "0..6,2..8",
        "--out",
        &s(&dry),
        "--dry-run",
    ]));
    assert!(text.starts_with("model llama: 12 layers"), "{text}");
    assert!(text.contains("history: upscale: depth up-scaling 8 -> 12 layers, slices 0..6,2..8"));
    let line = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("model.layers.6.input_layernorm.weight ")
        })
        .unwrap_or_else(|| panic!("no layer 6 in {text}"));
    assert!(
        line.ends_with("= load(model.safetensors: model.layers.2.input_layernorm.weight, bf16)"),
        "{line}"
    );
    assert!(!dry.exists());
}

#[test]
fn expand_and_drop_write_models() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ex = dir.path().join("ex");
    ok(&surgeon(&[
        "expand",
        &s(&m),
        "--add",
        "4",
        "--out",
        &s(&ex),
    ]));
    let plan = open_hf_dir(&ex).unwrap();
    assert_eq!(plan.arch.num_layers(), 12);
    assert_eq!(plan.arch.surgeon.new_layers, vec![2, 5, 8, 11]);
    let config = std::fs::read_to_string(ex.join("config.json")).unwrap();
    assert!(config.contains("\"new_layers\""), "{config}");

    let ex2 = dir.path().join("ex2");
    ok(&surgeon(&[
        "expand",
        &s(&m),
        "--add",
        "3",
        "--positions",
        "0,5,2",
        "--out",
        &s(&ex2),
    ]));
    assert_eq!(
        open_hf_dir(&ex2).unwrap().arch.surgeon.new_layers,
        vec![1, 4, 8]
    );

    let dr = dir.path().join("dr");
    ok(&surgeon(&[
        "drop-layers",
        &s(&m),
        "--layers",
        "7,0",
        "--out",
        &s(&dr),
    ]));
    let plan = open_hf_dir(&dr).unwrap();
    assert_eq!(plan.arch.num_layers(), 6);
    assert_eq!(
        plan.arch.surgeon.history,
        vec!["drop-layers: removed layers 0,7 (8 -> 6 layers)"]
    );
}

#[test]
fn user_errors_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let m = m.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        // Layer indices out of range.
        (
            &["drop-layers", m, "--layers", "3,8"],
            "layer 8 is out of range: the model has 8 layers (0..8)",
        ),
        (
            &["expand", m, "--add", "1", "--positions", "8"],
            "layer 8 is out of range",
        ),
        (
            &["upscale", m, "--slices", "0..6,2..9"],
            "slice 2..9 is out of range: the model has 8 layers (0..8)",
        ),
        // Empty or reversed slices.
        (
            &["upscale", m, "--slices", "0..6,4..4"],
            "slice 4..4 is empty",
        ),
        (
            &["upscale", m, "--slices", "6..2"],
            "slice 6..2 is reversed",
        ),
        (
            &["upscale", m, "--slices", "0:4"],
            "is not of the form A..B",
        ),
        // P not dividing n without --positions.
        (
            &["expand", m, "--add", "3"],
            "cannot add 3 blocks to 8 layers evenly: 3 does not divide 8 (give --positions)",
        ),
        (
            &["expand", m, "--add", "2", "--positions", "1"],
            "--positions lists 1 layer but --add is 2",
        ),
        // Dropping every layer.
        (
            &["drop-layers", m, "--layers", "0,1,2,3,4,5,6,7"],
            "cannot drop all 8 layers",
        ),
        // S invalid: odd, <= n, >= 2n.
        (
            &["upscale", m, "--layers", "11"],
            "cannot up-scale 8 layers to 11",
        ),
        (
            &["upscale", m, "--layers", "8"],
            "cannot up-scale 8 layers to 8",
        ),
        (
            &["upscale", m, "--layers", "16"],
            "cannot up-scale 8 layers to 16",
        ),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        args.extend(["--out", o]);
        fails(&surgeon(&args), want, &out);
    }
}
