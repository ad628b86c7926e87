//! Recipe files: parsing, line numbers, variable and step-reference resolution, validation
//! against the real command-line parser.
//!
//! ```yaml
//! workdir: work/demo            # optional; `surgeon run --workdir` wins
//! vars:                         # `${vars.NAME}`, overridable with `--set NAME=VALUE`
//!   gguf: ${env.SURGEON_CACHE:-${env.HOME}/.cache/surgeon}/SmolLM2-135M-Instruct.Q4_1.gguf
//! steps:
//!   - name: base                # output: <workdir>/base (unless the step sets `out:`)
//!     kind: import-gguf         # any `surgeon` subcommand
//!     file: ${vars.gguf}        # options: the subcommand's own (positional ones by name)
//!   - name: deep
//!     kind: upscale
//!     model: ${steps.base}      # an earlier step's output
//!     layers: 36
//! ```
use anyhow::{anyhow, Result};
use clap::{ArgAction, CommandFactory};
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// An error that points to a line of the recipe (`recipe.yaml:12: ...`).
#[derive(Debug)]
pub struct RecipeError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}
impl std::error::Error for RecipeError {}

/// A parsed, resolved recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe's path as given (used in messages).
    pub file: String,
    pub workdir: PathBuf,
    pub vars: BTreeMap<String, String>,
    pub steps: Vec<Step>,
}

/// One resolved step.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub kind: String,
    /// Line of the step's `- ` item.
    pub line: usize,
    /// The argument vector after `surgeon`: `[kind, args...]` (no `--out`, `--force`, `--resume`,
    /// `--dry-run`: the runner adds those).
    pub argv: Vec<String>,
    /// Where the step writes (`None` for commands without `--out`, e.g. `eval`).
    pub out: Option<PathBuf>,
    /// Earlier steps this one reads.
    pub deps: Vec<String>,
    /// Option values (after substitution) that are not step references: file inputs are among them.
    pub plain_values: Vec<String>,
    /// Whether the command accepts `--dry-run`, `--force`, `--resume`, `--json`.
    pub has_dry_run: bool,
    pub has_force: bool,
    pub has_resume: bool,
    pub has_json: bool,
}

/// Line numbers found by a light scan of the text (serde_yaml 0.9 keeps no locations).
#[derive(Default, Debug)]
struct Lines {
    top: BTreeMap<String, usize>,
    vars: BTreeMap<String, usize>,
    /// Per step item: the item line and its keys' lines.
    steps: Vec<(usize, BTreeMap<String, usize>)>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn key_of(s: &str) -> Option<String> {
    let s = s.trim_start();
    if s.starts_with('#') {
        return None;
    }
    let (k, _) = s.split_once(':')?;
    let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
    (!k.is_empty() && !k.contains(' ')).then(|| k.to_string())
}

fn scan_lines(text: &str) -> Lines {
    let mut out = Lines::default();
    let mut section = "";
    let mut item_indent: Option<usize> = None;
    let mut key_col: Option<usize> = None;
    let mut sub_indent: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let l = raw.trim_end();
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let ind = indent(l);
        if ind == 0 {
            if let Some(k) = key_of(l) {
                out.top.insert(k.clone(), n);
                section = match k.as_str() {
                    "vars" => "vars",
                    "steps" => "steps",
                    _ => "",
                };
                item_indent = None;
                sub_indent = None;
                continue;
            }
        }
        match section {
            "vars" => {
                let si = *sub_indent.get_or_insert(ind);
                if ind == si {
                    if let Some(k) = key_of(l) {
                        out.vars.insert(k, n);
                    }
                }
            }
            "steps" => {
                let body = l.trim_start();
                let is_item = body == "-" || body.starts_with("- ");
                if is_item && item_indent.is_none_or(|ii| ind == ii) {
                    item_indent = Some(ind);
                    let rest = body[1..].trim_start();
                    let col = ind + (body.len() - rest.len());
                    key_col = Some(col);
                    let mut keys = BTreeMap::new();
                    if let Some(k) = key_of(rest) {
                        keys.insert(k, n);
                    } else {
                        key_col = None;
                    }
                    out.steps.push((n, keys));
                } else if let Some((_, keys)) = out.steps.last_mut() {
                    let col = *key_col.get_or_insert(ind);
                    if ind == col {
                        if let Some(k) = key_of(l) {
                            keys.insert(k, n);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Keys of a step that are not command options.
const STEP_KEYS: &[&str] = &["name", "kind", "out"];

/// Parses and resolves a recipe. `sets` are `--set KEY=VALUE` overrides; `workdir` overrides the
/// recipe's `workdir:`.
pub fn load(path: &Path, sets: &[(String, String)], workdir: Option<&Path>) -> Result<Recipe> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read recipe {}: {e}", path.display()))?;
    parse(&path.display().to_string(), &text, sets, workdir)
}

/// A recipe being parsed: its name for messages and the line of every key.
struct Parser<'a> {
    file: &'a str,
    lines: Lines,
}

/// A step as written, before its references and options are resolved.
struct RawStep<'a> {
    line: usize,
    keys: BTreeMap<String, usize>,
    name: String,
    kind: String,
    map: &'a serde_yaml::Mapping,
}

impl RawStep<'_> {
    /// The line of key `k`, or of the step when the key has none.
    fn line_of(&self, k: &str) -> usize {
        self.keys.get(k).copied().unwrap_or(self.line)
    }
}

/// What every step's values may refer to: variables, the work directory, step outputs.
struct Scope<'a> {
    vars: &'a BTreeMap<String, String>,
    workdir: &'a Path,
    outs: &'a BTreeMap<String, Option<PathBuf>>,
}

impl Scope<'_> {
    fn lookup(&self, kind: &str, name: &str) -> Option<String> {
        match kind {
            "steps" => self
                .outs
                .get(name)
                .cloned()
                .flatten()
                .map(|p| p.display().to_string()),
            "workdir" => Some(self.workdir.display().to_string()),
            _ => lookup_var(self.vars, kind, name),
        }
    }
}

/// Options a step may not set: the runner manages them.
const MANAGED: &[&str] = &["out", "force", "dry_run", "resume", "help"];

pub fn parse(
    file: &str,
    text: &str,
    sets: &[(String, String)],
    workdir: Option<&Path>,
) -> Result<Recipe> {
    let p = Parser {
        file,
        lines: scan_lines(text),
    };
    let doc = p.document(text)?;
    let map = doc.as_mapping().expect("document() checks the mapping");
    let vars = p.variables(map, sets)?;
    let workdir = match workdir {
        Some(w) => w.to_path_buf(),
        None => p.workdir(map, &vars)?,
    };
    let cli = crate::Cli::command();
    let raws = p.raw_steps(map, &cli)?;
    let outs = p.outputs(&raws, &cli, &vars, &workdir)?;
    let refs = p.references(&raws)?;
    p.check_references(&raws, &refs, &outs)?;
    let scope = Scope {
        vars: &vars,
        workdir: &workdir,
        outs: &outs,
    };
    let steps = raws
        .iter()
        .zip(&refs)
        .map(|(r, deps)| p.step(r, deps, &cli, &scope))
        .collect::<Result<Vec<_>>>()?;
    Ok(Recipe {
        file: file.to_string(),
        workdir,
        vars,
        steps,
    })
}

impl Parser<'_> {
    fn err(&self, line: usize, message: String) -> anyhow::Error {
        RecipeError {
            file: self.file.to_string(),
            line,
            message,
        }
        .into()
    }

    /// The YAML document: a mapping with known top-level keys only.
    fn document(&self, text: &str) -> Result<Value> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(1);
            self.err(line, format!("not valid YAML: {e}"))
        })?;
        let map = doc.as_mapping().ok_or_else(|| {
            self.err(
                1,
                "a recipe is a mapping with `steps:` (and `vars:`, `workdir:`)".into(),
            )
        })?;
        for (k, _) in map {
            let k = scalar(k).unwrap_or_default();
            if !["steps", "vars", "workdir", "description"].contains(&k.as_str()) {
                let line = self.lines.top.get(&k).copied().unwrap_or(1);
                return Err(self.err(
                    line,
                    format!("unknown top-level key `{k}` (steps, vars, workdir, description)"),
                ));
            }
        }
        Ok(doc)
    }

    /// Variables: recipe values, then `--set` overrides; values may use `${env.X}` and other vars.
    fn variables(
        &self,
        map: &serde_yaml::Mapping,
        sets: &[(String, String)],
    ) -> Result<BTreeMap<String, String>> {
        let mut raw = self.raw_variables(map)?;
        for (k, v) in sets {
            let Some(line) = raw.get(k).map(|x| x.1) else {
                let known: Vec<&str> = raw.keys().map(String::as_str).collect();
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                anyhow::bail!(
                    "--set {k}: {} has no variable `{k}` (vars: {known})",
                    self.file
                );
            };
            raw.insert(k.clone(), (v.clone(), line));
        }
        let mut vars = BTreeMap::new();
        for (k, (v, line)) in &raw {
            let mut s = v.clone();
            for _ in 0..16 {
                if !s.contains("${") {
                    break;
                }
                s = substitute(&s, &|kind, name| match kind {
                    "vars" => raw.get(name).map(|x| x.0.clone()),
                    "env" => env_var(name),
                    _ => None,
                })
                .map_err(|m| self.err((*line).max(1), format!("var `{k}`: {m}")))?;
            }
            if s.contains("${vars.") {
                return Err(self.err((*line).max(1), format!("var `{k}` refers to itself")));
            }
            vars.insert(k.clone(), s);
        }
        Ok(vars)
    }

    /// `vars:` as written: value and line of each.
    fn raw_variables(
        &self,
        map: &serde_yaml::Mapping,
    ) -> Result<BTreeMap<String, (String, usize)>> {
        let mut raw = BTreeMap::new();
        let Some(v) = map.get("vars") else {
            return Ok(raw);
        };
        let top = self.lines.top["vars"];
        let m = v
            .as_mapping()
            .ok_or_else(|| self.err(top, "`vars:` must be a mapping".into()))?;
        for (k, v) in m {
            let k = scalar(k).unwrap_or_default();
            let line = self.lines.vars.get(&k).copied().unwrap_or(top);
            let v =
                scalar(v).ok_or_else(|| self.err(line, format!("var `{k}` must be a scalar")))?;
            raw.insert(k, (v, line));
        }
        Ok(raw)
    }

    /// `workdir:` with variables substituted, else `work/<recipe stem>`.
    fn workdir(
        &self,
        map: &serde_yaml::Mapping,
        vars: &BTreeMap<String, String>,
    ) -> Result<PathBuf> {
        if let Some(w) = map.get("workdir") {
            let w = scalar(w).unwrap_or_default();
            let w = substitute(&w, &|kind, name| lookup_var(vars, kind, name))
                .map_err(|m| self.err(self.lines.top["workdir"], m))?;
            return Ok(PathBuf::from(w));
        }
        let stem = Path::new(self.file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "recipe".into());
        Ok(PathBuf::from("work").join(stem))
    }

    /// Every step's name, kind and lines, with names and kinds checked.
    fn raw_steps<'m>(
        &self,
        map: &'m serde_yaml::Mapping,
        cli: &clap::Command,
    ) -> Result<Vec<RawStep<'m>>> {
        let steps_v = map
            .get("steps")
            .ok_or_else(|| self.err(1, "the recipe has no `steps:`".into()))?;
        let steps_line = self.lines.top.get("steps").copied().unwrap_or(1);
        let items = steps_v
            .as_sequence()
            .ok_or_else(|| self.err(steps_line, "`steps:` must be a list of steps".into()))?;
        let kinds: Vec<String> = cli
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|k| k != "run" && k != "help")
            .collect();
        let mut raws: Vec<RawStep> = vec![];
        for (i, item) in items.iter().enumerate() {
            let (line, keys) = self
                .lines
                .steps
                .get(i)
                .cloned()
                .unwrap_or((steps_line, BTreeMap::new()));
            let m = item.as_mapping().ok_or_else(|| {
                self.err(line, "a step is a mapping with `name:` and `kind:`".into())
            })?;
            let mut raw = RawStep {
                line,
                keys,
                name: String::new(),
                kind: String::new(),
                map: m,
            };
            raw.name = self.step_name(&raw, &raws)?;
            raw.kind = self.step_kind(&raw, &kinds)?;
            raws.push(raw);
        }
        Ok(raws)
    }

    /// The step's `name:`: well formed and not used by an earlier step.
    fn step_name(&self, r: &RawStep, earlier: &[RawStep]) -> Result<String> {
        let name = r
            .map
            .get("name")
            .and_then(scalar)
            .ok_or_else(|| self.err(r.line, "step has no `name:`".into()))?;
        let well_formed = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !well_formed {
            return Err(self.err(
                r.line_of("name"),
                format!("step name `{name}` must be letters, digits, `-`, `_`, `.`"),
            ));
        }
        if let Some(prev) = earlier.iter().find(|p| p.name == name) {
            return Err(self.err(
                r.line_of("name"),
                format!(
                    "step `{name}` is defined twice (first on line {})",
                    prev.line
                ),
            ));
        }
        Ok(name)
    }

    /// The step's `kind:`: one of surgeon's subcommands (not `run`).
    fn step_kind(&self, r: &RawStep, kinds: &[String]) -> Result<String> {
        let kind = r
            .map
            .get("kind")
            .and_then(scalar)
            .ok_or_else(|| self.err(r.line, format!("step `{}` has no `kind:`", r.name)))?;
        if !kinds.contains(&kind) {
            let hint = suggest(&kind, kinds)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(self.err(
                r.line_of("kind"),
                format!(
                    "unknown step kind \"{kind}\"{hint}; kinds: {}",
                    kinds.join(", ")
                ),
            ));
        }
        Ok(kind)
    }

    /// Where each step writes: its `out:`, else `<workdir>/<name>` (`.gguf` for a GGUF export);
    /// `None` for commands that write no model.
    fn outputs(
        &self,
        raws: &[RawStep],
        cli: &clap::Command,
        vars: &BTreeMap<String, String>,
        workdir: &Path,
    ) -> Result<BTreeMap<String, Option<PathBuf>>> {
        let mut outs = BTreeMap::new();
        for r in raws {
            let sub = cli.find_subcommand(&r.kind).expect("kind checked");
            let has_out = sub.get_arguments().any(|a| a.get_id() == "out");
            if !has_out && r.map.contains_key("out") {
                return Err(self.err(
                    r.keys["out"],
                    format!("`{}` writes no model: it takes no `out:`", r.kind),
                ));
            }
            let out = match r.map.get("out").and_then(scalar) {
                Some(o) => {
                    let o = substitute(&o, &|kind, name| {
                        lookup_var(vars, kind, name)
                            .or_else(|| (kind == "workdir").then(|| workdir.display().to_string()))
                    })
                    .map_err(|m| self.err(r.line_of("out"), m))?;
                    Some(PathBuf::from(o))
                }
                None if r.kind == "export-gguf" => Some(workdir.join(format!("{}.gguf", r.name))),
                None => has_out.then(|| workdir.join(&r.name)),
            };
            outs.insert(r.name.clone(), out);
        }
        Ok(outs)
    }

    /// Per step, the steps it refers to (`${steps.NAME}`) and the line of each reference.
    fn references(&self, raws: &[RawStep]) -> Result<Vec<Vec<(String, usize)>>> {
        let names: Vec<String> = raws.iter().map(|r| r.name.clone()).collect();
        let mut refs = vec![];
        for r in raws {
            let mut v = vec![];
            for (k, val) in r.map {
                let line = r.line_of(&scalar(k).unwrap_or_default());
                for s in flatten(val) {
                    for (kind, name) in placeholders(&s) {
                        if kind != "steps" {
                            continue;
                        }
                        if !names.contains(&name) {
                            let hint = suggest(&name, &names)
                                .map(|s| format!(" (did you mean `{s}`?)"))
                                .unwrap_or_default();
                            return Err(self.err(
                                line,
                                format!(
                                    "step `{}` refers to step `{name}`, which does not exist{hint}",
                                    r.name
                                ),
                            ));
                        }
                        v.push((name, line));
                    }
                }
            }
            refs.push(v);
        }
        Ok(refs)
    }

    /// References go to earlier steps that write an output; no step refers to itself or to a
    /// cycle.
    fn check_references(
        &self,
        raws: &[RawStep],
        refs: &[Vec<(String, usize)>],
        outs: &BTreeMap<String, Option<PathBuf>>,
    ) -> Result<()> {
        let index: BTreeMap<&str, usize> = raws
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        for (i, r) in raws.iter().enumerate() {
            for (dep, line) in &refs[i] {
                let j = index[dep.as_str()];
                if j == i {
                    return Err(self.err(*line, format!("step `{}` refers to itself", r.name)));
                }
                if j > i {
                    return Err(self.err(*line, forward_reference(raws, refs, &index, i, j)));
                }
                if outs[dep].is_none() {
                    return Err(self.err(
                        *line,
                        format!(
                            "step `{}` refers to step `{dep}`, whose kind `{}` writes no output",
                            r.name, raws[j].kind
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The resolved step: its argument vector, checked by the real command-line parser.
    fn step(
        &self,
        r: &RawStep,
        refs: &[(String, usize)],
        cli: &clap::Command,
        scope: &Scope,
    ) -> Result<Step> {
        let sub = cli.find_subcommand(&r.kind).expect("kind checked");
        let mut positional: Vec<(usize, Vec<String>)> = vec![];
        let mut named: Vec<String> = vec![];
        let mut plain_values = vec![];
        for (k, val) in r.map {
            let k = scalar(k).unwrap_or_default();
            if STEP_KEYS.contains(&k.as_str()) {
                continue;
            }
            let line = r.line_of(&k);
            let arg = self.option(r, sub, &k, line)?;
            let mut resolved = vec![];
            for v in self.option_values(&k, val, line)? {
                let rv = substitute(&v, &|kind, name| scope.lookup(kind, name))
                    .map_err(|m| self.err(line, format!("step `{}`: {m}", r.name)))?;
                if placeholders(&v).iter().all(|(kind, _)| kind != "steps") {
                    plain_values.push(rv.clone());
                }
                resolved.push(rv);
            }
            match arg.get_long() {
                None => positional.push((arg.get_index().unwrap_or(0), resolved)),
                Some(l) => named.extend(self.flag_words(arg, l, &k, resolved, line)?),
            }
        }
        positional.sort_by_key(|p| p.0);
        let mut argv = vec![r.kind.clone()];
        for (_, v) in positional {
            argv.extend(v);
        }
        argv.extend(named);
        let out = scope.outs[&r.name].clone();
        self.check_with_clap(r, &argv, out.as_deref())?;
        let has = |id: &str| sub.get_arguments().any(|a| a.get_id() == id);
        let mut deps: Vec<String> = refs.iter().map(|d| d.0.clone()).collect();
        deps.dedup();
        Ok(Step {
            name: r.name.clone(),
            kind: r.kind.clone(),
            line: r.line,
            argv,
            out,
            deps,
            plain_values,
            has_dry_run: has("dry_run"),
            has_force: has("force"),
            has_resume: has("resume"),
            has_json: has("json"),
        })
    }

    /// The command's argument for option key `k`; unknown and runner-managed keys are errors.
    fn option<'c>(
        &self,
        r: &RawStep,
        sub: &'c clap::Command,
        k: &str,
        line: usize,
    ) -> Result<&'c clap::Arg> {
        let id = k.replace('-', "_");
        let Some(arg) = sub.get_arguments().find(|a| a.get_id() == id.as_str()) else {
            let names: Vec<String> = sub
                .get_arguments()
                .filter(|a| !MANAGED.contains(&a.get_id().as_str()))
                .map(|a| a.get_id().as_str().replace('_', "-"))
                .collect();
            let hint = suggest(k, &names)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(self.err(
                line,
                format!("unknown option `{k}` for step kind `{}`{hint}", r.kind),
            ));
        };
        if MANAGED.contains(&id.as_str()) {
            return Err(self.err(
                line,
                format!("`{k}` is managed by `surgeon run` (use the step's `out:` for the output)"),
            ));
        }
        Ok(arg)
    }

    /// The value(s) of option `k`: a scalar or a list of scalars.
    fn option_values(&self, k: &str, val: &Value, line: usize) -> Result<Vec<String>> {
        match val {
            Value::Sequence(s) => s
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| {
                        self.err(line, format!("option `{k}`: list items must be scalars"))
                    })
                })
                .collect(),
            v => Ok(vec![scalar(v).ok_or_else(|| {
                self.err(
                    line,
                    format!("option `{k}` must be a scalar or a list of scalars"),
                )
            })?]),
        }
    }

    /// The command-line words for flag `--long` with `values`, by the argument's kind.
    fn flag_words(
        &self,
        arg: &clap::Arg,
        long: &str,
        k: &str,
        values: Vec<String>,
        line: usize,
    ) -> Result<Vec<String>> {
        let l = format!("--{long}");
        let multi = arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        Ok(match arg.get_action() {
            ArgAction::SetTrue => match values.as_slice() {
                [b] if b == "true" => vec![l],
                [b] if b == "false" => vec![],
                _ => return Err(self.err(line, format!("option `{k}` is a flag: true or false"))),
            },
            ArgAction::Append if !multi => values.into_iter().map(|v| format!("{l}={v}")).collect(),
            _ if multi => std::iter::once(l).chain(values).collect(),
            _ => vec![format!("{l}={}", values.join(","))],
        })
    }

    /// Runs clap on the step's words (plus the `--out` the runner adds); its complaint points to
    /// the option's line when it names the option.
    fn check_with_clap(&self, r: &RawStep, argv: &[String], out: Option<&Path>) -> Result<()> {
        let mut check = vec!["surgeon".to_string()];
        check.extend(argv.iter().cloned());
        if let Some(o) = out {
            check.push(format!("--out={}", o.display()));
        }
        let Err(e) = <crate::Cli as clap::Parser>::try_parse_from(&check) else {
            return Ok(());
        };
        let msg = e.to_string();
        // clap's message up to its usage line, on one line.
        let first = msg
            .lines()
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_string();
        let line = r
            .keys
            .iter()
            .filter(|(k, _)| !STEP_KEYS.contains(&k.as_str()))
            .find(|(k, _)| {
                let flag = format!("--{}", k.replace('_', "-"));
                first.contains(&format!("'{flag}")) || first.contains(&format!("'{flag} "))
            })
            .map(|(_, l)| *l)
            .unwrap_or(r.line);
        Err(self.err(line, format!("step `{}` ({}): {first}", r.name, r.kind)))
    }
}

/// The message for step `i` referring to the later step `j`: a cycle when `j` leads back to `i`.
fn forward_reference(
    raws: &[RawStep],
    refs: &[Vec<(String, usize)>],
    index: &BTreeMap<&str, usize>,
    i: usize,
    j: usize,
) -> String {
    if let Some(path) = find_path(refs, index, j, i) {
        let mut names = vec![raws[i].name.clone()];
        names.extend(path.iter().map(|&k| raws[k].name.clone()));
        return format!("cycle between steps: {}", names.join(" -> "));
    }
    format!(
        "step `{}` refers to step `{}`, which comes later (line {}); steps run in order",
        raws[i].name, raws[j].name, raws[j].line
    )
}

fn find_path(
    refs: &[Vec<(String, usize)>],
    index: &BTreeMap<&str, usize>,
    from: usize,
    to: usize,
) -> Option<Vec<usize>> {
    let mut stack = vec![(from, vec![from])];
    let mut seen = vec![false; refs.len()];
    while let Some((n, path)) = stack.pop() {
        if n == to {
            return Some(path);
        }
        if std::mem::replace(&mut seen[n], true) {
            continue;
        }
        for (d, _) in &refs[n] {
            let j = index[d.as_str()];
            let mut p = path.clone();
            p.push(j);
            stack.push((j, p));
        }
    }
    None
}

fn lookup_var(vars: &BTreeMap<String, String>, kind: &str, name: &str) -> Option<String> {
    match kind {
        "vars" => vars.get(name).cloned(),
        "env" => env_var(name),
        _ => None,
    }
}

/// An environment variable; set but empty counts as unset, as the shell's `${NAME:-default}`.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn flatten(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().filter_map(scalar).collect(),
        v => scalar(v).into_iter().collect(),
    }
}

/// The end of the `${...}` that opens at `start` (the index of its `}`), with nested `${...}`
/// (in a `:-default`) skipped.
fn closing_brace(s: &str, start: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        if b[i] == b'$' && b.get(i + 1) == Some(&b'{') {
            depth += 1;
            i += 2;
            continue;
        }
        if b[i] == b'}' {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Splits the inside of `${...}` into kind, name and the `:-default` (if any).
fn split_ref(inner: &str) -> (&str, &str, Option<&str>) {
    let (reference, default) = match inner.find(":-") {
        Some(i) => (&inner[..i], Some(&inner[i + 2..])),
        None => (inner, None),
    };
    let (k, n) = reference.split_once('.').unwrap_or((reference, ""));
    (k, n, default)
}

/// `${kind.name}` / `${workdir}` placeholders in `s`, including those inside defaults.
fn placeholders(s: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let Some(j) = closing_brace(rest, i) else {
            break;
        };
        let (k, n, default) = split_ref(&rest[i + 2..j]);
        out.push((k.to_string(), n.to_string()));
        if let Some(d) = default {
            out.extend(placeholders(d));
        }
        rest = &rest[j + 1..];
    }
    out
}

/// Replaces `${kind.name}` using `f`; `${kind.name:-default}` uses the default (itself substituted)
/// when `f` has no value. Unknown references without a default are errors.
fn substitute(
    s: &str,
    f: &dyn Fn(&str, &str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let j = closing_brace(rest, i).ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
        let inner = &rest[i + 2..j];
        let (k, n, default) = split_ref(inner);
        match k {
            "vars" | "env" | "steps" | "workdir" => {}
            _ => {
                return Err(format!(
                    "unknown reference `${{{inner}}}` (use ${{vars.NAME}}, ${{steps.NAME}}, ${{env.NAME}}, ${{env.NAME:-default}}, ${{workdir}})"
                ))
            }
        }
        let v = match (f(k, n), default) {
            (Some(v), _) => v,
            (None, Some(d)) => substitute(d, f)?,
            (None, None) => {
                return Err(match k {
                    "vars" => format!("unknown variable `{n}` in `${{{inner}}}`"),
                    "env" => format!(
                        "environment variable `{n}` is not set (or give a default: `${{env.{n}:-VALUE}}`)"
                    ),
                    _ => format!("cannot resolve `${{{inner}}}`"),
                })
            }
        };
        out.push_str(&v);
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The closest candidate by edit distance, if close enough.
fn suggest(word: &str, candidates: &[String]) -> Option<String> {
    let d = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                cur.push(
                    (prev[j] + usize::from(ca != *cb))
                        .min(prev[j + 1] + 1)
                        .min(cur[j] + 1),
                );
            }
            prev = cur;
        }
        prev[b.len()]
    };
    candidates
        .iter()
        .map(|c| (d(word, c), c))
        .filter(|(n, _)| *n <= 2.max(word.len() / 3))
        .min_by_key(|(n, _)| *n)
        .map(|(_, c)| c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_lines() {
        let t =
            "vars:\n  a: 1\nsteps:\n  - name: x\n    kind: synth\n\n  - name: y\n    kind: eval\n";
        let l = scan_lines(t);
        assert_eq!(l.vars["a"], 2);
        assert_eq!(l.steps.len(), 2);
        assert_eq!(l.steps[0].0, 4);
        assert_eq!(l.steps[1].1["kind"], 8);
    }

    #[test]
    fn substitution() {
        let f = |k: &str, n: &str| (k == "vars" && n == "a").then(|| "A".to_string());
        assert_eq!(substitute("x${vars.a}y", &f).unwrap(), "xAy");
        assert!(substitute("${vars.b}", &f).is_err());
        assert!(substitute("${foo.b}", &f).is_err());
        // Defaults, nested references in them, and `}` after the reference.
        assert_eq!(substitute("${vars.b:-x}/y", &f).unwrap(), "x/y");
        assert_eq!(substitute("${vars.a:-x}", &f).unwrap(), "A");
        assert_eq!(substitute("${vars.b:-${vars.a}/c}}", &f).unwrap(), "A/c}");
        assert_eq!(substitute("${vars.b:-}z", &f).unwrap(), "z");
        assert!(substitute("${vars.b:-${vars.c}}", &f)
            .unwrap_err()
            .contains("unknown variable `c`"));
        assert!(substitute("${vars.b:-${vars.a}", &f)
            .unwrap_err()
            .contains("unclosed"));
        assert_eq!(
            placeholders("${env.X:-${steps.s}/a}${workdir}"),
            vec![
                ("env".to_string(), "X".to_string()),
                ("steps".to_string(), "s".to_string()),
                ("workdir".to_string(), String::new())
            ]
        );
    }
}
