//! Training data: text / jsonl files, tokenised with the model's tokenizer, packed into fixed-length
//! sequences with EOS between documents, and visited in a seeded shuffled order.
use super::{io_err, Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use surgeon_formats::Plan;

/// Where training (or eval) text comes from.
#[derive(Clone, Debug)]
pub enum DataSpec {
    /// Plain text (each file one document) or `.jsonl` (one document per line, `text` field).
    Files(Vec<PathBuf>),
    /// Documents given directly.
    Texts(Vec<String>),
    /// Already tokenised documents (no tokenizer needed).
    Tokens(Vec<Vec<u32>>),
}

/// Reads documents from files: `.jsonl`/`.json` lines with a `text` field, anything else as one document.
pub fn read_documents(files: &[PathBuf]) -> Result<Vec<String>> {
    if files.is_empty() {
        return Err(Error::Invalid("no `data` files given".into()));
    }
    let mut docs = Vec::new();
    for f in files {
        let s = std::fs::read_to_string(f).map_err(io_err(f))?;
        let is_jsonl = matches!(
            f.extension().and_then(|e| e.to_str()),
            Some("jsonl") | Some("ndjson")
        );
        if is_jsonl {
            for (i, line) in s.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    Error::Invalid(format!("{}:{}: not JSON: {e}", f.display(), i + 1))
                })?;
                let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::Invalid(format!("{}:{}: no string field `text`", f.display(), i + 1))
                })?;
                if !text.is_empty() {
                    docs.push(text.to_string());
                }
            }
        } else if !s.trim().is_empty() {
            docs.push(s);
        }
    }
    Ok(docs)
}

/// Loads the plan's `tokenizer.json`.
pub fn tokenizer(plan: &Plan) -> Result<tokenizers::Tokenizer> {
    let f = plan.files.get("tokenizer.json").ok_or_else(|| {
        Error::Tokenizer(format!(
            "{} has no tokenizer.json (needed to tokenise `data`)",
            plan.origin
        ))
    })?;
    crate::text::parse_tokenizer(plan, &f.read()?)
}

/// Token ids of every document of `spec` (no special tokens added).
pub fn tokenize(plan: &Plan, spec: &DataSpec) -> Result<Vec<Vec<u32>>> {
    let docs = match spec {
        DataSpec::Tokens(t) => {
            let v = plan.arch.vocab_size;
            if let Some(id) = t.iter().flatten().find(|&&id| id as usize >= v) {
                return Err(Error::Tokenizer(format!(
                    "token id {id} is outside {}'s vocabulary of {v} tokens",
                    plan.origin
                )));
            }
            return Ok(t.clone());
        }
        DataSpec::Texts(t) => t.clone(),
        DataSpec::Files(f) => read_documents(f)?,
    };
    if docs.is_empty() {
        return Ok(vec![]);
    }
    let tok = tokenizer(plan)?;
    let enc = tok
        .encode_batch(docs, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// Concatenates documents with `eos` after each and cuts the stream into sequences of
/// `seq_len + 1` tokens (inputs are the first `seq_len`, targets the last `seq_len`); consecutive
/// sequences share one boundary token, the remainder is dropped.
pub fn pack(docs: &[Vec<u32>], eos: u32, seq_len: usize) -> Vec<Vec<u32>> {
    let mut stream = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for d in docs {
        stream.extend_from_slice(d);
        stream.push(eos);
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + seq_len < stream.len() {
        out.push(stream[start..start + seq_len + 1].to_vec());
        start += seq_len;
    }
    out
}

/// Training and eval sequences.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<Vec<u32>>,
    pub eval: Vec<Vec<u32>>,
    pub train_tokens: u64,
}

/// Tokenises, validates (ids within the vocabulary) and packs the data; holds out the last 5%
/// (at least one sequence) for eval when `eval` is `None`.
pub fn prepare(
    plan: &Plan,
    train: &DataSpec,
    eval: Option<&DataSpec>,
    seq_len: usize,
) -> Result<Dataset> {
    let eos = *plan.arch.eos_token_ids.first().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no eos_token_id to separate documents",
            plan.origin
        ))
    })?;
    let vocab = plan.arch.vocab_size;
    let check = |docs: &[Vec<u32>]| -> Result<()> {
        if let Some(&bad) = docs.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(())
    };
    let docs = tokenize(plan, train)?;
    check(&docs)?;
    let ntok: usize = docs.iter().map(Vec::len).sum();
    if ntok == 0 {
        return Err(Error::Invalid(
            "the training data is empty (no tokens)".into(),
        ));
    }
    let mut seqs = pack(&docs, eos, seq_len);
    let need = if eval.is_none() { 2 } else { 1 };
    if seqs.len() < need {
        return Err(Error::Invalid(format!(
            "the training data has {} tokens: too few for {need} sequence(s) of {} tokens \
             (lower `seq_len`{})",
            ntok + docs.len(),
            seq_len + 1,
            if eval.is_none() {
                " or pass `eval_data`"
            } else {
                ""
            }
        )));
    }
    let eval_seqs = match eval {
        Some(spec) => {
            let d = tokenize(plan, spec)?;
            check(&d)?;
            let e = pack(&d, eos, seq_len);
            if e.is_empty() {
                return Err(Error::Invalid(format!(
                    "the eval data is shorter than one sequence of {} tokens",
                    seq_len + 1
                )));
            }
            e
        }
        None => {
            let n_eval = (seqs.len() / 20).max(1);
            seqs.split_off(seqs.len() - n_eval)
        }
    };
    let train_tokens = (seqs.len() * seq_len) as u64;
    Ok(Dataset {
        train: seqs,
        eval: eval_seqs,
        train_tokens,
    })
}

/// Seeded order over `n` sequences: epoch `e` is a fresh ChaCha8 shuffle seeded by `(seed, e)`,
/// so the `k`-th sample of the run depends only on `(seed, n, k)` and a resume needs only `k`.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: usize,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Sampler {
            n,
            seed,
            epoch: u64::MAX,
            order: vec![],
        };
        s.set_epoch(0);
        s
    }
    fn set_epoch(&mut self, epoch: u64) {
        if self.epoch == epoch {
            return;
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.n).collect();
        self.order.shuffle(&mut rng);
        self.epoch = epoch;
    }
    /// Index of the `k`-th sample (counting from 0 over the whole run).
    pub fn index(&mut self, k: u64) -> usize {
        let n = self.n as u64;
        self.set_epoch(k / n);
        self.order[(k % n) as usize]
    }
}
