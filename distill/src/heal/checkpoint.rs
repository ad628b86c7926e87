//! Checkpoints of a healing run: `OUT/checkpoints/step-NNNNNN/` holds the trainable tensors as a
//! loadable model plus `trainer_state/` (state.json, optimizer moments, metrics.csv). Every read and
//! write of that layout lives here.
use super::metrics::{read_csv, write_csv};
use super::plan::Trajectory;
use super::{io_err, Error, MetricRow, Result};
use crate::model::AdapterValues;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use surgeon_formats::{Plan, WriteOptions};

/// Subdirectory of a checkpoint holding everything but the weights.
pub const STATE_DIR: &str = "trainer_state";
pub const STATE_FILE: &str = "state.json";
pub const OPTIM_FILE: &str = "optimizer"; // the recorder appends `.bin`
const METRICS_FILE: &str = "metrics.csv";
/// Adapter parameters (LoRA, CLOVER cores) of an adapter run; the model beside them has them merged.
pub const ADAPTERS_FILE: &str = "adapters.safetensors";

/// What a checkpoint records besides weights and optimizer moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Training sequences consumed (the data position; the order is a function of the seed).
    pub samples: u64,
    /// Fingerprint of the model being healed (architecture, tensor names and shapes, final norm).
    pub model_fingerprint: String,
    /// Fingerprint of the packed training sequences.
    pub data_fingerprint: String,
    /// Settings that must not change across a resume.
    pub trajectory: Trajectory,
    pub trainable: Vec<String>,
    pub eval_ppl_before: Option<f64>,
}

impl TrainerState {
    /// Version 2: the trajectory is a structured value (version 1 wrote it as text).
    pub const VERSION: u32 = 2;
}

/// The directory holding the checkpoints of the output directory `out`.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The directory of the checkpoint at `step` in the output directory `out`.
pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:06}"))
}

/// Why `dir` is not a complete checkpoint, or `None` when it is.
pub fn incomplete_reason(dir: &Path) -> Option<String> {
    let state = dir.join(STATE_DIR);
    let missing = |p: PathBuf| Some(format!("{} is missing", p.display()));
    if !dir.join("config.json").is_file() {
        return missing(dir.join("config.json"));
    }
    if !dir.join("model.safetensors").is_file()
        && !dir.join("model.safetensors.index.json").is_file()
    {
        return missing(dir.join("model.safetensors"));
    }
    let state_file = state.join(STATE_FILE);
    match std::fs::read_to_string(&state_file) {
        Err(_) => return missing(state_file),
        Ok(s) if serde_json::from_str::<serde_json::Value>(&s).is_err() => {
            return Some(format!("{} is not valid JSON", state_file.display()))
        }
        Ok(_) => {}
    }
    let optim = state.join(format!("{OPTIM_FILE}.bin"));
    match std::fs::metadata(&optim) {
        Err(_) => missing(optim),
        Ok(md) if md.len() == 0 => Some(format!("{} is empty", optim.display())),
        Ok(_) => None,
    }
}

/// The error for an optimizer record that does not load: names the file and keeps the
/// recorder's (often very long) message to its first line.
pub fn optimizer_error(path: &Path, e: impl std::fmt::Display) -> Error {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let short: String = first.chars().take(160).collect();
    let ellipsis = if short.len() < text.len() { "..." } else { "" };
    Error::Checkpoint(format!(
        "{}: the optimizer state does not load (truncated or corrupt; resume from an earlier \
         checkpoint): {short}{ellipsis}",
        path.display()
    ))
}

/// The checkpoints in `out/checkpoints`, by step, ascending.
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut found = vec![];
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(out)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok());
            let Some(n) = step else { continue };
            match incomplete_reason(&e.path()) {
                None => found.push((n, e.path())),
                Some(why) => eprintln!(
                    "warning: skipping the incomplete checkpoint {}: {why}",
                    e.path().display()
                ),
            }
        }
    }
    found.sort();
    found
}

/// Finds `dir/trainer_state`, or the latest complete `dir/checkpoints/step-*` (incomplete ones are
/// skipped with a warning).
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        return Err(Error::Checkpoint(format!(
            "resume {}: no such directory",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::Checkpoint(format!(
            "resume {}: not a directory (give a checkpoint or a heal output directory)",
            dir.display()
        )));
    }
    if dir.join(STATE_DIR).exists() {
        return match incomplete_reason(dir) {
            None => Ok(dir.to_path_buf()),
            Some(why) => Err(Error::Checkpoint(format!(
                "{} is an incomplete checkpoint: {why}",
                dir.display()
            ))),
        };
    }
    list_checkpoints(dir).pop().map(|b| b.1).ok_or_else(|| {
        Error::Checkpoint(format!(
            "{} is not a checkpoint (no complete {STATE_DIR}/{STATE_FILE}, no complete \
             checkpoints/step-*)",
            dir.display()
        ))
    })
}

/// Reads a checkpoint's state.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_DIR).join(STATE_FILE);
    let s = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    serde_json::from_str(&s).map_err(|e| Error::Checkpoint(format!("{}: {e}", p.display())))
}

/// Reads a checkpoint's metrics up to its step.
pub fn read_metrics(dir: &Path, state: &TrainerState) -> Result<Vec<MetricRow>> {
    let mut m = read_csv(&dir.join(STATE_DIR).join(METRICS_FILE))?;
    m.retain(|r| r.step <= state.step);
    Ok(m)
}

/// Loads a checkpoint's optimizer moments into `optim`.
pub fn load_optimizer<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>>(
    dir: &Path,
    optim: O,
    device: &B::Device,
) -> Result<O> {
    let path = dir.join(STATE_DIR).join(OPTIM_FILE);
    let rec = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(path.clone(), device)
        .map_err(|e| optimizer_error(&path.with_extension("bin"), e))?;
    Ok(optim.load_record(rec))
}

/// Writes `adapters` (f32) to `path`.
fn write_adapters(path: &Path, adapters: &AdapterValues) -> Result<()> {
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = adapters
        .iter()
        .map(|(n, (shape, v))| (n, f32_bytes(v), shape))
        .collect();
    let views = bytes.iter().map(|(n, b, shape)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), b)
            .expect("sizes match");
        (n.as_str(), view)
    });
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::Checkpoint(format!("{}: saving adapters: {e}", path.display())))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Reads the adapter values of the checkpoint `dir` (written by an adapter run).
pub fn read_adapters(dir: &Path) -> Result<AdapterValues> {
    let p = dir.join(STATE_DIR).join(ADAPTERS_FILE);
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    let bad = |e: String| Error::Checkpoint(format!("{}: {e}", p.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = AdapterValues::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("`{name}` is {:?}, not F32", view.dtype())));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Writes a checkpoint into `dir`: `weights` as a model plus `trainer_state/` (optimizer record,
/// metrics, state, and the `adapters` of an adapter run), all in one temporary sibling renamed into place at the end, so a crash or a
/// full disk leaves no half-written `step-N` to block `--resume`.
pub fn save<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>>(
    dir: &Path,
    weights: &Plan,
    optim: &O,
    state: &TrainerState,
    metrics: &[MetricRow],
    adapters: &AdapterValues,
) -> Result<()> {
    let opts = WriteOptions {
        force: true,
        description: format!("healing checkpoint, step {}", state.step),
        ..Default::default()
    };
    surgeon_formats::writer::write_model_then(weights, dir, &opts, |tmp| {
        let sd = tmp.join(STATE_DIR);
        std::fs::create_dir_all(&sd).map_err(io_err(&sd))?;
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), sd.join(OPTIM_FILE))
            .map_err(|e| {
                Error::Checkpoint(format!("{}: saving optimizer state: {e}", sd.display()))
            })?;
        write_csv(&sd.join(METRICS_FILE), metrics)?;
        if !adapters.is_empty() {
            write_adapters(&sd.join(ADAPTERS_FILE), adapters)?;
        }
        let json = serde_json::to_string_pretty(state).expect("serialisable");
        let p = sd.join(STATE_FILE);
        std::fs::write(&p, json).map_err(io_err(&p))
    })?;
    Ok(())
}
