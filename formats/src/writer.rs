//! Materialises a plan as a Hugging Face model directory, streaming tensor by tensor.
//!
//! Memory is bounded by a fixed window of materialised tensors, whatever the model size. Bytes that
//! pass unchanged are copied file-to-file (`std::io::copy` uses copy_file_range on Linux). The output
//! is written to a temporary sibling directory and renamed into place at the end, so a failure leaves
//! nothing at the output path.
use crate::config::config_json;
use crate::dtype::max_finite;
use crate::export::{choose_export, ExportFormat};
use crate::load::input_paths;
use crate::output::TempOutput;
use crate::plan::{group_digits, HostTensor, Plan, TensorEntry};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Largest shard in bytes (tensor data); 5 GB by default as in transformers.
    pub shard_size: u64,
    /// Replace an existing output directory.
    pub force: bool,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// What was done, for the model card (e.g. `surgeon upscale --layers 48`).
    pub description: String,
    /// Bytes of materialised tensors held at once (bounds peak memory).
    pub window_bytes: usize,
    /// Write values beyond the target dtype's range clamped to its largest finite value
    /// (otherwise such an overflow is an error and nothing is written).
    pub allow_overflow: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            shard_size: 5_000_000_000,
            force: false,
            progress: false,
            description: String::new(),
            window_bytes: 256 << 20,
            allow_overflow: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriteReport {
    pub dir: PathBuf,
    pub shards: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    /// Bytes copied file-to-file without decoding.
    pub bytes_copied: u64,
    /// Values that overflowed the target dtype and were clamped (only with `allow_overflow`).
    pub overflow: Overflow,
}

/// Values beyond a dtype's range met while converting, per tensor.
#[derive(Clone, Debug, Default)]
pub struct Overflow {
    pub tensors: std::collections::BTreeMap<String, usize>,
}

impl Overflow {
    pub fn values(&self) -> usize {
        self.tensors.values().sum()
    }
    /// `N values in T tensors (first: `name`, n values)`, in the plan's tensor order.
    pub fn describe(&self, plan: &Plan) -> String {
        let first = plan
            .ordered_names()
            .into_iter()
            .find_map(|n| self.tensors.get(n).map(|c| (n, c)));
        let (name, count) = first.expect("non-empty overflow");
        format!(
            "{} value{} in {} tensor{} (first: `{name}`, {count} value{})",
            self.values(),
            if self.values() == 1 { "" } else { "s" },
            self.tensors.len(),
            if self.tensors.len() == 1 { "" } else { "s" },
            if *count == 1 { "" } else { "s" },
        )
    }
}

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("invalid size `{s}` (e.g. 5GB, 500MB)")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        _ => return Err(Error::invalid(format!("invalid size unit in `{s}`"))),
    };
    let v = (n * mult) as u64;
    if v == 0 {
        return Err(Error::invalid(format!("size `{s}` must be positive")));
    }
    Ok(v)
}

/// Refuses outputs that would clobber something (see [`crate::output::check_output`]): an
/// existing path without `force`, a folder surgeon did not write, or a path that holds or lies
/// inside one of the plan's inputs.
pub fn check_output(plan: &Plan, out: &Path, force: bool) -> Result<()> {
    crate::output::check_output(out, &input_paths(plan), force)
}

/// Writes `plan` as a Hugging Face model directory at `out`.
pub fn write_model(plan: &Plan, out: &Path, opts: &WriteOptions) -> Result<WriteReport> {
    write_model_then(plan, out, opts, |_| Ok::<(), Error>(()))
}

/// Writes `plan` like [`write_model`], then lets `extra` add files to the temporary directory
/// before it is renamed into place: the output appears with all of them or not at all (healing
/// checkpoints put their optimizer and trainer state there).
pub fn write_model_then<E: From<Error>>(
    plan: &Plan,
    out: &Path,
    opts: &WriteOptions,
    extra: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<WriteReport, E> {
    plan.validate()?;
    check_output(plan, out, opts.force)?;
    // Renamed or fused as the exported class stores them (Qwen3-MoE experts, Phi-3 projections).
    let stored = crate::layout::stored_plan(plan);
    let plan = stored.as_ref();
    let tmp = TempOutput::create(out, &opts.description)?;
    let report = write_into(plan, tmp.path(), opts)?;
    if !report.overflow.tensors.is_empty() && !opts.allow_overflow {
        let first = report.overflow.tensors.keys().next().expect("non-empty");
        let dtype = plan.tensors[first].dtype;
        return Err(Error::Output {
            path: out.to_path_buf(),
            message: format!(
                "converting to {dtype} overflows: {} lie beyond its range (±{}) and would \
                 become infinite; nothing was written (pass --allow-overflow to clamp them to \
                 the largest finite value)",
                report.overflow.describe(plan),
                max_finite(dtype)
            ),
        }
        .into());
    }
    extra(tmp.path())?;
    tmp.commit()?;
    Ok(WriteReport {
        dir: out.to_path_buf(),
        ..report
    })
}

/// Tensor layout of one shard.
struct Shard<'a> {
    file_name: String,
    tensors: Vec<(&'a String, &'a TensorEntry, usize)>, // name, entry, byte size
}

fn plan_shards<'a>(plan: &'a Plan, shard_size: u64) -> Vec<Shard<'a>> {
    let mut shards: Vec<Vec<(&String, &TensorEntry, usize)>> = vec![vec![]];
    let mut used = 0u64;
    for name in plan.ordered_names() {
        let t = &plan.tensors[name];
        let bytes = t.numel() * t.dtype.size();
        if used > 0 && used + bytes as u64 > shard_size {
            shards.push(vec![]);
            used = 0;
        }
        shards.last_mut().unwrap().push((name, t, bytes));
        used += bytes as u64;
    }
    let n = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, tensors)| Shard {
            file_name: if n == 1 {
                "model.safetensors".into()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            },
            tensors,
        })
        .collect()
}

fn provenance(plan: &Plan, opts: &WriteOptions) -> String {
    json!({
        "origin": plan.origin,
        "command": opts.description,
        "history": plan.arch.surgeon.history,
        "tool": format!("surgeon {}", env!("CARGO_PKG_VERSION")),
    })
    .to_string()
}

fn write_into(plan: &Plan, dir: &Path, opts: &WriteOptions) -> Result<WriteReport> {
    let shards = plan_shards(plan, opts.shard_size);
    let total_bytes: u64 = plan.byte_size();
    let bar = if opts.progress {
        let b = ProgressBar::new(total_bytes);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} writing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let prov = provenance(plan, opts);
    let mut weight_map = Map::new();
    for shard in &shards {
        for (name, _, _) in &shard.tensors {
            weight_map.insert((*name).clone(), json!(shard.file_name));
        }
    }
    // Shards are independent files: write them concurrently (each thread's copies and fsync
    // overlap the others'). The materialisation window is shared out so peak memory stays bounded.
    let concurrent = shards.len().min(rayon::current_num_threads()).max(1);
    let window = (opts.window_bytes / concurrent).max(1);
    let overflow = std::sync::Mutex::new(Overflow::default());
    let ctx = ShardContext {
        plan,
        dir,
        prov: &prov,
        window,
        bar: &bar,
        allow_overflow: opts.allow_overflow,
        overflow: &overflow,
    };
    let copied: u64 = shards
        .par_iter()
        .map(|shard| write_shard(&ctx, shard))
        .collect::<Result<Vec<u64>>>()?
        .into_iter()
        .sum();
    bar.finish_and_clear();
    let overflow = overflow.into_inner().unwrap_or_else(|e| e.into_inner());
    if shards.len() > 1 {
        let index = json!({
            "metadata": {"total_size": total_bytes},
            "weight_map": Value::Object(weight_map),
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    let dtype = plan.dominant_dtype();
    write_json(&dir.join("config.json"), &config_json(&plan.arch, dtype)?)?;
    write_code_files(plan, dir)?;
    for (name, f) in &plan.files {
        let target = dir.join(name);
        match f {
            crate::plan::AuxFile::Path(p) => {
                std::fs::copy(p, &target).map_err(|e| Error::io(p, e))?;
            }
            crate::plan::AuxFile::Bytes(b) => {
                std::fs::write(&target, b.as_slice()).map_err(|e| Error::io(&target, e))?;
            }
        }
    }
    if !plan.files.contains_key("generation_config.json") {
        let mut g = Map::new();
        if let Some(b) = plan.arch.bos_token_id {
            g.insert("bos_token_id".into(), json!(b));
        }
        match plan.arch.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                g.insert("eos_token_id".into(), json!(one));
            }
            many => {
                g.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = plan.arch.pad_token_id {
            g.insert("pad_token_id".into(), json!(p));
        }
        write_json(&dir.join("generation_config.json"), &Value::Object(g))?;
    }
    let card = model_card(plan, opts);
    let card_path = dir.join("README.md");
    std::fs::write(&card_path, card).map_err(|e| Error::io(&card_path, e))?;

    Ok(WriteReport {
        dir: dir.to_path_buf(),
        shards: shards.iter().map(|s| s.file_name.clone()).collect(),
        tensors: plan.tensors.len(),
        parameters: plan.parameter_count(),
        bytes: total_bytes,
        bytes_copied: copied,
        overflow,
    })
}

/// Writes one shard: header, then tensors in order. Runs of passthrough tensors that lie back to
/// back in one source file are copied with a single file-to-file copy (copy_file_range on Linux);
/// other tensors are materialised in parallel within a window of `window` bytes. Returns the bytes
/// copied file-to-file.
fn write_shard(ctx: &ShardContext, shard: &Shard) -> Result<u64> {
    let path = ctx.dir.join(&shard.file_name);
    // Header first: shapes and dtypes are known without touching data.
    let header_bytes = shard_header(shard, ctx.prov);
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e| Error::io(&path, e);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;

    let mut sources: HashMap<PathBuf, File> = HashMap::new();
    let mut copied = 0u64;
    let mut i = 0;
    while i < shard.tensors.len() {
        if is_passthrough(shard.tensors[i].1) {
            let (next, n) = copy_passthrough_run(ctx, shard, i, &mut sources, &mut w, &path)?;
            copied += n;
            i = next;
        } else {
            i = write_computed_window(ctx, shard, i, &mut w, &path)?;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&path, e))?;
    Ok(copied)
}

/// The safetensors header of a shard (metadata, then each tensor's dtype, shape and byte range),
/// padded with spaces to a multiple of 8 bytes so that the data section is aligned.
fn shard_header(shard: &Shard, prov: &str) -> Vec<u8> {
    let mut header = Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "surgeon": prov}),
    );
    let mut offset = 0usize;
    for (name, t, bytes) in &shard.tensors {
        header.insert(
            (*name).clone(),
            json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    header_bytes
}

/// Copies passthrough tensor `i` and the following ones that continue its byte range in the same
/// source file with one copy. Returns the index after the run and the bytes copied.
fn copy_passthrough_run(
    ctx: &ShardContext,
    shard: &Shard,
    i: usize,
    sources: &mut HashMap<PathBuf, File>,
    w: &mut BufWriter<File>,
    path: &Path,
) -> Result<(usize, u64)> {
    let (name, t, _) = shard.tensors[i];
    let (src, off, len, _) = passthrough_span(t).expect("caller checked is_passthrough");
    // Extend over the following tensors that continue this byte range.
    let mut end = off + len;
    let mut j = i + 1;
    while let Some((s2, o2, l2, _)) = shard
        .tensors
        .get(j)
        .and_then(|(_, t2, _)| passthrough_span(t2))
    {
        if s2.path != src.path || o2 != end {
            break;
        }
        end += l2;
        j += 1;
    }
    let f = match sources.get_mut(&src.path) {
        Some(f) => f,
        None => {
            let f = File::open(&src.path).map_err(|e| Error::io(&src.path, e))?;
            sources.entry(src.path.clone()).or_insert(f)
        }
    };
    f.seek(SeekFrom::Start(off as u64))
        .map_err(|e| Error::io(&src.path, e))?;
    let want = (end - off) as u64;
    let n = std::io::copy(&mut f.take(want), w).map_err(|e| Error::io(path, e))?;
    if n != want {
        return Err(Error::tensor(&src.path, name, "source file is truncated"));
    }
    ctx.bar.inc(n);
    Ok((j, n))
}

/// Materialises the computed tensors from `i` on (at least one, then as many as fit in the
/// `window` bytes, stopping at a passthrough tensor) in parallel and writes them in order.
/// Returns the index after the window.
fn write_computed_window(
    ctx: &ShardContext,
    shard: &Shard,
    i: usize,
    w: &mut BufWriter<File>,
    path: &Path,
) -> Result<usize> {
    let mut j = i;
    let mut used = 0usize;
    while j < shard.tensors.len()
        && (j == i || used + shard.tensors[j].2 <= ctx.window)
        && !is_passthrough(shard.tensors[j].1)
    {
        used += shard.tensors[j].2;
        j += 1;
    }
    let done: Vec<Result<HostTensor>> = shard.tensors[i..j]
        .par_iter()
        .map(|(name, t, _)| {
            let h = materialize_checked(ctx, name, t)?;
            if h.shape != t.shape() {
                return Err(Error::tensor(
                    &ctx.plan.origin,
                    *name,
                    format!(
                        "computed shape {:?} differs from planned {:?}",
                        h.shape,
                        t.shape()
                    ),
                ));
            }
            Ok(h)
        })
        .collect();
    for h in done {
        let h = h?;
        w.write_all(&h.data).map_err(|e| Error::io(path, e))?;
        ctx.bar.inc(h.data.len() as u64);
    }
    Ok(j)
}

/// What every shard writer shares.
struct ShardContext<'a> {
    plan: &'a Plan,
    dir: &'a Path,
    prov: &'a str,
    window: usize,
    bar: &'a ProgressBar,
    allow_overflow: bool,
    overflow: &'a std::sync::Mutex<Overflow>,
}

/// Materialises one tensor in its target dtype. Values that are NaN or infinite before the
/// conversion are an error (surgeon never writes them); finite values that overflow the target
/// dtype are recorded in `ctx.overflow` and, with `allow_overflow`, clamped.
fn materialize_checked(ctx: &ShardContext, name: &str, t: &TensorEntry) -> Result<HostTensor> {
    let origin = &ctx.plan.origin;
    let named = |e| match e {
        Error::Invalid(m) => Error::tensor(origin, name, m),
        e => e,
    };
    let src = t.source.eval().map_err(named)?;
    let bad = crate::dtype::count_nonfinite(src.dtype, &src.data);
    if bad > 0 {
        return Err(Error::tensor(
            origin,
            name,
            format!(
                "{bad} of {} values are NaN or infinite; surgeon does not write non-finite weights",
                src.numel()
            ),
        ));
    }
    let h = src.cast(t.dtype);
    let over = crate::dtype::count_nonfinite(h.dtype, &h.data);
    if over == 0 {
        return Ok(h);
    }
    let mut o = ctx.overflow.lock().unwrap_or_else(|e| e.into_inner());
    o.tensors.insert(name.to_string(), over);
    drop(o);
    if !ctx.allow_overflow {
        return Ok(h);
    }
    let values = t.source.eval().map_err(named)?.to_f32();
    Ok(HostTensor {
        data: crate::dtype::from_f32_saturating(t.dtype, &values),
        ..h
    })
}

fn passthrough_span(
    t: &TensorEntry,
) -> Option<(
    &std::sync::Arc<crate::safetensors_file::SourceFile>,
    usize,
    usize,
    crate::DType,
)> {
    t.source.stored_span().filter(|(_, _, _, d)| *d == t.dtype)
}

fn is_passthrough(t: &TensorEntry) -> bool {
    t.source
        .stored_span()
        .is_some_and(|(_, _, _, d)| d == t.dtype)
}

/// Remote-code dialects ship their modeling code beside config.json (regenerated from the copy
/// compiled into surgeon, never copied from an input).
fn write_code_files(plan: &Plan, dir: &Path) -> Result<()> {
    for (name, text) in choose_export(&plan.arch).format.code_files() {
        let target = dir.join(name);
        std::fs::write(&target, text).map_err(|e| Error::io(&target, e))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).unwrap();
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn model_card(plan: &Plan, opts: &WriteOptions) -> String {
    let a = &plan.arch;
    let mut s = String::new();
    s.push_str("---\nlibrary_name: transformers\ntags:\n- surgeon\n---\n\n");
    s.push_str(&format!(
        "# {} model made by surgeon\n\n",
        a.family.model_type()
    ));
    s.push_str(&format!("Source: `{}`\n\n", plan.origin));
    if !opts.description.is_empty() {
        s.push_str(&format!("Command: `{}`\n\n", opts.description));
    }
    if !a.surgeon.history.is_empty() {
        s.push_str("## What was done\n\n");
        for h in &a.surgeon.history {
            s.push_str(&format!("- {h}\n"));
        }
        s.push('\n');
    }
    if !a.surgeon.notes.is_empty() {
        s.push_str("## Notes\n\n");
        for n in &a.surgeon.notes {
            s.push_str(&format!("- {n}\n"));
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "## Architecture\n\n{} layers, hidden size {}, vocabulary {}, {} parameters{}.\n",
        a.num_layers(),
        a.hidden_size,
        a.vocab_size,
        group_digits(plan.parameter_count()),
        if a.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    ));
    let export = choose_export(a);
    match export.format {
        ExportFormat::Native(_) => {}
        ExportFormat::NemotronNas => s.push_str(&format!(
            "\nLayers differ from one another ({}). config.json is in NVIDIA's nemotron-nas layout \
             (`DeciLMForCausalLM`, `block_configs`), which vLLM, SGLang, llama.cpp and mlx-lm load \
             natively; transformers loads it with `trust_remote_code=True` (modeling_decilm.py).\n",
            export.reason
        )),
        ExportFormat::Surgeon => s.push_str(&format!(
            "\nLayers differ from one another ({}). Load with \
             `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: \
             modeling_surgeon.py in this directory implements it.\n",
            export.reason
        )),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }
}
