//! Tokenizer surgery for vocabulary extension: add given strings as tokens, or learn new BPE merges on a
//! corpus that *extend* an existing `tokenizer.json`.
//!
//! Invariants (checked on every result by reloading it with the `tokenizers` crate): every old token
//! keeps its id and string, old merges keep their order, new merges are appended after them, and new
//! tokens take ids from the tokenizer's first free id upwards.
//!
//! Supported: BPE models, GPT-2-style byte-level (`ByteLevel` pre-tokenizer, token strings in the byte
//! alphabet `Ġ`...) and SentencePiece-style (`▁` for spaces, usually `byte_fallback`). Because every old
//! merge ranks before every new one, encoding with the extended tokenizer equals encoding with the old
//! one and then applying the new merges in order, which is what [`learn_merges`] simulates on the corpus.
//! The JSON is edited in place (key order and everything we do not touch is preserved).
use crate::{Error, Result};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use tokenizers::{
    Model, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

/// Which family of BPE tokenizer a `tokenizer.json` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// GPT-2 style: bytes mapped to printable characters (`Ġ` = space) before BPE.
    ByteLevel,
    /// SentencePiece style: `▁` marks a space, unknown characters fall back to `<0xNN>` byte pieces.
    SentencePiece,
    /// BPE over characters with neither convention (treated like SentencePiece minus the `▁` rule).
    CharBpe,
}

impl std::fmt::Display for TokenizerStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenizerStyle::ByteLevel => "byte-level BPE",
            TokenizerStyle::SentencePiece => "SentencePiece-style BPE",
            TokenizerStyle::CharBpe => "character BPE",
        })
    }
}

/// One token added by an extension.
#[derive(Clone, Debug, PartialEq)]
pub struct NewToken {
    pub id: u32,
    /// The token as stored in the tokenizer (vocabulary string, or added-token content).
    pub content: String,
    /// Its text (decoded by the old tokenizer's decoder), for reports.
    pub text: String,
    /// Ids of the token's text under the OLD tokenizer (zip-tie initialisation). Empty when the old
    /// tokenizer encodes it to nothing.
    pub old_ids: Vec<u32>,
}

/// The result of extending a tokenizer.
#[derive(Clone, Debug)]
pub struct Extension {
    pub style: TokenizerStyle,
    /// Ids `0..old_len` existed before; new tokens start here.
    pub old_len: u32,
    pub tokens: Vec<NewToken>,
    /// Requested strings that were not added, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Merges appended to `model.merges` (learned merges that rebuild an existing token count here but
    /// add no token).
    pub merges_added: usize,
    /// The new tokenizer.json.
    pub tokenizer_json: Vec<u8>,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

fn parse(json: &[u8]) -> Result<Value> {
    serde_json::from_slice(json)
        .map_err(|e| invalid(format!("tokenizer.json is not valid JSON: {e}")))
}

/// Loads a tokenizer.json with `tokenizers`, after checking its BPE merges (a merge into a token
/// missing from the vocabulary panics inside tokenizers 0.23; here it is an error naming the merge).
/// Every loader of a model's tokenizer goes through this.
pub fn load(json: &[u8]) -> Result<Tokenizer> {
    if let Ok(v) = serde_json::from_slice::<Value>(json) {
        check_bpe_merges(&v)?;
    }
    Tokenizer::from_bytes(json).map_err(|e| invalid(format!("tokenizer.json does not load: {e}")))
}

/// Checks that every BPE merge joins two vocabulary tokens into a vocabulary token. tokenizers 0.23
/// builds its merge table in a buffer as long as the longest token and panics (slice index out of
/// range) on a merge whose result is longer, before it would report the token missing (found by
/// fuzzing); so we report it first, naming the merge. Malformed merges are left to tokenizers.
fn check_bpe_merges(v: &Value) -> Result<()> {
    let model = &v["model"];
    if model["type"].as_str().is_some_and(|t| t != "BPE") {
        return Ok(());
    }
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array())
    else {
        return Ok(());
    };
    // tokenizers joins `a` with `b` minus as many bytes as this prefix has (it assumes `b` has it).
    let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("");
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => match s.split_once(' ') {
                Some(pair) => pair,
                None => continue,
            },
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => (a, b),
                _ => continue,
            },
            _ => continue,
        };
        let bad = |m: String| invalid(format!("tokenizer.json: model.merges[{i}] `{a} {b}`: {m}"));
        let Some(rest) = b.get(prefix.len()..) else {
            return Err(bad(format!(
                "`{b}` is too short for continuing_subword_prefix `{prefix}`"
            )));
        };
        let merged = format!("{a}{rest}");
        for t in [a, b, merged.as_str()] {
            if !vocab.contains_key(t) {
                return Err(bad(format!("`{t}` is not in model.vocab")));
            }
        }
    }
    Ok(())
}

fn contains_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(m) => {
            m.get("type").and_then(Value::as_str) == Some(ty)
                || m.values().any(|x| contains_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| contains_type(x, ty)),
        _ => false,
    }
}

fn mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Object(m) => m.values().any(|x| mentions(x, needle)),
        Value::Array(a) => a.iter().any(|x| mentions(x, needle)),
        _ => false,
    }
}

/// Detects the tokenizer style; any model other than BPE is an error.
pub fn detect_style(json: &[u8]) -> Result<TokenizerStyle> {
    style_of(&parse(json)?)
}

fn style_of(v: &Value) -> Result<TokenizerStyle> {
    let model = v
        .get("model")
        .ok_or_else(|| invalid("tokenizer.json has no `model`"))?;
    let ty = model.get("type").and_then(Value::as_str).unwrap_or(
        // Old files omit the type; BPE is recognisable by its merges.
        if model.get("merges").is_some() {
            "BPE"
        } else {
            "unknown"
        },
    );
    if ty != "BPE" {
        return Err(invalid(format!(
            "unsupported tokenizer type `{ty}`: extend-vocab supports BPE tokenizers (byte-level or SentencePiece-style)"
        )));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let Some(s) = model.get(key).and_then(Value::as_str) {
            if !s.is_empty() {
                return Err(invalid(format!(
                    "unsupported BPE tokenizer: `{key}` = {s:?} (only GPT-2 and SentencePiece-style BPE)"
                )));
            }
        }
    }
    let null = Value::Null;
    let pre = v.get("pre_tokenizer").unwrap_or(&null);
    if contains_type(pre, "ByteLevel") {
        return Ok(TokenizerStyle::ByteLevel);
    }
    let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
    if byte_fallback
        || contains_type(pre, "Metaspace")
        || mentions(v.get("normalizer").unwrap_or(&null), "▁")
    {
        return Ok(TokenizerStyle::SentencePiece);
    }
    Ok(TokenizerStyle::CharBpe)
}

/// Ids in use: the model vocabulary and the added tokens. Returns (first free id, all old ids).
fn old_ids(v: &Value) -> Result<(u32, BTreeSet<u32>)> {
    let vocab = v["model"]["vocab"]
        .as_object()
        .ok_or_else(|| invalid("tokenizer.json: `model.vocab` is not an object"))?;
    let mut ids = BTreeSet::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| invalid(format!("tokenizer.json: id of {tok:?} is not a number")))?;
        ids.insert(id as u32);
    }
    if let Some(added) = v.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            if let Some(id) = t.get("id").and_then(Value::as_u64) {
                ids.insert(id as u32);
            }
        }
    }
    let next = ids.iter().next_back().map_or(0, |m| m + 1);
    Ok((next, ids))
}

/// `(content, id)` of every entry of tokenizer.json's `added_tokens`.
fn added_token_ids(v: &Value) -> Vec<(String, u64)> {
    v.get("added_tokens")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Added tokens whose ids lie outside the model vocabulary would be renumbered by the `tokenizers`
/// loader once the model vocabulary grows (it assigns them ids after the vocabulary), so they are
/// written into `model.vocab` at their ids as well.
fn pin_added_tokens(v: &mut Value) {
    let added = added_token_ids(v);
    if let Some(vocab) = v["model"]["vocab"].as_object_mut() {
        let taken: HashSet<u64> = vocab.values().filter_map(Value::as_u64).collect();
        for (content, id) in added {
            if !vocab.contains_key(&content) && !taken.contains(&id) {
                vocab.insert(content, json!(id));
            }
        }
    }
}

/// Checks the invariants on the new tokenizer: old ids map to the same strings, new tokens have the
/// ids we gave them.
fn verify(old: &Tokenizer, new_json: &[u8], ids: &BTreeSet<u32>, added: &[NewToken]) -> Result<()> {
    let new = load(new_json)?;
    for &id in ids {
        let (a, b) = (old.id_to_token(id), new.id_to_token(id));
        if a != b {
            return Err(invalid(format!(
                "internal error: extending the tokenizer changed id {id} from {a:?} to {b:?}"
            )));
        }
    }
    for t in added {
        if new.token_to_id(&t.content) != Some(t.id) {
            return Err(invalid(format!(
                "internal error: new token {:?} did not get id {} (got {:?})",
                t.content,
                t.id,
                new.token_to_id(&t.content)
            )));
        }
    }
    Ok(())
}

/// Adds `tokens` (raw strings, e.g. one per line of a file) as added tokens, the way HF
/// `tokenizer.add_tokens` does (`normalized: true`, `special: false`). Strings that are already a single
/// token, already added tokens, or repeated are skipped and reported.
pub fn add_tokens(json: &[u8], tokens: &[String]) -> Result<Extension> {
    let mut v = parse(json)?;
    let style = style_of(&v)?;
    let old = load(json)?;
    let (next, ids) = old_ids(&v)?;
    if tokens.is_empty() {
        return Err(invalid("no tokens to add: the token list is empty"));
    }
    let added_contents: HashMap<String, u64> = added_token_ids(&v).into_iter().collect();
    let mut seen = HashSet::new();
    let mut out = vec![];
    let mut skipped = vec![];
    let mut id = next;
    for t in tokens {
        if !seen.insert(t.clone()) {
            skipped.push((t.clone(), "repeated in the list".to_string()));
            continue;
        }
        if let Some(i) = added_contents.get(t) {
            skipped.push((t.clone(), format!("already an added token (id {i})")));
            continue;
        }
        if let Some(i) = old.get_model().token_to_id(t) {
            skipped.push((t.clone(), format!("already in the vocabulary (id {i})")));
            continue;
        }
        let enc = old
            .encode(t.as_str(), false)
            .map_err(|e| invalid(format!("encoding {t:?}: {e}")))?;
        if enc.get_ids().len() == 1 {
            let single = old.decode(enc.get_ids(), false).unwrap_or_default();
            if &single == t {
                skipped.push((
                    t.clone(),
                    format!(
                        "already a single token {:?} (id {})",
                        enc.get_tokens()[0],
                        enc.get_ids()[0]
                    ),
                ));
                continue;
            }
        }
        out.push(NewToken {
            id,
            content: t.clone(),
            text: t.clone(),
            old_ids: enc.get_ids().to_vec(),
        });
        id += 1;
    }
    if out.is_empty() {
        return Err(invalid(format!(
            "no new tokens: all {} given tokens already exist ({})",
            tokens.len(),
            skipped
                .iter()
                .take(3)
                .map(|(t, why)| format!("{t:?}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    pin_added_tokens(&mut v);
    let list = v
        .as_object_mut()
        .ok_or_else(|| invalid("tokenizer.json is not an object"))?
        .entry("added_tokens")
        .or_insert_with(|| json!([]));
    let list = list
        .as_array_mut()
        .ok_or_else(|| invalid("tokenizer.json: `added_tokens` is not a list"))?;
    for t in &out {
        list.push(json!({
            "id": t.id,
            "content": t.content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": true,
            "special": false,
        }));
    }
    let bytes = to_bytes(&v)?;
    verify(&old, &bytes, &ids, &out)?;
    Ok(Extension {
        style,
        old_len: next,
        tokens: out,
        skipped,
        merges_added: 0,
        tokenizer_json: bytes,
    })
}

fn to_bytes(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| invalid(format!("serialising tokenizer.json: {e}")))
}

/// Words of `text` as the old tokenizer's BPE model sees them: normalised and pre-tokenised. For
/// SentencePiece-style tokenizers without a pre-tokenizer, the normalised text is cut before each `▁`
/// that follows another character (SentencePiece never merges across a word start).
fn words(
    tok: &Tokenizer,
    style: TokenizerStyle,
    text: &str,
    out: &mut HashMap<String, u64>,
) -> Result<()> {
    let mut pre = PreTokenizedString::from(text);
    if let Some(n) = tok.get_normalizer() {
        pre.normalize(|s| n.normalize(s))
            .map_err(|e| invalid(format!("normalising corpus text: {e}")))?;
    }
    if let Some(p) = tok.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre)
            .map_err(|e| invalid(format!("pre-tokenising corpus text: {e}")))?;
    }
    for (w, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        if style == TokenizerStyle::SentencePiece {
            let mut start = 0;
            let mut prev: Option<char> = None;
            for (i, c) in w.char_indices() {
                if c == '▁' && prev.is_some_and(|p| p != '▁') {
                    *out.entry(w[start..i].to_string()).or_default() += 1;
                    start = i;
                }
                prev = Some(c);
            }
            if start < w.len() {
                *out.entry(w[start..].to_string()).or_default() += 1;
            }
        } else if !w.is_empty() {
            *out.entry(w.to_string()).or_default() += 1;
        }
    }
    Ok(())
}

fn is_byte_piece(s: &str) -> bool {
    s.len() == 6 && s.starts_with("<0x") && s.ends_with('>')
}

/// Learns `n` new tokens as BPE merges on `corpus` (texts, e.g. lines) on top of the existing merges.
///
/// Standard BPE continuation: each word (weighted by its frequency) starts as its encoding under the
/// old tokenizer; the most frequent adjacent pair (at least `min_frequency` occurrences; ties broken by
/// the smaller ids) is merged, `n` times. A merge whose result is already an old token is appended too
/// but adds no token. Byte-fallback pieces and the unknown token are never merged, nor (SentencePiece
/// style) a piece onto a following word start `▁`.
pub fn learn_merges(
    json: &[u8],
    corpus: &[String],
    n: usize,
    min_frequency: u64,
) -> Result<Extension> {
    if n == 0 {
        return Err(invalid(
            "`add` must be at least 1 (asked to learn 0 new tokens)",
        ));
    }
    let mut v = parse(json)?;
    let style = style_of(&v)?;
    let old = load(json)?;
    let (next, ids) = old_ids(&v)?;

    let word_list = corpus_word_counts(&old, style, corpus)?;
    let mut symbols = Symbols::of(&old);
    let policy = MergePolicy::of(&v, style, &symbols);
    let mut stats = PairStats::new(encode_words(&old, &word_list)?);
    let mut learned = Learned {
        tokens: vec![],
        merges: vec![],
        next_id: next,
    };
    while learned.tokens.len() < n {
        let Some((a, b)) = stats.best(min_frequency.max(1), |a, b| policy.allows(a, b, &symbols))
        else {
            return Err(too_few_tokens(learned.tokens.len(), n, min_frequency));
        };
        let c = learned.token_for(&old, &mut symbols, a, b)?;
        stats.merge((a, b), c);
    }

    pin_added_tokens(&mut v);
    append_learned(&mut v, &learned, policy.merges_as_pairs)?;
    let bytes = to_bytes(&v)?;
    verify(&old, &bytes, &ids, &learned.tokens)?;
    Ok(Extension {
        style,
        old_len: next,
        merges_added: learned.merges.len(),
        tokens: learned.tokens,
        skipped: vec![],
        tokenizer_json: bytes,
    })
}

/// Frequency of every pre-tokenised word of the non-blank corpus texts, sorted by word so that the
/// learning below does not depend on hash order.
fn corpus_word_counts(
    old: &Tokenizer,
    style: TokenizerStyle,
    corpus: &[String],
) -> Result<Vec<(String, u64)>> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for text in corpus {
        if !text.trim().is_empty() {
            words(old, style, text, &mut counts)?;
        }
    }
    if counts.is_empty() {
        return Err(invalid("the training corpus is empty"));
    }
    let mut word_list: Vec<(String, u64)> = counts.into_iter().collect();
    word_list.sort();
    Ok(word_list)
}

/// Each word as its ids under the old tokenizer (the state before any new merge), with its frequency.
fn encode_words(old: &Tokenizer, word_list: &[(String, u64)]) -> Result<Vec<(Vec<u32>, u64)>> {
    let model = old.get_model();
    let mut words: Vec<(Vec<u32>, u64)> = Vec::with_capacity(word_list.len());
    for (w, f) in word_list {
        let toks = model
            .tokenize(w)
            .map_err(|e| invalid(format!("encoding corpus word {w:?}: {e}")))?;
        words.push((toks.iter().map(|t| t.id).collect(), *f));
    }
    Ok(words)
}

fn too_few_tokens(found: usize, n: usize, min_frequency: u64) -> Error {
    invalid(format!(
        "the corpus yields only {} new token{} (merges of pairs seen at least {} times), fewer than the {n} asked for",
        found,
        if found == 1 { "" } else { "s" },
        min_frequency.max(1)
    ))
}

/// Symbol strings by id and back: the old vocabulary, then each new token as it is learned.
struct Symbols {
    strings: HashMap<u32, String>,
    by_string: HashMap<String, u32>,
}

impl Symbols {
    fn of(old: &Tokenizer) -> Self {
        let strings: HashMap<u32, String> = old
            .get_model()
            .get_vocab()
            .into_iter()
            .map(|(s, i)| (i, s))
            .collect();
        let by_string = strings.iter().map(|(i, s)| (s.clone(), *i)).collect();
        Symbols { strings, by_string }
    }
}

/// Which adjacent pairs may be merged.
struct MergePolicy {
    style: TokenizerStyle,
    unk: Option<u32>,
    /// `model.merges` holds `[a, b]` lists (newer format) rather than `"a b"` strings; with strings a
    /// piece containing a space cannot be written as a merge.
    merges_as_pairs: bool,
}

impl MergePolicy {
    fn of(v: &Value, style: TokenizerStyle, symbols: &Symbols) -> Self {
        let unk = v["model"]["unk_token"]
            .as_str()
            .and_then(|u| symbols.by_string.get(u).copied());
        let merges_as_pairs = v["model"]["merges"]
            .as_array()
            .and_then(|m| m.first())
            .is_none_or(Value::is_array);
        MergePolicy {
            style,
            unk,
            merges_as_pairs,
        }
    }

    /// The unknown token, byte-fallback pieces and ids without a string never take part in a merge.
    fn frozen(&self, id: u32, symbols: &Symbols) -> bool {
        Some(id) == self.unk || symbols.strings.get(&id).is_none_or(|s| is_byte_piece(s))
    }

    fn allows(&self, a: u32, b: u32, symbols: &Symbols) -> bool {
        if self.frozen(a, symbols) || self.frozen(b, symbols) {
            return false;
        }
        let (sa, sb) = (&symbols.strings[&a], &symbols.strings[&b]);
        // A SentencePiece word start `▁` never joins the piece before it (that would cross a word).
        if self.style == TokenizerStyle::SentencePiece && sb.starts_with('▁') {
            return false;
        }
        self.merges_as_pairs || !(sa.contains(' ') || sb.contains(' '))
    }
}

/// The corpus words as symbol sequences, with the weighted count of every adjacent pair and the words
/// it occurs in (an index may list words that no longer hold the pair; merging rechecks).
struct PairStats {
    words: Vec<(Vec<u32>, u64)>,
    counts: HashMap<(u32, u32), u64>,
    where_: HashMap<(u32, u32), HashSet<usize>>,
}

impl PairStats {
    fn new(words: Vec<(Vec<u32>, u64)>) -> Self {
        let mut stats = PairStats {
            words,
            counts: HashMap::new(),
            where_: HashMap::new(),
        };
        for wi in 0..stats.words.len() {
            stats.add_pairs_of(wi);
        }
        stats
    }

    fn add_pairs_of(&mut self, wi: usize) {
        let (syms, f) = &self.words[wi];
        for p in syms.windows(2) {
            *self.counts.entry((p[0], p[1])).or_default() += f;
            self.where_.entry((p[0], p[1])).or_default().insert(wi);
        }
    }

    /// The most frequent allowed pair seen at least `min_count` times; ties go to the smaller ids.
    fn best(&self, min_count: u64, allowed: impl Fn(u32, u32) -> bool) -> Option<(u32, u32)> {
        self.counts
            .iter()
            .filter(|(p, &c)| c >= min_count && allowed(p.0, p.1))
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then(pb.cmp(pa)))
            .map(|(p, _)| *p)
    }

    /// Replaces every occurrence of `pair` by `c` in the words that hold it, updating the statistics.
    fn merge(&mut self, pair: (u32, u32), c: u32) {
        let mut affected: Vec<usize> = self
            .where_
            .remove(&pair)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        affected.sort_unstable();
        self.counts.remove(&pair);
        for wi in affected {
            self.remove_pairs_of(wi, pair);
            let syms = &mut self.words[wi].0;
            *syms = merge_in_word(syms, pair, c);
            self.add_pairs_of(wi);
        }
    }

    /// Subtracts the word's pairs (other than `merged`, already dropped) from the counts.
    fn remove_pairs_of(&mut self, wi: usize, merged: (u32, u32)) {
        let (syms, f) = &self.words[wi];
        for p in syms.windows(2) {
            if (p[0], p[1]) == merged {
                continue;
            }
            if let Some(cnt) = self.counts.get_mut(&(p[0], p[1])) {
                *cnt -= *f;
                if *cnt == 0 {
                    self.counts.remove(&(p[0], p[1]));
                }
            }
        }
    }
}

/// `syms` with each non-overlapping occurrence of `(a, b)`, left to right, replaced by `c`.
fn merge_in_word(syms: &[u32], (a, b): (u32, u32), c: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(syms.len());
    let mut i = 0;
    while i < syms.len() {
        if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
            out.push(c);
            i += 2;
        } else {
            out.push(syms[i]);
            i += 1;
        }
    }
    out
}

/// The new tokens and merges learned so far, and the id the next new token gets.
struct Learned {
    tokens: Vec<NewToken>,
    merges: Vec<(String, String)>,
    next_id: u32,
}

impl Learned {
    /// Records the merge `a b` and returns the id of its result: an existing token when the string is
    /// already in the vocabulary (the merge adds no token), otherwise a new token with the next id.
    fn token_for(&mut self, old: &Tokenizer, symbols: &mut Symbols, a: u32, b: u32) -> Result<u32> {
        let merged = format!("{}{}", symbols.strings[&a], symbols.strings[&b]);
        let c = match symbols.by_string.get(&merged) {
            Some(&c) => c,
            None => {
                let c = self.next_id;
                self.next_id += 1;
                symbols.strings.insert(c, merged.clone());
                symbols.by_string.insert(merged.clone(), c);
                self.tokens.push(new_token(old, c, merged)?);
                c
            }
        };
        self.merges
            .push((symbols.strings[&a].clone(), symbols.strings[&b].clone()));
        Ok(c)
    }
}

/// A learned token with its text and its ids under the old tokenizer (for zip-tie initialisation).
fn new_token(old: &Tokenizer, id: u32, merged: String) -> Result<NewToken> {
    let old_enc = old
        .get_model()
        .tokenize(&merged)
        .map_err(|e| invalid(format!("encoding {merged:?}: {e}")))?;
    let old_ids: Vec<u32> = old_enc.iter().map(|t| t.id).collect();
    Ok(NewToken {
        id,
        text: old
            .decode(&old_ids, false)
            .unwrap_or_else(|_| merged.clone()),
        content: merged,
        old_ids,
    })
}

/// Adds the learned tokens to `model.vocab` and appends the learned merges after the old ones, in the
/// format the file already uses.
fn append_learned(v: &mut Value, learned: &Learned, merges_as_pairs: bool) -> Result<()> {
    let model_v = &mut v["model"];
    let vocab = model_v["vocab"]
        .as_object_mut()
        .expect("checked in old_ids");
    for t in &learned.tokens {
        vocab.insert(t.content.clone(), json!(t.id));
    }
    if model_v.get("merges").is_none() {
        model_v["merges"] = json!([]);
    }
    let merges = model_v["merges"]
        .as_array_mut()
        .ok_or_else(|| invalid("tokenizer.json: `model.merges` is not a list"))?;
    for (a, b) in &learned.merges {
        merges.push(if merges_as_pairs {
            json!([a, b])
        } else {
            json!(format!("{a} {b}"))
        });
    }
    Ok(())
}

/// Tokens per character of `texts` (each encoded without special tokens): the compression measure used
/// to show that an extension helps a domain.
pub fn tokens_per_char(json: &[u8], texts: &[String]) -> Result<f64> {
    let tok = load(json)?;
    let (mut tokens, mut chars) = (0usize, 0usize);
    for t in texts.iter().filter(|t| !t.is_empty()) {
        let enc = tok
            .encode(t.as_str(), false)
            .map_err(|e| invalid(format!("encoding: {e}")))?;
        tokens += enc.get_ids().len();
        chars += t.chars().count();
    }
    if chars == 0 {
        return Err(invalid("no text to measure"));
    }
    Ok(tokens as f64 / chars as f64)
}

/// Encodes `text` (no special tokens) with a tokenizer.json: ids.
pub fn encode(json: &[u8], text: &str) -> Result<Vec<u32>> {
    let tok = load(json)?;
    let enc = tok
        .encode(text, false)
        .map_err(|e| invalid(format!("encoding: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Decodes ids with a tokenizer.json.
pub fn decode(json: &[u8], ids: &[u32]) -> Result<String> {
    let tok = load(json)?;
    tok.decode(ids, false)
        .map_err(|e| invalid(format!("decoding: {e}")))
}

/// Adds entries for the new added tokens to `added_tokens_decoder` of a tokenizer_config.json when it
/// has that table (transformers reads it); otherwise returns the file unchanged.
pub fn update_tokenizer_config(config: &[u8], ext: &Extension, added: bool) -> Result<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(config)
        .map_err(|e| invalid(format!("tokenizer_config.json is not valid JSON: {e}")))?;
    let Some(table) = v
        .get_mut("added_tokens_decoder")
        .and_then(Value::as_object_mut)
    else {
        return Ok(config.to_vec());
    };
    if !added {
        return Ok(config.to_vec());
    }
    for t in &ext.tokens {
        table.insert(
            t.id.to_string(),
            json!({
                "content": t.content,
                "lstrip": false,
                "normalized": true,
                "rstrip": false,
                "single_word": false,
                "special": false,
            }),
        );
    }
    serde_json::to_vec_pretty(&v)
        .map_err(|e| invalid(format!("serialising tokenizer_config.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe_json(vocab: Value, merges: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        }))
        .unwrap()
    }

    /// Fuzzing (tokenizer_json) found this: tokenizers 0.23 panics (slice index out of range) on a
    /// merge whose result is longer than every vocabulary token, instead of reporting the token
    /// missing. We report it, naming the merge.
    #[test]
    fn merge_into_a_missing_token_is_an_error_not_a_panic() {
        let bad = bpe_json(json!({"a": 0, "b": 1}), json!(["a b"]));
        let e = encode(&bad, "ab").unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json: model.merges[0] `a b`: `ab` is not in model.vocab"),
            "{e}"
        );
        let e = add_tokens(&bad, &["zz".to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.merges[0]"), "{e}");
        let e = encode(&bpe_json(json!({"a": 0}), json!([["a", "c"]])), "a")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.merges[0] `a c`: `c` is not in model.vocab"),
            "{e}"
        );
        // The same tokenizer with the merged token loads and applies the merge.
        let good = bpe_json(json!({"a": 0, "b": 1, "ab": 2}), json!(["a b"]));
        assert_eq!(encode(&good, "ab").unwrap(), vec![2]);
    }
}
