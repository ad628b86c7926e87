//! `surgeon run`: a recipe of CLI steps, with skipping of finished steps, heal resume and a summary.
//!
//! Each step is validated with the real `Cli` parser (see [`recipe`]) and run as a child
//! `surgeon <kind> ...` process (the same parser and the same `run` function as typed by hand).
//! A child process keeps `heal`'s Ctrl-C checkpointing and exit code, and lets `eval --json`
//! be captured into the step record.
pub mod recipe;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub use recipe::{Recipe, Step};

/// What `<workdir>/.surgeon/<step>.json` holds.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct StepRecord {
    pub name: String,
    pub kind: String,
    /// Hash of kind + resolved options + input identities (content hashes of input files, upstream
    /// steps' hashes) + surgeon version.
    pub hash: String,
    /// `running` while the step runs (an interrupted run leaves it), `done` after success.
    pub status: String,
    pub argv: Vec<String>,
    pub out: Option<PathBuf>,
    pub seconds: f64,
    pub parameters: Option<u64>,
    /// `surgeon eval --json` output for eval steps.
    pub eval: Option<serde_json::Value>,
    pub resumed: bool,
}

/// Options of one `surgeon run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    /// Run from this step on, even if earlier... (earlier steps must be done).
    pub from: Option<String>,
    /// The `surgeon` executable for the steps (default: this executable).
    pub exe: Option<PathBuf>,
}

/// One line of the summary table.
#[derive(Debug, Clone)]
pub struct SummaryRow {
    pub step: String,
    pub kind: String,
    pub status: String,
    pub out: String,
    pub seconds: Option<f64>,
    pub parameters: Option<u64>,
    pub ppl: Option<f64>,
}

fn record_path(r: &Recipe, step: &str) -> PathBuf {
    r.workdir.join(".surgeon").join(format!("{step}.json"))
}

fn read_record(r: &Recipe, step: &str) -> Option<StepRecord> {
    let s = std::fs::read_to_string(record_path(r, step)).ok()?;
    serde_json::from_str(&s).ok()
}

fn write_record(r: &Recipe, rec: &StepRecord) -> Result<()> {
    let p = record_path(r, &rec.name);
    std::fs::create_dir_all(p.parent().unwrap())?;
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(rec)? + "\n")?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Content hashes of input files, cached by (path, size, mtime) in `<workdir>/.surgeon/hashes.json`
/// so that a large file is read once, not on every `surgeon run`.
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: BTreeMap<String, HashEntry>,
    dirty: bool,
    /// Files whose content was read (not found in the cache) since the cache was opened.
    pub hashed: Vec<PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct HashEntry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

impl HashCache {
    /// The cache of a workdir (empty if it does not exist or cannot be read).
    pub fn open(workdir: &Path) -> Self {
        let file = workdir.join(".surgeon").join("hashes.json");
        let entries = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        HashCache {
            file: Some(file),
            entries,
            ..Default::default()
        }
    }

    /// The SHA-256 of a file's content, from the cache when its size and mtime are unchanged.
    pub fn file_hash(&mut self, path: &Path) -> std::io::Result<String> {
        let md = std::fs::metadata(path)?;
        let mtime_ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        if let Some(e) = self.entries.get(&key) {
            if e.size == md.len() && e.mtime_ns == mtime_ns {
                return Ok(e.sha256.clone());
            }
        }
        if md.len() >= 1 << 28 {
            eprintln!(
                "hashing {} ({} MB; once: the hash is cached by size and mtime)",
                path.display(),
                md.len() >> 20
            );
        }
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(path)?;
        std::io::copy(&mut f, &mut h)?;
        let sha256: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.hashed.push(path.to_path_buf());
        self.entries.insert(
            key,
            HashEntry {
                size: md.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        self.dirty = true;
        Ok(sha256)
    }

    /// Writes the cache back (atomically) if it changed.
    pub fn save(&mut self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        std::fs::create_dir_all(file.parent().unwrap())
            .with_context(|| format!("creating {}", file.display()))?;
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&self.entries)? + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
        self.dirty = false;
        Ok(())
    }
}

/// Identity of a file or directory input: the relative path and content hash of every file below it
/// (modification times do not matter: touching or copying an input does not rerun a step).
fn path_identity(p: &Path, h: &mut Sha256, cache: &mut HashCache) {
    let mut files = vec![];
    let mut stack = vec![p.to_path_buf()];
    while let Some(q) = stack.pop() {
        let Ok(md) = std::fs::metadata(&q) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&q) {
                for e in rd.flatten() {
                    stack.push(e.path());
                }
            }
        } else {
            let rel = q.strip_prefix(p).unwrap_or(&q).display().to_string();
            let content = cache
                .file_hash(&q)
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            files.push((rel, content));
        }
    }
    files.sort();
    for f in files {
        h.update(format!("{}\0{}\n", f.0, f.1));
    }
}

/// The step's content hash, given the hashes of the steps it reads.
pub fn step_hash(
    step: &Step,
    upstream: &BTreeMap<String, String>,
    cache: &mut HashCache,
) -> String {
    let mut h = Sha256::new();
    h.update(format!("surgeon {}\n", env!("CARGO_PKG_VERSION")));
    for a in &step.argv {
        h.update(a.as_bytes());
        h.update(b"\0");
    }
    h.update(format!("out={:?}\n", step.out));
    for d in &step.deps {
        h.update(format!(
            "dep {d}={}\n",
            upstream.get(d).cloned().unwrap_or_default()
        ));
    }
    for v in &step.plain_values {
        let p = Path::new(v);
        if !v.is_empty() && p.exists() {
            h.update(format!("input {v}\n"));
            path_identity(p, &mut h, cache);
        }
    }
    let d = h.finalize();
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn command_line(step: &Step, extra: &[String]) -> String {
    let mut w = vec!["surgeon".to_string()];
    w.extend(step.argv.iter().map(|a| shell_word(a)));
    if let Some(o) = &step.out {
        w.push(format!("--out={}", shell_word(&o.display().to_string())));
    }
    w.extend(extra.iter().map(|a| shell_word(a)));
    w.join(" ")
}

fn heal_checkpoint_exists(out: &Path) -> bool {
    !surgeon_distill::heal::checkpoint::list_checkpoints(out).is_empty()
}

fn parameter_count(out: &Path) -> Option<u64> {
    surgeon_formats::open_model(&out.display().to_string())
        .ok()
        .map(|p| p.parameter_count())
}

/// Runs (or, with `dry_run`, describes) a recipe; prints progress to stderr and the
/// summary / dry-run plan to stdout. Returns the summary rows.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<Vec<SummaryRow>> {
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("locating the surgeon executable")?,
    };
    let from = start_index(recipe, opts)?;
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    // A dry run writes nothing, so it keeps the cache in memory only.
    let mut cache = HashCache::open(&recipe.workdir);
    if opts.dry_run {
        cache.file = None;
        println!(
            "recipe {} ({} steps), workdir {}",
            recipe.file,
            recipe.steps.len(),
            recipe.workdir.display()
        );
        for (k, v) in &recipe.vars {
            println!("var {k} = {v}");
        }
    }
    // Steps that are (or, in a dry run, would be) up to date.
    let mut ready: BTreeMap<String, bool> = BTreeMap::new();
    let mut rows = vec![];
    for (i, step) in recipe.steps.iter().enumerate() {
        let hash = step_hash(step, &hashes, &mut cache);
        hashes.insert(step.name.clone(), hash.clone());
        let state = step_state(recipe, step, &hash, from.is_some_and(|f| i >= f));
        if opts.dry_run {
            ready.insert(step.name.clone(), state.skip);
            describe_step(step, &state, &exe, &ready)?;
            continue;
        }
        if state.skip {
            eprintln!("== {}: up to date, skipped", step.name);
            rows.push(summary_row(step, "skipped", state.rec.as_ref()));
            continue;
        }
        check_dependencies(recipe, step, &hashes)?;
        let extra = output_flags(recipe, step, &state)?;
        let rec = execute(recipe, step, &exe, &hash, &extra, state.resume, &mut cache)?;
        rows.push(summary_row(step, "ran", Some(&rec)));
    }
    if !opts.dry_run {
        if recipe.workdir.exists() {
            cache.save()?;
        }
        print!("{}", render_summary(&rows));
    }
    Ok(rows)
}

/// The index of `--from`'s step (steps from there on run even when up to date).
fn start_index(recipe: &Recipe, opts: &RunOptions) -> Result<Option<usize>> {
    let Some(f) = &opts.from else {
        return Ok(None);
    };
    let pos = recipe.steps.iter().position(|s| &s.name == f);
    pos.map(Some).with_context(|| {
        let names: Vec<&str> = recipe.steps.iter().map(|s| s.name.as_str()).collect();
        format!("--from {f}: no such step (steps: {})", names.join(", "))
    })
}

/// Where one step stands before this run: its record, and whether it is skipped or resumed.
struct StepState {
    rec: Option<StepRecord>,
    skip: bool,
    resume: bool,
}

fn step_state(recipe: &Recipe, step: &Step, hash: &str, forced: bool) -> StepState {
    let rec = read_record(recipe, &step.name);
    let out_ok = step.out.as_ref().is_none_or(|o| o.exists());
    let done = rec
        .as_ref()
        .is_some_and(|r| r.status == "done" && r.hash == hash)
        && out_ok;
    let skip = done && !forced;
    // A heal interrupted with the same settings continues from its last checkpoint.
    let resume = step.kind == "heal"
        && step.has_resume
        && !skip
        && rec
            .as_ref()
            .is_some_and(|r| r.status == "running" && r.hash == hash)
        && step.out.as_ref().is_some_and(|o| heal_checkpoint_exists(o));
    StepState { rec, skip, resume }
}

fn summary_row(step: &Step, status: &str, rec: Option<&StepRecord>) -> SummaryRow {
    SummaryRow {
        step: step.name.clone(),
        kind: step.kind.clone(),
        status: status.to_string(),
        out: step
            .out
            .as_ref()
            .map(|o| o.display().to_string())
            .unwrap_or_else(|| "-".into()),
        seconds: rec.map(|r| r.seconds),
        parameters: rec.and_then(|r| r.parameters),
        ppl: rec
            .and_then(|r| r.eval.as_ref())
            .and_then(|e| e.get("ppl"))
            .and_then(|p| p.as_f64()),
    }
}

fn resume_flag(step: &Step) -> String {
    let out = step.out.as_ref().expect("a resumed heal has an output");
    format!("--resume={}", out.display())
}

/// Dry run: what the step would do, its command line and (when it can say) its plan.
fn describe_step(
    step: &Step,
    state: &StepState,
    exe: &Path,
    ready: &BTreeMap<String, bool>,
) -> Result<()> {
    let what = if state.skip {
        "up to date, would skip"
    } else if state.resume {
        "would resume from its last checkpoint"
    } else {
        "would run"
    };
    println!(
        "\n== step {} ({}), line {}: {what}",
        step.name, step.kind, step.line
    );
    let extra: Vec<String> = state
        .resume
        .then(|| resume_flag(step))
        .into_iter()
        .collect();
    println!("$ {}", command_line(step, &extra));
    if state.skip {
        return Ok(());
    }
    let missing: Vec<String> = step
        .deps
        .iter()
        .filter(|d| !ready.get(*d).copied().unwrap_or(false))
        .map(|d| format!("${{steps.{d}}}"))
        .collect();
    if !missing.is_empty() {
        println!(
            "input not built yet: {} (made by an earlier step of this run)",
            missing.join(", ")
        );
        return Ok(());
    }
    if !step.has_dry_run {
        println!("({} has no --dry-run; it would run as shown)", step.kind);
        return Ok(());
    }
    print_plan(step, exe)
}

/// The step's own `--dry-run` output, or why there is none.
fn print_plan(step: &Step, exe: &Path) -> Result<()> {
    let mut args = step.argv.clone();
    if let Some(o) = &step.out {
        args.push(format!("--out={}", o.display()));
    }
    args.push("--dry-run".into());
    let o = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if o.status.success() {
        print!("{}", String::from_utf8_lossy(&o.stdout));
    } else {
        let e = String::from_utf8_lossy(&o.stderr);
        println!(
            "plan unavailable: {}",
            e.lines().last().unwrap_or("").trim_start_matches("error: ")
        );
    }
    Ok(())
}

/// Every step this one reads must be done, with the settings of this recipe.
fn check_dependencies(
    recipe: &Recipe,
    step: &Step,
    hashes: &BTreeMap<String, String>,
) -> Result<()> {
    for d in &step.deps {
        match read_record(recipe, d) {
            Some(r) if r.status == "done" && Some(&r.hash) == hashes.get(d) => {}
            Some(_) => bail!(
                "step `{}` needs step `{d}`, which is not up to date (run without --from)",
                step.name
            ),
            None => bail!(
                "step `{}` needs step `{d}`, which has not run (run without --from)",
                step.name
            ),
        }
    }
    Ok(())
}

/// `--resume` or `--force` for the step's output. Only an output this step wrote before (its record
/// says so) is replaced; a replaced heal loses the checkpoints of its earlier settings.
fn output_flags(recipe: &Recipe, step: &Step, state: &StepState) -> Result<Vec<String>> {
    if state.resume {
        return Ok(vec![resume_flag(step)]);
    }
    let Some(out) = step.out.as_ref().filter(|o| o.exists()) else {
        return Ok(vec![]);
    };
    let ours = state
        .rec
        .as_ref()
        .is_some_and(|r| r.out.as_ref() == Some(out));
    if !ours || !step.has_force {
        bail!(
            "{}:{}: step `{}`: its output {} already exists and was not written by this \
             step of the recipe (no record in {}); remove it or choose another `out:`",
            recipe.file,
            step.line,
            step.name,
            out.display(),
            record_path(recipe, &step.name).display()
        );
    }
    if step.kind == "heal" && out.starts_with(&recipe.workdir) {
        let ck = surgeon_distill::heal::checkpoint::checkpoints_dir(out);
        if ck.exists() {
            std::fs::remove_dir_all(&ck)
                .with_context(|| format!("removing stale {}", ck.display()))?;
        }
    }
    Ok(vec!["--force".into()])
}

/// Runs the step as a child `surgeon` process, recording it as running, then done.
fn execute(
    recipe: &Recipe,
    step: &Step,
    exe: &Path,
    hash: &str,
    extra: &[String],
    resume: bool,
    cache: &mut HashCache,
) -> Result<StepRecord> {
    let mut extra = extra.to_vec();
    let capture_json = step.kind == "eval" && step.has_json;
    if capture_json && !step.argv.iter().any(|a| a == "--json") {
        extra.push("--json".into());
    }
    let how = if resume {
        " (resuming from its last checkpoint)"
    } else {
        ""
    };
    eprintln!("== {}{how}: {}", step.name, command_line(step, &extra));
    std::fs::create_dir_all(&recipe.workdir)
        .with_context(|| format!("creating {}", recipe.workdir.display()))?;
    let mut rec = StepRecord {
        name: step.name.clone(),
        kind: step.kind.clone(),
        hash: hash.to_string(),
        status: "running".into(),
        argv: step.argv.clone(),
        out: step.out.clone(),
        resumed: resume,
        ..Default::default()
    };
    write_record(recipe, &rec)?;
    cache.save()?;
    let t0 = Instant::now();
    let stdout = spawn_step(recipe, step, exe, &extra, capture_json)?;
    rec.seconds = t0.elapsed().as_secs_f64();
    if capture_json {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'));
        rec.eval = line.and_then(|l| serde_json::from_str(l).ok());
        print!("{stdout}");
    }
    rec.parameters = step.out.as_deref().and_then(parameter_count);
    rec.status = "done".into();
    write_record(recipe, &rec)?;
    Ok(rec)
}

/// Runs `surgeon <argv> --out=OUT <extra>`; its stdout when captured. A failure names the step.
fn spawn_step(
    recipe: &Recipe,
    step: &Step,
    exe: &Path,
    extra: &[String],
    capture: bool,
) -> Result<String> {
    let mut args = step.argv.clone();
    if let Some(o) = &step.out {
        args.push(format!("--out={}", o.display()));
    }
    args.extend(extra.iter().cloned());
    let mut cmd = Command::new(exe);
    cmd.args(&args).stdin(Stdio::null());
    if capture {
        cmd.stdout(Stdio::piped());
    }
    let o = cmd
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?
        .wait_with_output()?;
    if !o.status.success() {
        let how = match o.status.code() {
            Some(130) => "was interrupted (rerun `surgeon run` to continue)".to_string(),
            Some(c) => format!("failed (exit code {c})"),
            None => "was killed".to_string(),
        };
        bail!(
            "{}:{}: step `{}` ({}) {how}",
            recipe.file,
            step.line,
            step.name,
            step.kind
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The summary table.
pub fn render_summary(rows: &[SummaryRow]) -> String {
    let mut table = vec![vec![
        "step".to_string(),
        "kind".into(),
        "status".into(),
        "output".into(),
        "time".into(),
        "parameters".into(),
        "perplexity".into(),
    ]];
    for r in rows {
        table.push(vec![
            r.step.clone(),
            r.kind.clone(),
            r.status.clone(),
            r.out.clone(),
            r.seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into()),
            r.parameters
                .map(surgeon_formats::plan::group_digits)
                .unwrap_or_else(|| "-".into()),
            r.ppl
                .map(|p| format!("{p:.3}"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| table.iter().map(|r| r[c].chars().count()).max().unwrap())
        .collect();
    let mut s = String::from("\n");
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| format!("{v:<w$}", w = widths[c]))
            .collect();
        s.push_str(cells.join("  ").trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mtime(p: &Path, secs: u64) {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn hash_cache_reads_a_file_once() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("big.bin");
        std::fs::write(&f, b"hello").unwrap();
        set_mtime(&f, 1_000_000);
        let mut c = HashCache::open(d.path());
        let h = c.file_hash(&f).unwrap();
        // sha256("hello")
        assert_eq!(
            h,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(c.file_hash(&f).unwrap(), h);
        assert_eq!(c.hashed.len(), 1);
        c.save().unwrap();

        // A reopened cache answers from (path, size, mtime) without reading: a cached entry with
        // a made-up hash is returned as it is.
        let file = d.path().join(".surgeon/hashes.json");
        let text = std::fs::read_to_string(&file).unwrap().replace(&h, "cafe");
        std::fs::write(&file, text).unwrap();
        let mut c = HashCache::open(d.path());
        assert_eq!(c.file_hash(&f).unwrap(), "cafe");
        assert!(c.hashed.is_empty());
        // New bytes of the same size with a new mtime: read again.
        std::fs::write(&f, b"world").unwrap();
        set_mtime(&f, 2_000_000);
        assert_ne!(c.file_hash(&f).unwrap(), "cafe");
        assert_eq!(c.hashed.len(), 1);
    }
}
