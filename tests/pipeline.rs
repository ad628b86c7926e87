//! `surgeon run`: recipe errors with YAML line numbers, dry-run snapshots of the example recipes,
//! skipping of finished steps and heal resume after a kill.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn surgeon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_surgeon"));
    c.env("RAYON_NUM_THREADS", "2");
    c
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    surgeon().current_dir(dir).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `recipe.yaml` into a temp dir and returns the error of `surgeon run --dry-run`.
fn recipe_error(text: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("recipe.yaml"), text).unwrap();
    let o = run_in(d.path(), &["run", "recipe.yaml", "--dry-run"]);
    assert!(!o.status.success(), "expected an error for:\n{text}");
    let e = stderr(&o);
    assert!(
        !d.path().join("work").exists(),
        "an invalid recipe wrote something"
    );
    e.trim().to_string()
}

const HEAD: &str = "vars:\n  m: model\nsteps:\n  - name: base\n    kind: synth\n";

#[test]
fn unknown_step_kind_points_to_its_line() {
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscal\n    model: ${{steps.base}}\n"
    ));
    assert!(
        e.starts_with(
            "error: recipe.yaml:7: unknown step kind \"upscal\" (did you mean `upscale`?)"
        ),
        "{e}"
    );
}

#[test]
fn unknown_option_points_to_its_line() {
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscale\n    model: ${{steps.base}}\n    layer: 4\n"
    ));
    assert!(
        e.starts_with(
            "error: recipe.yaml:9: unknown option `layer` for step kind `upscale` (did you mean `layers`?)"
        ),
        "{e}"
    );
}

#[test]
fn bad_option_value_from_clap_points_to_its_line() {
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscale\n    model: ${{steps.base}}\n    layers: many\n"
    ));
    assert!(
        e.starts_with(
            "error: recipe.yaml:9: step `deep` (upscale): invalid value 'many' for '--layers"
        ),
        "{e}"
    );
    // A missing required option: clap's message, at the step's line.
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscale\n    model: ${{steps.base}}\n"
    ));
    assert!(e.starts_with("error: recipe.yaml:6: step `deep` (upscale): the following required arguments were not provided: <--layers <S>|--slices <A..B,C..D>>"), "{e}");
}

#[test]
fn reference_to_missing_step_points_to_its_line() {
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscale\n    layers: 4\n    model: ${{steps.bsae}}\n"
    ));
    assert!(
        e.starts_with(
            "error: recipe.yaml:9: step `deep` refers to step `bsae`, which does not exist (did you mean `base`?)"
        ),
        "{e}"
    );
    let e = recipe_error(&format!(
        "{HEAD}  - name: deep\n    kind: upscale\n    layers: 4\n    model: ${{vars.nope}}\n"
    ));
    assert!(
        e.starts_with("error: recipe.yaml:9: step `deep`: unknown variable `nope`"),
        "{e}"
    );
}

#[test]
fn cycles_and_forward_references_point_to_their_line() {
    let e = recipe_error(
        "steps:\n  - name: a\n    kind: convert\n    model: ${steps.b}\n  - name: b\n    kind: convert\n    model: ${steps.a}\n",
    );
    assert!(
        e.starts_with("error: recipe.yaml:4: cycle between steps: a -> b -> a"),
        "{e}"
    );
    let e = recipe_error(
        "steps:\n  - name: a\n    kind: convert\n    model: ${steps.b}\n  - name: b\n    kind: synth\n",
    );
    assert!(
        e.starts_with(
            "error: recipe.yaml:4: step `a` refers to step `b`, which comes later (line 5)"
        ),
        "{e}"
    );
    let e = recipe_error("steps:\n  - name: a\n    kind: convert\n    model: ${steps.a}\n");
    assert!(
        e.starts_with("error: recipe.yaml:4: step `a` refers to itself"),
        "{e}"
    );
}

#[test]
fn other_recipe_errors() {
    let e = recipe_error(&format!("{HEAD}  - name: base\n    kind: synth\n"));
    assert!(
        e.starts_with("error: recipe.yaml:6: step `base` is defined twice (first on line 4)"),
        "{e}"
    );
    let e = recipe_error("steps:\n  - name: a\n    kind: convert\n    model: m\n    force: true\n");
    assert!(
        e.starts_with("error: recipe.yaml:5: `force` is managed by `surgeon run`"),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("r.yaml"), HEAD).unwrap();
    let o = run_in(d.path(), &["run", "r.yaml", "--dry-run", "--set", "n=1"]);
    assert!(
        stderr(&o).starts_with("error: --set n: r.yaml has no variable `n` (vars: m)"),
        "{}",
        stderr(&o)
    );
    let e = recipe_error("steps:\n  - name: a\n  kind: synth\n");
    assert!(e.starts_with("error: recipe.yaml:3: not valid YAML"), "{e}");
}

/// Dry-run output of every example recipe, with the model variable pointing to a small
/// synthetic checkpoint so that the first step's plan is real.
#[test]
fn example_recipes_dry_run_snapshots() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let o = run_in(
        d.path(),
        &["synth", "--preset", "tiny", "--layers", "8", "--out", "m"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::create_dir_all(d.path().join("examples/recipes")).unwrap();
    let mut names: Vec<PathBuf> = std::fs::read_dir(root.join("examples/recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5);
    for p in names {
        let rel = format!(
            "examples/recipes/{}",
            p.file_name().unwrap().to_string_lossy()
        );
        std::fs::copy(&p, d.path().join(&rel)).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let mut args = vec!["run", rel.as_str(), "--dry-run"];
        if text.contains("\n  model:") {
            args.extend(["--set", "model=m"]);
        }
        if text.contains("\n  gguf:") {
            args.extend(["--set", "gguf=missing.gguf"]);
        }
        let o = run_in(d.path(), &args);
        assert!(o.status.success(), "{rel}: {}", stderr(&o));
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(
            format!("dry_run_{stem}"),
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(
            !d.path().join("work").exists(),
            "{rel}: the dry run wrote its workdir"
        );
    }
}

/// A 256-token character-level tokenizer for the synthetic model (vocab 256).
fn write_char_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0u32..256)
        .map(|i| (char::from_u32(i).unwrap().to_string(), i.into()))
        .collect();
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
}

fn text(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "Line {i}: the quick brown fox jumps over the lazy dog {}.\n",
                i * 7 % 13
            )
        })
        .collect()
}

const RESUME_RECIPE: &str = "\
workdir: work
vars:
  steps: 2000
steps:
  - name: base
    kind: convert
    model: fixture
  - name: healed
    kind: heal
    model: ${steps.base}
    data: train.txt
    eval_data: heldout.txt
    steps: ${vars.steps}
    seq_len: 32
    batch: 2
    lr: 1e-3
    save_every: 50
  - name: eval
    kind: eval
    model: ${steps.healed}
    data: heldout.txt
    window: 32
";

fn latest_checkpoint(out: &Path) -> Option<u64> {
    std::fs::read_dir(out.join("checkpoints"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("trainer_state").exists())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .max()
}

#[cfg(unix)]
#[test]
fn killed_pipeline_skips_finished_steps_and_resumes_healing() {
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let o = run_in(dir, &["synth", "--preset", "tiny", "--out", "fixture"]);
    assert!(o.status.success(), "{}", stderr(&o));
    write_char_tokenizer(&dir.join("fixture"));
    std::fs::write(dir.join("train.txt"), text(400)).unwrap();
    std::fs::write(dir.join("heldout.txt"), text(40)).unwrap();
    std::fs::write(dir.join("r.yaml"), RESUME_RECIPE).unwrap();

    // First run: kill the whole process group (runner and heal) once a checkpoint exists.
    let mut child = surgeon()
        .current_dir(dir)
        .args(["run", "r.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let healed = dir.join("work/healed");
    loop {
        if latest_checkpoint(&healed).is_some() {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the pipeline ended ({st}) before it could be killed; use more heal steps");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pgid = child.id().to_string();
    Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    child.wait().unwrap();
    let killed_at = latest_checkpoint(&healed).unwrap();
    assert!(!dir.join("work/.surgeon/eval.json").exists());

    // Second run: base is skipped, healing continues from its checkpoint, eval runs.
    let o = run_in(dir, &["run", "r.yaml"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("== base: up to date, skipped"), "{e}");
    assert!(
        e.contains("== healed (resuming from its last checkpoint):"),
        "{e}"
    );
    assert!(
        e.contains(&format!("--resume={}", Path::new("work/healed").display())),
        "{e}"
    );
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("work/.surgeon/healed.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["resumed"], true);
    assert!(killed_at < 2000, "killed after the last checkpoint");
    let ev: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("work/.surgeon/eval.json")).unwrap(),
    )
    .unwrap();
    assert!(ev["eval"]["ppl"].as_f64().unwrap() > 1.0);
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(summary.contains("perplexity"), "{summary}");

    // Third run: everything is up to date.
    let o = run_in(dir, &["run", "r.yaml"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    for s in ["base", "healed", "eval"] {
        assert!(e.contains(&format!("== {s}: up to date, skipped")), "{e}");
    }
    // Changing an option reruns that step and the ones after it, not the ones before.
    let o = run_in(dir, &["run", "r.yaml", "--set", "steps=2001", "--dry-run"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("== step base (convert), line 5: up to date, would skip"),
        "{out}"
    );
    assert!(
        out.contains("== step healed (heal), line 8: would run"),
        "{out}"
    );
    assert!(
        out.contains("== step eval (eval), line 18: would run"),
        "{out}"
    );
}

/// Tried as a new user would: every example recipe dry-runs with no `SURGEON_*` variable set, and
/// the demo's model defaults to where scripts/fetch-smollm2.sh puts it.
#[test]
fn example_recipes_dry_run_without_environment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(root.join("examples/recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        n += 1;
        let o = surgeon()
            .current_dir(d.path())
            .env_remove("SURGEON_CACHE")
            .env("HOME", &home)
            .args(["run", p.to_str().unwrap(), "--dry-run"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
    }
    assert!(n >= 5);
    let demo = root.join("examples/recipes/demo.yaml");
    let dry = |cache: Option<&str>| {
        let mut c = surgeon();
        c.current_dir(d.path()).env("HOME", &home);
        match cache {
            Some(v) => c.env("SURGEON_CACHE", v),
            None => c.env_remove("SURGEON_CACHE"),
        };
        let o = c
            .args(["run", demo.to_str().unwrap(), "--dry-run"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let want = format!(
        "var gguf = {}/.cache/surgeon/SmolLM2-135M-Instruct.Q4_1.gguf\n",
        home.display()
    );
    assert!(dry(None).contains(&want), "{}", dry(None));
    // Set but empty counts as unset, as in the shell.
    assert!(dry(Some("")).contains(&want));
    assert!(dry(Some("/models")).contains("var gguf = /models/SmolLM2-135M-Instruct.Q4_1.gguf\n"));
    // Without a default, a missing variable is still an error that says how to give one.
    std::fs::write(
        d.path().join("r.yaml"),
        "vars:\n  m: ${env.SURGEON_TEST_UNSET_VAR}/x\nsteps:\n  - name: a\n    kind: convert\n    model: ${vars.m}\n",
    )
    .unwrap();
    let o = run_in(d.path(), &["run", "r.yaml", "--dry-run"]);
    assert!(
        stderr(&o).contains(
            "environment variable `SURGEON_TEST_UNSET_VAR` is not set (or give a default: `${env.SURGEON_TEST_UNSET_VAR:-VALUE}`)"
        ),
        "{}",
        stderr(&o)
    );
}

/// A step's inputs are identified by content: touching an input (new mtime, same bytes) keeps the
/// step up to date; changing one byte reruns it. Hashes are cached in the workdir.
#[test]
fn input_identity_is_content_not_mtime() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let o = run_in(dir, &["synth", "--preset", "tiny", "--out", "fixture"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(
        dir.join("r.yaml"),
        "workdir: work\nsteps:\n  - name: copy\n    kind: convert\n    model: fixture\n    dtype: f32\n",
    )
    .unwrap();
    let o = run_in(dir, &["run", "r.yaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cache: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("work/.surgeon/hashes.json")).unwrap(),
    )
    .unwrap();
    let files = std::fs::read_dir(dir.join("fixture")).unwrap().count();
    assert_eq!(cache.as_object().unwrap().len(), files, "{cache}");
    let state = || {
        let o = run_in(dir, &["run", "r.yaml", "--dry-run"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines()
            .find(|l| l.starts_with("== step copy"))
            .unwrap()
            .to_string()
    };
    assert!(state().ends_with("up to date, would skip"), "{}", state());
    // Same bytes, a new mtime (as `touch` or a fresh checkout gives).
    let cfg = dir.join("fixture/config.json");
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&cfg)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(state().ends_with("up to date, would skip"), "{}", state());
    // One byte changed (same size): the step reruns.
    let mut bytes = std::fs::read(&cfg).unwrap();
    let i = bytes.iter().position(|&b| b == b' ').unwrap();
    bytes[i] = b'\t';
    std::fs::write(&cfg, &bytes).unwrap();
    assert!(state().ends_with("would run"), "{}", state());
}
