//! Opening a model: a Hugging Face directory, a GGUF file or a Hub id, into a [`Plan`].
use crate::config::read_config;
use crate::plan::{AuxFile, Plan, Source, TensorEntry, AUX_FILE_NAMES};
use crate::safetensors_file::{parse_header, SourceFile};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens `spec`: a model directory, a `.gguf` file, or a Hub id `org/name[@revision]`.
pub fn open_model(spec: &str) -> Result<Plan> {
    if let Some(id) = spec.strip_prefix("hf://") {
        let dir = crate::hub::resolve(id)?;
        let mut plan = open_hf_dir(&dir)?;
        plan.origin = format!("hf://{id}");
        return Ok(plan);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return open_hf_dir(path);
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return open_gguf(path);
    }
    if path.exists() {
        return Err(Error::format(path, "not a model directory or a .gguf file"));
    }
    if crate::hub::looks_like_hub_id(spec) {
        // `out/typo` where `out` is a local directory is a mistyped path, not a Hub id.
        let first = spec.split('/').next().unwrap_or_default();
        if Path::new(first).is_dir() {
            return Err(Error::format(
                path,
                format!(
                    "no such file or directory (`{first}` is a local directory, so this is \
                     not taken as a Hub id; write hf://{spec} for the Hub)"
                ),
            ));
        }
        let dir = crate::hub::resolve(spec).map_err(|e| {
            Error::format(
                path,
                format!("no such local file or directory, and as a Hub id: {e}"),
            )
        })?;
        let mut plan = open_hf_dir(&dir)?;
        plan.origin = format!("hf://{spec}");
        return Ok(plan);
    }
    Err(Error::format(
        path,
        "no such file or directory (and not a Hub id of the form org/name[@revision])",
    ))
}

fn open_gguf(path: &Path) -> Result<Plan> {
    crate::gguf_import::plan_from_gguf(path)
}

/// Opens a Hugging Face model directory (config.json + safetensors, sharded or not).
pub fn open_hf_dir(dir: &Path) -> Result<Plan> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::format(dir, "missing config.json"));
    }
    let arch = read_config(&config_path)?;
    let layout = shard_layout(dir)?;
    let mut tensors = crate::layout::from_stored(dir, &arch, read_shards(dir, &layout)?)?;
    // Tied checkpoints sometimes store lm_head anyway; it is the embedding, so drop the copy.
    if arch.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let plan = Plan {
        arch,
        tensors,
        files: aux_files(dir),
        origin: dir.display().to_string(),
    };
    plan.validate().map_err(|e| match e {
        Error::Mismatch { problems, .. } => Error::Mismatch {
            path: dir.to_path_buf(),
            problems,
        },
        other => other,
    })?;
    Ok(plan)
}

/// Which files hold which tensors.
#[derive(Default)]
struct ShardLayout {
    /// Tensor -> shard file, from `model.safetensors.index.json` (empty without an index).
    expected_in: BTreeMap<String, String>,
    /// The shard file names, sorted.
    shard_names: Vec<String>,
}

/// The shards of `dir`: those of the index when there is one, else `model.safetensors`, else every
/// `*.safetensors` file.
fn shard_layout(dir: &Path) -> Result<ShardLayout> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        return read_index(&index_path);
    }
    if dir.join("model.safetensors").is_file() {
        return Ok(ShardLayout {
            shard_names: vec!["model.safetensors".into()],
            ..Default::default()
        });
    }
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::format(
            dir,
            "no safetensors weights (model.safetensors or an index)",
        ));
    }
    Ok(ShardLayout {
        shard_names: found,
        ..Default::default()
    })
}

/// Reads `model.safetensors.index.json`; a shard name must be a plain file name in the directory (an
/// index must not make us read elsewhere).
fn read_index(index_path: &Path) -> Result<ShardLayout> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index_path, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index_path, "weight_map", "missing or not an object"))?;
    let mut layout = ShardLayout::default();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::config(
                index_path,
                format!("weight_map.{tensor}"),
                "not a file name",
            )
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(Error::config(
                index_path,
                format!("weight_map.{tensor}"),
                format!("`{file}` is not a file in this directory"),
            ));
        }
        layout.expected_in.insert(tensor.clone(), file.to_string());
        if !layout.shard_names.contains(&file.to_string()) {
            layout.shard_names.push(file.to_string());
        }
    }
    layout.shard_names.sort();
    Ok(layout)
}

/// Every tensor of every shard as a stored source, checked against the index: each tensor in the
/// shard the index names, none twice, none of the index missing.
fn read_shards(dir: &Path, layout: &ShardLayout) -> Result<BTreeMap<String, TensorEntry>> {
    let mut tensors = BTreeMap::new();
    for shard in &layout.shard_names {
        let path = dir.join(shard);
        let file = Arc::new(SourceFile::open(&path)?);
        let header = parse_header(&path, file.bytes())?;
        for t in header.tensors {
            if let Some(want) = layout.expected_in.get(&t.name) {
                if want != shard {
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        format!("the index places this tensor in {want}"),
                    ));
                }
            }
            if tensors.contains_key(&t.name) {
                return Err(Error::tensor(
                    &path,
                    &t.name,
                    "appears in more than one shard",
                ));
            }
            let source = Source::Stored {
                file: file.clone(),
                tensor: t.name.clone(),
                offset: t.offset,
                dtype: t.dtype,
                shape: t.shape,
            };
            tensors.insert(t.name, TensorEntry::new(source));
        }
    }
    for (tensor, file) in &layout.expected_in {
        if !tensors.contains_key(tensor) {
            return Err(Error::tensor(
                dir.join(file),
                tensor,
                "named in model.safetensors.index.json but missing from its shard",
            ));
        }
    }
    Ok(tensors)
}

/// The auxiliary files (tokenizer, generation config...) present in `dir`, carried by path.
fn aux_files(dir: &Path) -> BTreeMap<String, AuxFile> {
    let mut files = BTreeMap::new();
    for name in AUX_FILE_NAMES {
        let p = dir.join(name);
        if p.is_file() {
            files.insert(name.to_string(), AuxFile::Path(p));
        }
    }
    files
}

/// A file a plan reads, as met by [`visit_inputs`].
enum Input<'a> {
    /// A safetensors shard holding raw tensor data.
    Shard(&'a Path),
    /// A file whose tensors are decoded while writing (GGUF).
    Encoded(&'a Path),
    /// An auxiliary file carried by path.
    Aux(&'a Path),
}

/// Calls `visit` on every file the plan reads: tensor sources (through operations) in tensor order,
/// then auxiliary files. A file may be met more than once.
fn visit_inputs(plan: &Plan, visit: &mut dyn FnMut(Input<'_>)) {
    fn walk(s: &Source, visit: &mut dyn FnMut(Input<'_>)) {
        match s {
            Source::Stored { file, .. } => visit(Input::Shard(&file.path)),
            Source::Encoded { file, .. } => visit(Input::Encoded(&file.path)),
            Source::Op(op) => match op.as_ref() {
                crate::plan::Op::Rows { input, .. }
                | crate::plan::Op::Cols { input, .. }
                | crate::plan::Op::Scale { input, .. }
                | crate::plan::Op::AddScalar { input, .. }
                | crate::plan::Op::Reshape { input, .. }
                | crate::plan::Op::MeanRows { input, .. } => walk(input, visit),
                crate::plan::Op::Concat { inputs, .. } => {
                    inputs.iter().for_each(|i| walk(i, visit))
                }
            },
            _ => {}
        }
    }
    for t in plan.tensors.values() {
        walk(&t.source, visit);
    }
    for f in plan.files.values() {
        if let AuxFile::Path(p) = f {
            visit(Input::Aux(p));
        }
    }
}

/// The files and directories a plan reads: a safetensors model's directory, a GGUF file, the
/// directories of carried files (used to refuse an output that holds or lies inside an input).
pub fn input_paths(plan: &Plan) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = vec![];
    visit_inputs(plan, &mut |input| {
        // A shard stands for its model directory, a carried file for the directory it came from;
        // a GGUF file is a model by itself (its folder may hold anything, an import's output too).
        let p = match input {
            Input::Shard(p)
                if p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf")) =>
            {
                p
            }
            Input::Shard(p) | Input::Aux(p) => match p.parent() {
                Some(dir) => dir,
                None => return,
            },
            Input::Encoded(p) => p,
        };
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        if !paths.contains(&p) {
            paths.push(p);
        }
    });
    paths
}

/// The files a plan reads (tensor sources and auxiliary files), as given, without duplicates.
pub fn input_files(plan: &Plan) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = vec![];
    visit_inputs(plan, &mut |input| {
        let (Input::Shard(p) | Input::Encoded(p) | Input::Aux(p)) = input;
        if !files.iter().any(|f| f == p) {
            files.push(p.to_path_buf());
        }
    });
    files
}
