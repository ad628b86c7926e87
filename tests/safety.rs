//! Data safety across every command (issue 21): nothing a user owns is replaced or removed,
//! no panic on a mismatched tokenizer, no NaN or infinity written, messages that say what is wrong.
//! Signals, SIGKILL, a full disk and a read-only directory are in `tests/crash.rs`.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, write_model, DType, HostTensor, Source, WriteOptions};

fn surgeon(args: &[&str]) -> Output {
    surgeon_in(Path::new("."), args)
}

fn surgeon_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .expect("run surgeon")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "surgeon failed: {}", stderr(o));
}

/// Asserts exit status 1 (an error, not a panic's 101) and a one-line message containing `want`.
fn fails(o: &Output, want: &str) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected an error, got: {e}");
    assert!(e.starts_with("error: "), "{e}");
    assert!(e.contains(want), "`{want}` not in: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn synth(dir: &Path) {
    ok(&surgeon(&["synth", "--out", s(dir)]));
}

/// A folder of the user's: two files surgeon must never touch.
fn user_folder(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "precious").unwrap();
    std::fs::write(dir.join("data.bin"), [1u8, 2, 3]).unwrap();
    dir.to_path_buf()
}

fn assert_untouched(dir: &Path) {
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "precious"
    );
    assert_eq!(std::fs::read(dir.join("data.bin")).unwrap(), [1u8, 2, 3]);
}

fn no_leftovers(parent: &Path) {
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".surgeon-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---- 1. synth never replaces what it did not write ----

#[test]
fn synth_refuses_existing_folders_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = user_folder(&tmp.path().join("mine"));
    let e = fails(
        &surgeon(&["synth", "--out", s(&mine)]),
        "already exists (use --force to replace it)",
    );
    assert!(e.contains(s(&mine)), "{e}");
    fails(
        &surgeon(&["synth", "--out", s(&mine), "--force"]),
        "was not written by surgeon",
    );
    assert_untouched(&mine);

    let file = tmp.path().join("file.txt");
    std::fs::write(&file, "keep").unwrap();
    fails(
        &surgeon(&["synth", "--out", s(&file), "--force"]),
        "is not a directory surgeon wrote",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    no_leftovers(tmp.path());

    // Its own output is replaced with --force (and only with it).
    let m = tmp.path().join("m");
    synth(&m);
    fails(&surgeon(&["synth", "--out", s(&m)]), "already exists");
    ok(&surgeon(&[
        "synth",
        "--out",
        s(&m),
        "--force",
        "--layers",
        "3",
    ]));
    assert_eq!(open_hf_dir(&m).unwrap().arch.num_layers(), 3);
    no_leftovers(tmp.path());
}

// ---- 2. surgeon run replaces only what its steps wrote ----

#[test]
fn run_never_replaces_a_folder_its_steps_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A step named `data` whose default output is the user's data folder.
    let data = user_folder(&d.join("work/data"));
    std::fs::write(
        d.join("r.yaml"),
        "workdir: work\nsteps:\n  - name: data\n    kind: synth\n",
    )
    .unwrap();
    let o = surgeon_in(d, &["run", "r.yaml"]);
    let e = fails(&o, "already exists and was not written by this step");
    assert!(e.contains("work/data"), "{e}");
    assert_untouched(&data);

    // An explicit `out:` pointing at a user's folder.
    let mine = user_folder(&d.join("mine"));
    std::fs::write(
        d.join("r2.yaml"),
        "workdir: work2\nsteps:\n  - name: base\n    kind: synth\n    out: mine\n",
    )
    .unwrap();
    let e = fails(&surgeon_in(d, &["run", "r2.yaml"]), "mine");
    assert!(e.contains("was not written by this step"), "{e}");
    assert_untouched(&mine);

    // What a step wrote itself is replaced when the step changes.
    std::fs::write(
        d.join("r3.yaml"),
        "workdir: work3\nvars:\n  n: 2\nsteps:\n  - name: base\n    kind: synth\n    layers: ${vars.n}\n",
    )
    .unwrap();
    ok(&surgeon_in(d, &["run", "r3.yaml"]));
    ok(&surgeon_in(d, &["run", "r3.yaml", "--set", "n=3"]));
    assert_eq!(
        open_hf_dir(&d.join("work3/base"))
            .unwrap()
            .arch
            .num_layers(),
        3
    );
}

// ---- 3. heal refuses an output that holds or is inside an input, even with --force ----

#[test]
fn heal_refuses_outputs_holding_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = d.join("m");
    synth(&m);
    let teacher = d.join("teacher");
    synth(&teacher);
    let folder = user_folder(&d.join("folder"));
    let train = folder.join("train.txt");
    std::fs::write(&train, "some text").unwrap();
    let heal = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "heal",
            s(&m),
            "--data",
            s(&train),
            "--out",
            s(out),
            "--steps",
            "1",
            "--force",
        ];
        args.extend_from_slice(extra);
        surgeon(&args)
    };
    let e = fails(&heal(&folder, &[]), "holds the input");
    assert!(e.contains("train.txt"), "{e}");
    fails(&heal(&teacher, &["--teacher", s(&teacher)]), "is the input");
    fails(&heal(&m.join("healed"), &[]), "is inside the input");
    fails(&heal(&m, &[]), "is the input");
    assert_untouched(&folder);
    assert_eq!(std::fs::read_to_string(&train).unwrap(), "some text");
    assert!(open_hf_dir(&teacher).is_ok() && open_hf_dir(&m).is_ok());
    assert!(!m.join("healed").exists());
    // A folder surgeon did not write is not replaced either.
    let other = user_folder(&d.join("other"));
    fails(&heal(&other, &[]), "was not written by surgeon");
    assert_untouched(&other);
}

// ---- 4. a tokenizer with ids beyond vocab_size is an error at load, not a panic ----

/// A word-level tokenizer whose `beyond` token has id 300 (the tiny model has 256 rows).
fn write_wide_tokenizer(dir: &Path) {
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "beyond": 300},
                  "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
}

#[test]
fn tokenizer_beyond_the_vocabulary_is_an_error_naming_both_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    write_wide_tokenizer(&m);
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "hello beyond hello beyond ".repeat(50)).unwrap();
    let want =
        "tokenizer.json has token ids up to 300 (3 tokens) but config.json's vocab_size is 256";
    fails(
        &surgeon(&["generate", s(&m), "--prompt", "hello beyond"]),
        want,
    );
    fails(&surgeon(&["eval", s(&m), "--data", s(&text)]), want);
    let out = tmp.path().join("dropped");
    fails(
        &surgeon(&[
            "drop-layers",
            s(&m),
            "--count",
            "1",
            "--data",
            s(&text),
            "--out",
            s(&out),
        ]),
        want,
    );
    fails(
        &surgeon(&[
            "heal",
            s(&m),
            "--data",
            s(&text),
            "--out",
            s(&tmp.path().join("h")),
            "--steps",
            "1",
            "--seq-len",
            "8",
            "--batch",
            "1",
        ]),
        want,
    );
    assert!(!out.exists() && !tmp.path().join("h").exists());
}

// ---- 5. numbers: validated flags and config fields; no NaN/inf written ----

#[test]
fn non_finite_or_out_of_range_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "x").unwrap();
    let out = tmp.path().join("out");
    let heal = |flag: &str, value: &str| {
        surgeon(&[
            "heal",
            s(&m),
            "--data",
            s(&text),
            "--out",
            s(&out),
            "--steps",
            "1",
            flag,
            value,
        ])
    };
    fails(
        &heal("--weight-decay", "NaN"),
        "weight_decay must be in [0, 1], got NaN",
    );
    fails(
        &heal("--lr", "1e30"),
        "lr must be positive and at most 1, in (0, 1], got 1000000000000000000000000000000",
    );
    fails(
        &heal("--lr", "NaN"),
        "lr must be positive and at most 1, in (0, 1]",
    );
    fails(&heal("--clip", "NaN"), "clip must be positive and finite");
    fails(&heal("--kd-weight", "NaN"), "kd_weight must be in [0, 1]");
    fails(&heal("--aux-coef", "inf"), "aux_coef must be finite");
    fails(
        &surgeon(&[
            "heal",
            s(&m),
            "--data",
            s(&text),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--teacher",
            s(&m),
            "--temperature",
            "NaN",
        ]),
        "temperature must be positive and finite",
    );
    for std in ["NaN", "inf", "-1"] {
        fails(
            &surgeon(&[
                "moe",
                s(&m),
                "--out",
                s(&out),
                "--experts",
                "2",
                "--top-k",
                "1",
                "--method",
                "upcycle",
                &format!("--router-std={std}"),
            ]),
            "--router-std must be a finite number in [0, 1]",
        );
    }
    for (flag, value, want) in [
        (
            "--temperature",
            "NaN",
            "--temperature must be a finite number >= 0",
        ),
        (
            "--temperature",
            "-1",
            "--temperature must be a finite number >= 0",
        ),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0"),
        ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
        ("--top-p", "NaN", "--top-p must be in (0, 1]"),
    ] {
        fails(
            &surgeon(&[
                "generate",
                s(&m),
                "--prompt",
                "hi",
                &format!("{flag}={value}"),
            ]),
            want,
        );
    }
    assert!(!out.exists());
}

#[test]
fn config_numbers_out_of_range_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    let config = m.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    for (field, value) in [("rope_theta", -5.0), ("rms_norm_eps", -1.0)] {
        let mut v = original.clone();
        if field == "rope_theta" && v.get("rope_parameters").is_some() {
            v["rope_parameters"]["rope_theta"] = value.into();
        } else {
            v[field] = value.into();
        }
        std::fs::write(&config, v.to_string()).unwrap();
        let text = tmp.path().join("t.txt");
        std::fs::write(&text, "x").unwrap();
        for args in [
            vec!["eval", s(&m), "--data", s(&text)],
            vec!["inspect", s(&m)],
        ] {
            let e = fails(&surgeon(&args), "must be");
            assert!(e.contains(field) && e.contains("config.json"), "{e}");
        }
    }
}

/// A tiny model with one tensor holding values beyond f16's range (and none beyond bf16's).
fn model_with_large_values(dir: &Path) -> PathBuf {
    let mut plan = SyntheticSpec::tiny().plan();
    let name = "model.layers.1.mlp.down_proj.weight";
    let shape = plan.tensors[name].shape();
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.01).collect();
    v[3] = 1e6;
    v[10] = -70000.0;
    v[11] = 65530.0; // above the midpoint 65520 of 65504 and 2^16: rounds to f16 infinity
    plan.tensors.get_mut(name).unwrap().source =
        Source::inline("large", HostTensor::from_f32(shape, &v));
    let p = dir.join("large");
    write_model(&plan, &p, &WriteOptions::default()).unwrap();
    p
}

#[test]
fn dtype_overflow_is_refused_unless_allowed_then_clamped() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with_large_values(tmp.path());
    let out = tmp.path().join("half");
    let e = fails(
        &surgeon(&["convert", s(&m), "--out", s(&out), "--dtype", "f16"]),
        "converting to f16 overflows: 3 values in 1 tensor (first: `model.layers.1.mlp.down_proj.weight`, 3 values)",
    );
    assert!(e.contains("--allow-overflow"), "{e}");
    assert!(!out.exists());
    no_leftovers(tmp.path());
    // bf16 holds these values: no complaint.
    ok(&surgeon(&[
        "convert",
        s(&m),
        "--out",
        s(&tmp.path().join("bf")),
        "--dtype",
        "bf16",
    ]));
    let o = surgeon(&[
        "convert",
        s(&m),
        "--out",
        s(&out),
        "--dtype",
        "f16",
        "--allow-overflow",
    ]);
    ok(&o);
    assert!(
        stderr(&o).contains("warning: clamped 3 values in 1 tensor"),
        "{}",
        stderr(&o)
    );
    let plan = open_hf_dir(&out).unwrap();
    let (_, v) = plan
        .load_f32("model.layers.1.mlp.down_proj.weight")
        .unwrap();
    assert_eq!((v[3], v[10], v[11]), (65504.0, -65504.0, 65504.0));
    for name in plan.tensors.keys() {
        let (_, v) = plan.load_f32(name).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn nan_weights_are_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plan = SyntheticSpec::tiny().plan();
    let name = "model.norm.weight";
    let mut v = vec![1.0f32; 64];
    v[5] = f32::NAN;
    plan.tensors.get_mut(name).unwrap().source =
        Source::inline("broken", HostTensor::from_f32(vec![64], &v));
    let out = tmp.path().join("nan");
    for allow_overflow in [false, true] {
        let opts = WriteOptions {
            allow_overflow,
            ..Default::default()
        };
        let e = write_model(&plan, &out, &opts).unwrap_err().to_string();
        assert!(
            e.contains("tensor `model.norm.weight`: 1 of 64 values are NaN or infinite"),
            "{e}"
        );
        assert!(!out.exists());
    }
    no_leftovers(tmp.path());
    // A NaN router std cannot reach the writer through the library either.
    let base = tmp.path().join("m");
    SyntheticSpec::tiny().write(&base, None).unwrap();
    let plan = open_hf_dir(&base).unwrap();
    let mut opts =
        surgeon_surgery::moe::MoeOptions::new(surgeon_surgery::moe::MoeMethod::Upcycle, 2, 1);
    opts.router = surgeon_surgery::moe::RouterInit::Random { std: f32::NAN };
    let e = surgeon_surgery::moe::check_request(&plan.arch, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`router_std`"), "{e}");
    let _ = DType::F16;
}

// ---- 7. messages ----

#[test]
fn mistyped_local_path_is_not_sent_to_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("out")).unwrap();
    let o = surgeon_in(tmp.path(), &["inspect", "out/typo"]);
    let e = fails(&o, "out/typo: no such file or directory");
    assert!(e.contains("`out` is a local directory"), "{e}");
    assert!(!e.to_lowercase().contains("http"), "{e}");
    // Something that may be a Hub id says both what was looked for locally and on the Hub.
    let o = surgeon_in(tmp.path(), &["inspect", "nosuchorg/nosuchmodel"]);
    fails(&o, "no such local file or directory, and as a Hub id");
}

#[test]
fn import_gguf_on_a_directory_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    synth(&m);
    fails(
        &surgeon(&["import-gguf", s(&m), "--out", s(&tmp.path().join("x"))]),
        "is a directory, not a .gguf file",
    );
}
