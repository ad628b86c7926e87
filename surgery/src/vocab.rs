//! Vocabulary extension: add tokens to the tokenizer (a given list, or new BPE merges learned from a
//! corpus), resize `embed_tokens` and `lm_head` (one matrix when tied) and initialise the new rows.
//!
//! Nothing is computed here except for `--init random` (which needs the old rows' statistics): the new
//! matrices are `concat[dim 0](old, new rows)` with the new rows a lazy mean of old rows, so old rows
//! are copied bitwise and, for text without new tokens, old-vocabulary logits are unchanged.
use crate::{Error, Result};
use std::sync::Arc;
use surgeon_formats::plan::{AuxFile, Op, Plan, Source, TensorEntry};
use surgeon_formats::tokenizer_extend::{self, Extension, NewToken};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// How new rows are initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Mean of all old rows (HF `resize_token_embeddings(mean_resizing=True)`).
    Mean,
    /// Mean of the old rows of the token's encoding under the old tokenizer (Bailong zip-tie).
    ZipTie,
    /// Normal with the old rows' mean and standard deviation, from `seed`.
    Random { seed: u64 },
}

impl Init {
    pub fn name(&self) -> &'static str {
        match self {
            Init::Mean => "mean",
            Init::ZipTie => "zip-tie",
            Init::Random { .. } => "random",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VocabOptions {
    pub init: Init,
    /// Pad the vocabulary (embedding rows) to a multiple of this; padding rows get the mean init and
    /// no token.
    pub pad_to_multiple: Option<usize>,
    /// `--train-corpus`: a pair must occur this often to be merged.
    pub min_frequency: u64,
}

impl Default for VocabOptions {
    fn default() -> Self {
        VocabOptions {
            init: Init::ZipTie,
            pad_to_multiple: None,
            min_frequency: 2,
        }
    }
}

/// What an extension did.
#[derive(Clone, Debug)]
pub struct VocabReport {
    pub old_vocab: usize,
    pub new_vocab: usize,
    pub tokens: Vec<NewToken>,
    /// Requested tokens not added, with the reason.
    pub skipped: Vec<(String, String)>,
    pub merges_added: usize,
    /// Rows added only to reach `pad_to_multiple`.
    pub padding_rows: usize,
}

fn tokenizer_bytes(plan: &Plan) -> Result<Vec<u8>> {
    plan.files
        .get("tokenizer.json")
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: no tokenizer.json; extend-vocab needs a Hugging Face tokenizer.json",
                plan.origin
            ))
        })?
        .read()
        .map_err(Error::from)
}

/// `extend-vocab --tokens`: adds `tokens` (skipping existing ones) and resizes the model.
pub fn extend_with_tokens(
    plan: &Plan,
    tokens: &[String],
    opts: &VocabOptions,
) -> Result<(Plan, VocabReport)> {
    if tokens.is_empty() {
        return Err(Error::invalid("the token list is empty: nothing to add"));
    }
    check_embeddings(plan)?;
    let ext = tokenizer_extend::add_tokens(&tokenizer_bytes(plan)?, tokens)?;
    apply(plan, ext, true, opts)
}

/// `extend-vocab --train-corpus --add N`: learns `n` new BPE merges on `corpus` (texts) and resizes
/// the model.
pub fn extend_with_corpus(
    plan: &Plan,
    corpus: &[String],
    n: usize,
    opts: &VocabOptions,
) -> Result<(Plan, VocabReport)> {
    check_embeddings(plan)?;
    let ext =
        tokenizer_extend::learn_merges(&tokenizer_bytes(plan)?, corpus, n, opts.min_frequency)?;
    apply(plan, ext, false, opts)
}

fn check_embeddings(plan: &Plan) -> Result<()> {
    let shape = plan.get(EMBED)?.shape();
    if shape.len() != 2 || shape[0] != plan.arch.vocab_size {
        return Err(Error::invalid(format!(
            "{}: {EMBED} has shape {shape:?}, expected [{}, hidden]",
            plan.origin, plan.arch.vocab_size
        )));
    }
    Ok(())
}

fn apply(
    plan: &Plan,
    ext: Extension,
    added_tokens: bool,
    opts: &VocabOptions,
) -> Result<(Plan, VocabReport)> {
    let v_old = plan.arch.vocab_size;
    if ext.old_len as usize != v_old {
        return Err(Error::invalid(format!(
            "{}: the tokenizer has {} ids but the embedding has {v_old} rows; extend-vocab needs them equal \
             (a model with padded or truncated embeddings is not supported yet)",
            plan.origin, ext.old_len
        )));
    }
    let k = ext.tokens.len();
    let mut v_new = v_old + k;
    if let Some(m) = opts.pad_to_multiple {
        if m == 0 {
            return Err(Error::invalid("`pad_to_multiple` must be at least 1"));
        }
        v_new = v_new.div_ceil(m) * m;
    }
    let padding = v_new - v_old - k;
    let groups: Vec<Vec<usize>> = ext
        .tokens
        .iter()
        .map(|t| t.old_ids.iter().map(|&i| i as usize).collect())
        .collect();

    let mut out = plan.clone();
    let names: Vec<&str> = if plan.arch.tie_word_embeddings {
        vec![EMBED]
    } else {
        vec![EMBED, LM_HEAD]
    };
    for (i, name) in names.iter().enumerate() {
        let entry = plan.get(name)?;
        let new_rows = new_rows(&entry.source, v_old, &groups, padding, opts.init, i as u64)?;
        let source = Source::op(Op::Concat {
            inputs: vec![entry.source.clone(), new_rows],
            dim: 0,
        });
        out.tensors.insert(
            name.to_string(),
            TensorEntry {
                source,
                // Old rows round-trip bitwise through f32 for every float dtype.
                dtype: entry.dtype,
            },
        );
    }
    out.arch.vocab_size = v_new;
    out.arch
        .surgeon
        .new_token_ids
        .extend(ext.tokens.iter().map(|t| t.id));
    let what = if added_tokens {
        format!("{k} added tokens")
    } else {
        format!("{k} tokens from {} learned BPE merges", ext.merges_added)
    };
    let pad = if padding > 0 {
        format!(
            ", padded with {padding} unused rows (mean init) to a multiple of {}",
            opts.pad_to_multiple.unwrap_or(1)
        )
    } else {
        String::new()
    };
    out.arch.surgeon.history.push(format!(
        "extend-vocab: {what} ({}), ids {}..{}, init {}, vocab {v_old} -> {v_new}{pad}",
        ext.style,
        v_old,
        v_old + k,
        opts.init.name()
    ));

    // Tokenizer files.
    let tok_json = ext.tokenizer_json.clone();
    out.files
        .insert("tokenizer.json".into(), AuxFile::Bytes(Arc::new(tok_json)));
    if let Some(cfg) = plan.files.get("tokenizer_config.json") {
        let new_cfg = tokenizer_extend::update_tokenizer_config(&cfg.read()?, &ext, added_tokens)?;
        out.files.insert(
            "tokenizer_config.json".into(),
            AuxFile::Bytes(Arc::new(new_cfg)),
        );
    }
    // Slow-tokenizer files would disagree with the new tokenizer.json.
    for stale in [
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
    ] {
        if out.files.remove(stale).is_some() {
            out.arch.surgeon.notes.push(format!(
                "extend-vocab dropped the stale {stale}; tokenizer.json holds the extended tokenizer"
            ));
        }
    }
    out.validate()?;
    let report = VocabReport {
        old_vocab: v_old,
        new_vocab: v_new,
        tokens: ext.tokens,
        skipped: ext.skipped,
        merges_added: ext.merges_added,
        padding_rows: padding,
    };
    Ok((out, report))
}

/// The `k + padding` new rows of a `[v_old, h]` matrix, lazily: zip-tie groups (an empty group falls
/// back to the mean of all rows), the mean of all rows, or random normals.
pub fn new_rows(
    old: &Source,
    v_old: usize,
    groups: &[Vec<usize>],
    padding: usize,
    init: Init,
    salt: u64,
) -> Result<Source> {
    let h = old.shape()[1];
    let k = groups.len();
    let all = || {
        Source::op(Op::MeanRows {
            input: old.clone(),
            groups: Arc::new(vec![(0..v_old).collect()]),
            label: "mean of all rows".into(),
        })
    };
    let mut parts: Vec<Source> = vec![];
    match init {
        Init::Mean => {
            return Ok(all().rows(vec![0; k + padding], "mean init"));
        }
        Init::ZipTie => {
            if groups.iter().all(|g| !g.is_empty()) {
                parts.push(Source::op(Op::MeanRows {
                    input: old.clone(),
                    groups: Arc::new(groups.to_vec()),
                    label: "zip-tie".into(),
                }));
            } else {
                // Rows of [zip-tie groups..., mean of all] picked in token order.
                let nonempty: Vec<Vec<usize>> =
                    groups.iter().filter(|g| !g.is_empty()).cloned().collect();
                let mean_idx = nonempty.len();
                let mut order = vec![];
                let mut j = 0;
                for g in groups {
                    if g.is_empty() {
                        order.push(mean_idx);
                    } else {
                        order.push(j);
                        j += 1;
                    }
                }
                let mut inputs = vec![];
                if !nonempty.is_empty() {
                    inputs.push(Source::op(Op::MeanRows {
                        input: old.clone(),
                        groups: Arc::new(nonempty),
                        label: "zip-tie".into(),
                    }));
                }
                inputs.push(all());
                let cat = if inputs.len() == 1 {
                    inputs.pop().unwrap()
                } else {
                    Source::op(Op::Concat { inputs, dim: 0 })
                };
                parts.push(cat.rows(order, "zip-tie, mean for empty encodings"));
            }
        }
        Init::Random { seed } => {
            let t = old.eval()?.to_f32();
            let n = t.len() as f64;
            let mean = t.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = t.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            parts.push(Source::Random {
                shape: vec![k, h],
                seed: seed.wrapping_mul(0x9E37_79B9).wrapping_add(salt),
                mean: mean as f32,
                std: var.sqrt() as f32,
            });
        }
    }
    if padding > 0 {
        parts.push(all().rows(vec![0; padding], "padding"));
    }
    Ok(if parts.len() == 1 {
        parts.pop().unwrap()
    } else {
        Source::op(Op::Concat {
            inputs: parts,
            dim: 0,
        })
    })
}

/// Reads a `--tokens` file: one token per line (the line ending is not part of the token; empty lines
/// are ignored).
pub fn read_token_file(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| surgeon_formats::Error::io(path, e))?;
    let tokens: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(surgeon_formats::Error::format(
            path,
            "the token file is empty (one token per line expected)",
        )
        .into());
    }
    Ok(tokens)
}

/// Reads corpus files as lines (empty lines dropped).
pub fn read_corpus(paths: &[std::path::PathBuf]) -> Result<Vec<String>> {
    let mut out = vec![];
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| surgeon_formats::Error::io(p, e))?;
        out.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    Ok(out)
}
