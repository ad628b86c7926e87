//! The plan: an architecture plus a table of lazily defined tensors.
//!
//! Operators rewrite a plan without touching data; the [writer](crate::writer) materialises it tensor
//! by tensor. A plan renders to deterministic text (`--dry-run`), which tests snapshot.
use crate::arch::{split_layer_name, ModelArch};
use crate::dtype::{self, DType};
use crate::safetensors_file::SourceFile;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

/// A tensor held in memory: little-endian elements of `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape/data mismatch"
        );
        HostTensor {
            dtype: DType::F32,
            shape,
            data: dtype::from_f32(DType::F32, values),
        }
    }
    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Self {
        let n: usize = shape.iter().product();
        HostTensor {
            dtype,
            shape,
            data: vec![0; n * dtype.size()],
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn to_f32(&self) -> Vec<f32> {
        dtype::to_f32(self.dtype, &self.data)
    }
    pub fn cast(self, to: DType) -> HostTensor {
        if self.dtype == to {
            return self;
        }
        HostTensor {
            data: dtype::convert(&self.data, self.dtype, to),
            dtype: to,
            shape: self.shape,
        }
    }
}

/// Decodes a stored encoding (e.g. a GGUF quantisation) into f32.
pub trait Codec: Send + Sync {
    /// Short name shown in plans, e.g. `q4_1`.
    fn name(&self) -> String;
    fn decode(&self, bytes: &[u8], numel: usize) -> std::result::Result<Vec<f32>, String>;
}

/// Where a tensor's values come from.
#[derive(Clone)]
pub enum Source {
    /// Raw little-endian elements at a byte range of a file.
    Stored {
        file: Arc<SourceFile>,
        /// Name of the tensor in its source file (for plans and errors).
        tensor: String,
        offset: usize,
        dtype: DType,
        shape: Vec<usize>,
    },
    /// An encoded byte range decoded to f32 by `codec` (GGUF quantisations).
    Encoded {
        file: Arc<SourceFile>,
        tensor: String,
        offset: usize,
        len: usize,
        shape: Vec<usize>,
        codec: Arc<dyn Codec>,
    },
    Zeros {
        shape: Vec<usize>,
        dtype: DType,
    },
    /// Deterministic pseudo-random normal values (synthetic checkpoints, random initialisation).
    Random {
        shape: Vec<usize>,
        seed: u64,
        mean: f32,
        std: f32,
    },
    /// Values computed by an operator or by training, held in memory. `label` says what they are.
    Inline {
        label: String,
        tensor: Arc<HostTensor>,
    },
    Op(Box<Op>),
}

/// An operation over other sources.
#[derive(Clone)]
pub enum Op {
    /// Rows `indices` of `input` along dim 0 (also used for permutations). `label` names the
    /// selection in plans (e.g. `expert 3`, `unpermute rope`).
    Rows {
        input: Source,
        indices: Arc<Vec<usize>>,
        label: String,
    },
    /// Columns `indices` of a 2-D `input` (last dim).
    Cols {
        input: Source,
        indices: Arc<Vec<usize>>,
        label: String,
    },
    /// Concatenation along `dim`.
    Concat { inputs: Vec<Source>, dim: usize },
    /// Multiply every element by `factor`.
    Scale { input: Source, factor: f32 },
    /// Add `value` to every element (e.g. llama.cpp's Gemma norms, stored as `1 + w`).
    AddScalar { input: Source, value: f32 },
    /// Same elements, another shape (element counts must agree).
    Reshape { input: Source, shape: Vec<usize> },
    /// Output row g is the mean of input rows `groups[g]` (computed in f64).
    MeanRows {
        input: Source,
        groups: Arc<Vec<Vec<usize>>>,
        label: String,
    },
}

impl Source {
    pub fn op(op: Op) -> Source {
        Source::Op(Box::new(op))
    }
    pub fn inline(label: impl Into<String>, tensor: HostTensor) -> Source {
        Source::Inline {
            label: label.into(),
            tensor: Arc::new(tensor),
        }
    }
    pub fn rows(self, indices: Vec<usize>, label: impl Into<String>) -> Source {
        Source::op(Op::Rows {
            input: self,
            indices: Arc::new(indices),
            label: label.into(),
        })
    }
    pub fn cols(self, indices: Vec<usize>, label: impl Into<String>) -> Source {
        Source::op(Op::Cols {
            input: self,
            indices: Arc::new(indices),
            label: label.into(),
        })
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Source::Stored { shape, .. }
            | Source::Encoded { shape, .. }
            | Source::Zeros { shape, .. }
            | Source::Random { shape, .. } => shape.clone(),
            Source::Inline { tensor, .. } => tensor.shape.clone(),
            Source::Op(op) => match op.as_ref() {
                Op::Rows { input, indices, .. } => {
                    let mut s = input.shape();
                    s[0] = indices.len();
                    s
                }
                Op::Cols { input, indices, .. } => {
                    let mut s = input.shape();
                    *s.last_mut().unwrap() = indices.len();
                    s
                }
                Op::Concat { inputs, dim } => {
                    let mut s = inputs[0].shape();
                    s[*dim] = inputs.iter().map(|i| i.shape()[*dim]).sum();
                    s
                }
                Op::Scale { input, .. } | Op::AddScalar { input, .. } => input.shape(),
                Op::Reshape { shape, .. } => shape.clone(),
                Op::MeanRows { input, groups, .. } => {
                    let mut s = input.shape();
                    s[0] = groups.len();
                    s
                }
            },
        }
    }

    /// The dtype this source naturally produces.
    pub fn dtype(&self) -> DType {
        match self {
            Source::Stored { dtype, .. } | Source::Zeros { dtype, .. } => *dtype,
            Source::Encoded { .. } | Source::Random { .. } => DType::F32,
            Source::Inline { tensor, .. } => tensor.dtype,
            Source::Op(op) => match op.as_ref() {
                Op::Rows { input, .. } | Op::Cols { input, .. } | Op::Reshape { input, .. } => {
                    input.dtype()
                }
                Op::Concat { inputs, .. } => {
                    let d = inputs[0].dtype();
                    if inputs.iter().all(|i| i.dtype() == d) {
                        d
                    } else {
                        DType::F32
                    }
                }
                Op::Scale { .. } | Op::AddScalar { .. } | Op::MeanRows { .. } => DType::F32,
            },
        }
    }

    /// True when the source is raw bytes of a file in `dtype`: the writer can copy it unchanged.
    pub fn stored_span(&self) -> Option<(&Arc<SourceFile>, usize, usize, DType)> {
        match self {
            Source::Stored {
                file,
                offset,
                dtype,
                shape,
                ..
            } => Some((
                file,
                *offset,
                shape.iter().product::<usize>() * dtype.size(),
                *dtype,
            )),
            _ => None,
        }
    }

    /// Computes the values. Memory: the result plus transient inputs of one operation.
    pub fn eval(&self) -> Result<HostTensor> {
        match self {
            Source::Stored {
                file,
                tensor,
                offset,
                dtype,
                shape,
            } => {
                let len = shape.iter().product::<usize>() * dtype.size();
                let bytes = file.bytes().get(*offset..offset + len).ok_or_else(|| {
                    Error::tensor(&file.path, tensor, "data lies beyond the end of the file")
                })?;
                Ok(HostTensor {
                    dtype: *dtype,
                    shape: shape.clone(),
                    data: bytes.to_vec(),
                })
            }
            Source::Encoded {
                file,
                tensor,
                offset,
                len,
                shape,
                codec,
            } => {
                let bytes = file.bytes().get(*offset..offset + len).ok_or_else(|| {
                    Error::tensor(&file.path, tensor, "data lies beyond the end of the file")
                })?;
                let numel = shape.iter().product();
                let values = codec
                    .decode(bytes, numel)
                    .map_err(|m| Error::tensor(&file.path, tensor, m))?;
                Ok(HostTensor::from_f32(shape.clone(), &values))
            }
            Source::Zeros { shape, dtype } => Ok(HostTensor::zeros(shape.clone(), *dtype)),
            Source::Random {
                shape,
                seed,
                mean,
                std,
            } => {
                let n: usize = shape.iter().product();
                let mut v = random_normal(*seed, n, *std);
                v.iter_mut().for_each(|x| *x += mean);
                Ok(HostTensor::from_f32(shape.clone(), &v))
            }
            Source::Inline { tensor, .. } => Ok(tensor.as_ref().clone()),
            Source::Op(op) => op.eval(),
        }
    }
}

impl Op {
    fn eval(&self) -> Result<HostTensor> {
        match self {
            Op::Rows { input, indices, .. } => select_rows(input.eval()?, indices),
            Op::Cols { input, indices, .. } => select_cols(input.eval()?, indices),
            Op::Concat { inputs, dim } => {
                let parts = inputs
                    .iter()
                    .map(Source::eval)
                    .collect::<Result<Vec<_>>>()?;
                Ok(concat(parts, *dim))
            }
            Op::Reshape { input, shape } => {
                let mut t = input.eval()?;
                if t.numel() != shape.iter().product::<usize>() {
                    return Err(Error::invalid(format!(
                        "cannot reshape {:?} to {shape:?}",
                        t.shape
                    )));
                }
                t.shape = shape.clone();
                Ok(t)
            }
            Op::Scale { input, factor } => {
                let t = input.eval()?;
                let v: Vec<f32> = t.to_f32().iter().map(|x| x * factor).collect();
                Ok(HostTensor::from_f32(t.shape, &v))
            }
            Op::AddScalar { input, value } => {
                let t = input.eval()?;
                let v: Vec<f32> = t.to_f32().iter().map(|x| x + value).collect();
                Ok(HostTensor::from_f32(t.shape, &v))
            }
            Op::MeanRows { input, groups, .. } => mean_rows(input.eval()?, groups),
        }
    }
}

/// Rows `indices` of `t` along dim 0, in that order (repeats allowed), in `t`'s dtype.
fn select_rows(t: HostTensor, indices: &[usize]) -> Result<HostTensor> {
    let row = row_bytes(&t);
    let rows = t.shape.first().copied().unwrap_or(0);
    let mut data = Vec::with_capacity(row * indices.len());
    for &i in indices {
        if i >= rows {
            return Err(Error::invalid(format!(
                "row {i} out of range for a tensor of {rows} rows"
            )));
        }
        data.extend_from_slice(&t.data[i * row..(i + 1) * row]);
    }
    let mut shape = t.shape.clone();
    shape[0] = indices.len();
    Ok(HostTensor {
        dtype: t.dtype,
        shape,
        data,
    })
}

/// Columns `indices` (last dim) of `t`, in that order, in `t`'s dtype.
fn select_cols(t: HostTensor, indices: &[usize]) -> Result<HostTensor> {
    let cols = *t.shape.last().unwrap_or(&0);
    let es = t.dtype.size();
    let nrows = t.numel().checked_div(cols).unwrap_or(0);
    if let Some(&bad) = indices.iter().find(|&&i| i >= cols) {
        return Err(Error::invalid(format!(
            "column {bad} out of range for a tensor of {cols} columns"
        )));
    }
    let mut data = Vec::with_capacity(nrows * indices.len() * es);
    for r in 0..nrows {
        let base = r * cols * es;
        for &c in indices {
            data.extend_from_slice(&t.data[base + c * es..base + (c + 1) * es]);
        }
    }
    let mut shape = t.shape.clone();
    *shape.last_mut().unwrap() = indices.len();
    Ok(HostTensor {
        dtype: t.dtype,
        shape,
        data,
    })
}

/// `parts` joined along `dim`, all cast to the dtype [`self_dtype`] picks for them.
fn concat(parts: Vec<HostTensor>, dim: usize) -> HostTensor {
    let dtype = self_dtype(&parts);
    let parts: Vec<HostTensor> = parts.into_iter().map(|p| p.cast(dtype)).collect();
    // Each part is `outer` contiguous chunks (one per index of the dims before `dim`); the
    // result interleaves them chunk by chunk.
    let outer: usize = parts[0].shape[..dim].iter().product();
    let mut shape = parts[0].shape.clone();
    shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
    let mut data = Vec::with_capacity(shape.iter().product::<usize>() * dtype.size());
    for o in 0..outer {
        for p in &parts {
            let chunk = p.data.len() / outer.max(1);
            data.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
        }
    }
    HostTensor { dtype, shape, data }
}

/// Output row g is the mean of the rows `groups[g]` of `t`, accumulated in f64 (f32 result).
fn mean_rows(t: HostTensor, groups: &[Vec<usize>]) -> Result<HostTensor> {
    let v = t.to_f32();
    let cols: usize = t.shape[1..].iter().product();
    let mut out = Vec::with_capacity(groups.len() * cols);
    let mut acc = vec![0f64; cols];
    for g in groups {
        if g.is_empty() {
            return Err(Error::invalid("mean over an empty set of rows"));
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        for &r in g {
            let row = v
                .get(r * cols..(r + 1) * cols)
                .ok_or_else(|| Error::invalid(format!("row {r} out of range for a mean")))?;
            for (a, x) in acc.iter_mut().zip(row) {
                *a += *x as f64;
            }
        }
        out.extend(acc.iter().map(|a| (a / g.len() as f64) as f32));
    }
    let mut shape = t.shape.clone();
    shape[0] = groups.len();
    Ok(HostTensor::from_f32(shape, &out))
}

/// `n` normal values with standard deviation `std`, fully determined by `seed` (splitmix64 +
/// Box-Muller), identical on every platform.
pub fn random_normal(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut state = seed ^ 0x9E3779B97F4A7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

fn self_dtype(parts: &[HostTensor]) -> DType {
    let d = parts[0].dtype;
    if parts.iter().all(|p| p.dtype == d) {
        d
    } else {
        DType::F32
    }
}

fn row_bytes(t: &HostTensor) -> usize {
    t.shape[1..].iter().product::<usize>() * t.dtype.size()
}

/// One entry of the tensor table: a source and the dtype it is written in.
#[derive(Clone)]
pub struct TensorEntry {
    pub source: Source,
    pub dtype: DType,
}

impl TensorEntry {
    pub fn new(source: Source) -> Self {
        let dtype = source.dtype();
        TensorEntry { source, dtype }
    }
    pub fn shape(&self) -> Vec<usize> {
        self.source.shape()
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    /// Values in the entry's dtype.
    pub fn materialize(&self) -> Result<HostTensor> {
        Ok(self.source.eval()?.cast(self.dtype))
    }
}

/// A non-tensor file that travels with the model (tokenizer, generation config, chat template).
#[derive(Clone, Debug)]
pub enum AuxFile {
    Path(PathBuf),
    Bytes(Arc<Vec<u8>>),
}

impl AuxFile {
    pub fn read(&self) -> Result<Vec<u8>> {
        match self {
            AuxFile::Path(p) => std::fs::read(p).map_err(|e| Error::io(p, e)),
            AuxFile::Bytes(b) => Ok(b.as_ref().clone()),
        }
    }
}

/// Files carried over from a source model when present.
pub const AUX_FILE_NAMES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// A model: its architecture, lazily defined tensors and the files that travel with it.
#[derive(Clone)]
pub struct Plan {
    pub arch: ModelArch,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub files: BTreeMap<String, AuxFile>,
    /// Where the model came from (a directory, a GGUF file, a hub id), for provenance.
    pub origin: String,
}

impl Plan {
    pub fn get(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::invalid(format!("{}: no tensor `{name}`", self.origin)))
    }

    /// A tensor's values as f32 with its shape (for runtimes and statistics).
    pub fn load_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.get(name)?.source.eval()?;
        Ok((t.shape.clone(), t.to_f32()))
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.numel() as u64).sum()
    }

    pub fn byte_size(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.numel() * t.dtype.size()) as u64)
            .sum()
    }

    /// Sets every tensor's output dtype.
    pub fn set_dtype(&mut self, dtype: DType) {
        for t in self.tensors.values_mut() {
            t.dtype = dtype;
        }
    }

    /// The dtype most tensors are written in (for `torch_dtype`).
    pub fn dominant_dtype(&self) -> DType {
        let mut counts: BTreeMap<DType, u64> = BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(t.dtype).or_default() += t.numel() as u64;
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
            .unwrap_or(DType::F32)
    }

    /// Tensor names in model order: embeddings, layers by number, final norm, lm_head.
    pub fn ordered_names(&self) -> Vec<&String> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort_by_cached_key(|n| tensor_order_key(n));
        names
    }

    /// Every disagreement between the tensor table and the architecture, one line each; problems
    /// with a layer's tensors name the layer and what its config says it is.
    pub fn check(&self) -> Vec<String> {
        let mut problems = vec![];
        let expected = self.arch.expected_tensors();
        for (name, shape) in &expected {
            let layer = self.layer_context(name);
            match self.tensors.get(name) {
                None => problems.push(format!(
                    "{layer}tensor `{name}` is missing (expected shape {shape:?})"
                )),
                Some(t) if &t.shape() != shape => problems.push(format!(
                    "{layer}tensor `{name}` has shape {:?} but the config implies {shape:?}",
                    t.shape()
                )),
                _ => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in self.tensors.keys() {
            if !known.contains(name.as_str()) {
                let layer = self.layer_context(name);
                problems.push(format!(
                    "{layer}tensor `{name}` is not part of this architecture"
                ));
            }
        }
        problems
    }

    /// `layer 3 (attention ... | mlp ...): ` for a layer's tensor, empty for others.
    fn layer_context(&self, name: &str) -> String {
        split_layer_name(name)
            .and_then(|(i, _)| Some((i, self.arch.layers.get(i)?)))
            .map(|(i, l)| format!("layer {i} ({}): ", describe_layer(l)))
            .unwrap_or_default()
    }

    /// Fails with every problem [`Plan::check`] finds.
    pub fn validate(&self) -> Result<()> {
        let problems = self.check();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Mismatch {
                path: PathBuf::from(&self.origin),
                problems,
            })
        }
    }

    /// Deterministic text rendering (`--dry-run`), snapshot-tested.
    pub fn render(&self) -> String {
        let a = &self.arch;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {}: {} layers, hidden {}, vocab {}, {}, rope theta {}, {} parameters",
            a.family.model_type(),
            a.num_layers(),
            a.hidden_size,
            a.vocab_size,
            if a.tie_word_embeddings {
                "tied embeddings"
            } else {
                "separate lm_head"
            },
            a.rope_theta,
            group_digits(self.parameter_count())
        );
        let _ = writeln!(s, "layers:");
        let mut i = 0;
        while i < a.layers.len() {
            let mut j = i + 1;
            while j < a.layers.len() && a.layers[j] == a.layers[i] {
                j += 1;
            }
            let _ = writeln!(
                s,
                "  {:<9} {}",
                format!("{i}..{j}"),
                describe_layer(&a.layers[i])
            );
            i = j;
        }
        if !a.surgeon.new_layers.is_empty() {
            let _ = writeln!(s, "new layers: {}", compress_indices(&a.surgeon.new_layers));
        }
        if !a.surgeon.new_token_ids.is_empty() {
            let ids: Vec<usize> = a
                .surgeon
                .new_token_ids
                .iter()
                .map(|&x| x as usize)
                .collect();
            let _ = writeln!(s, "new token ids: {}", compress_indices(&ids));
        }
        for h in &a.surgeon.history {
            let _ = writeln!(s, "history: {h}");
        }
        for n in &a.surgeon.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(s, "tensors:");
        let names = self.ordered_names();
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        for name in names {
            let t = &self.tensors[name];
            let src = render_source(&t.source);
            let cast = if t.source.dtype() != t.dtype {
                format!(" as {}", t.dtype)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  {name:<width$}  {:<4} {:<14} = {src}{cast}",
                t.dtype.to_string(),
                format!("{:?}", t.shape()),
            );
        }
        if !self.files.is_empty() {
            let names: Vec<&str> = self.files.keys().map(String::as_str).collect();
            let _ = writeln!(s, "files: {}", names.join(", "));
        }
        s
    }
}

/// One-line description of a layer, as in plans and `inspect`.
pub fn describe_layer(l: &crate::arch::Layer) -> String {
    use crate::arch::{AttentionKind, Mlp, MoeRouting};
    let at = &l.attention;
    let kind = match at.kind {
        AttentionKind::Softmax => "softmax".to_string(),
        AttentionKind::Hedgehog {
            feature_dim,
            window: 0,
        } => format!("hedgehog(features {feature_dim})"),
        AttentionKind::Hedgehog {
            feature_dim,
            window,
        } => format!("hedgehog(features {feature_dim}, window {window})"),
        AttentionKind::NoOp => String::new(),
        AttentionKind::Mla {
            kv_lora_rank,
            q_lora_rank,
            qk_rope_head_dim,
        } => {
            let q = q_lora_rank.map_or(String::new(), |q| format!(", q rank {q}"));
            format!("mla(kv rank {kv_lora_rank}, rope {qk_rope_head_dim}{q})")
        }
    };
    let bias = if at.qkv_bias { " qkv-bias" } else { "" };
    let bias = if at.qk_norm {
        format!("{bias} qk-norm")
    } else {
        bias.to_string()
    };
    // A global layer among sliding-window ones (Gemma's `full_attention`).
    let bias = if at.full_attention {
        format!("{bias} global")
    } else {
        bias
    };
    let mlp = match &l.mlp {
        Mlp::Dense { intermediate_size } => format!("dense {intermediate_size}"),
        Mlp::NoOp => "no-op".into(),
        Mlp::Moe {
            num_experts,
            top_k,
            intermediate_size,
            routing,
        } => {
            let r = match routing {
                MoeRouting::Mixtral => "mixtral routing".to_string(),
                MoeRouting::Scaled { scale } => format!("routing scaled x{scale}"),
                MoeRouting::Unnormalized => "top-k probabilities not renormalised".to_string(),
            };
            format!("moe {num_experts} experts x {intermediate_size}, top-{top_k}, {r}")
        }
    };
    if at.is_no_op() {
        return format!("attention no-op | mlp {mlp}");
    }
    let v = if at.v_head_dim != at.head_dim {
        format!(" v_head_dim {}", at.v_head_dim)
    } else {
        String::new()
    };
    format!(
        "attention {kind} {} heads / {} kv, head_dim {}{v}{bias} | mlp {mlp}",
        at.num_heads, at.num_kv_heads, at.head_dim
    )
}

fn render_source(s: &Source) -> String {
    match s {
        Source::Stored {
            file,
            tensor,
            dtype,
            ..
        } => format!("load({}: {tensor}, {dtype})", file.display_name),
        Source::Encoded {
            file,
            tensor,
            codec,
            ..
        } => format!("decode({}: {tensor}, {})", file.display_name, codec.name()),
        Source::Zeros { .. } => "zeros".into(),
        Source::Random {
            seed, mean, std, ..
        } => format!("random(seed {seed}, mean {mean}, std {std})"),
        Source::Inline { label, .. } => format!("inline({label})"),
        Source::Op(op) => match op.as_ref() {
            Op::Rows {
                input,
                indices,
                label,
            } => format!(
                "rows[{}{}]({})",
                label_prefix(label),
                compress_indices(indices),
                render_source(input)
            ),
            Op::Cols {
                input,
                indices,
                label,
            } => format!(
                "cols[{}{}]({})",
                label_prefix(label),
                compress_indices(indices),
                render_source(input)
            ),
            Op::Concat { inputs, dim } => format!(
                "concat[dim {dim}]({})",
                inputs
                    .iter()
                    .map(render_source)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Scale { input, factor } => format!("scale[{factor}]({})", render_source(input)),
            Op::AddScalar { input, value } => format!("add[{value}]({})", render_source(input)),
            Op::Reshape { input, shape } => format!("reshape{shape:?}({})", render_source(input)),
            Op::MeanRows {
                input,
                groups,
                label,
            } => format!(
                "mean_rows[{}{} groups]({})",
                label_prefix(label),
                groups.len(),
                render_source(input)
            ),
        },
    }
}

fn label_prefix(label: &str) -> String {
    if label.is_empty() {
        String::new()
    } else {
        format!("{label}: ")
    }
}

/// `0..4,7,9..12`; long lists are cut after 6 runs and fingerprinted so plans stay short but exact.
pub fn compress_indices(idx: &[usize]) -> String {
    let mut runs: Vec<String> = vec![];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && idx[j] == idx[j - 1] + 1 {
            j += 1;
        }
        runs.push(if j - i == 1 {
            idx[i].to_string()
        } else {
            format!("{}..{}", idx[i], idx[j - 1] + 1)
        });
        i = j;
    }
    if runs.len() <= 6 {
        return runs.join(",");
    }
    // FNV-1a: stable across platforms and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in idx {
        for b in (x as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!(
        "{},... {} indices #{:08x}",
        runs[..6].join(","),
        idx.len(),
        h as u32
    )
}

fn tensor_order_key(name: &str) -> (u8, usize, String) {
    if name.starts_with("model.embed_tokens") {
        (0, 0, name.to_string())
    } else if let Some((i, rest)) = split_layer_name(name) {
        (1, i, rest.to_string())
    } else if name.starts_with("model.norm") {
        (2, 0, name.to_string())
    } else {
        (3, 0, name.to_string())
    }
}

/// `134515008` -> `134,515,008`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize) -> Source {
        let v: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        Source::inline("t", HostTensor::from_f32(vec![rows, cols], &v))
    }

    #[test]
    fn rows_cols_concat_mean() {
        let r = t(3, 2).rows(vec![2, 0], "").eval().unwrap();
        assert_eq!(r.to_f32(), vec![4., 5., 0., 1.]);
        let c = t(2, 3).cols(vec![2, 1], "").eval().unwrap();
        assert_eq!(c.to_f32(), vec![2., 1., 5., 4.]);
        let cat = Source::op(Op::Concat {
            inputs: vec![t(1, 2), t(2, 2)],
            dim: 0,
        });
        assert_eq!(cat.shape(), vec![3, 2]);
        assert_eq!(cat.eval().unwrap().to_f32(), vec![0., 1., 0., 1., 2., 3.]);
        let cat1 = Source::op(Op::Concat {
            inputs: vec![t(2, 1), t(2, 2)],
            dim: 1,
        });
        assert_eq!(cat1.eval().unwrap().to_f32(), vec![0., 0., 1., 1., 2., 3.]);
        let m = Source::op(Op::MeanRows {
            input: t(3, 2),
            groups: Arc::new(vec![vec![0, 1, 2], vec![1]]),
            label: String::new(),
        });
        assert_eq!(m.eval().unwrap().to_f32(), vec![2., 3., 2., 3.]);
        let add = Source::op(Op::AddScalar {
            input: t(1, 3),
            value: -1.0,
        });
        assert_eq!(add.shape(), vec![1, 3]);
        assert_eq!(add.eval().unwrap().to_f32(), vec![-1., 0., 1.]);
    }

    #[test]
    fn index_compression() {
        assert_eq!(compress_indices(&[0, 1, 2, 5, 7, 8]), "0..3,5,7..9");
        let long: Vec<usize> = (0..40).map(|x| x * 2).collect();
        let s = compress_indices(&long);
        assert!(s.starts_with("0,2,4,6,8,10,... 40 indices #"), "{s}");
        assert_eq!(group_digits(134515008), "134,515,008");
    }
}
