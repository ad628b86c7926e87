//! Rebuilding HF tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) from
//! GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
//!
//! * `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the GGUF vocabulary and merges; the pre-tokenizer
//!   follows `tokenizer.ggml.pre` (`default`/`gpt2`, `smollm`, `llama3`/`llama-bpe`, `qwen2`).
//! * `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE as HF's `LlamaTokenizerFast` (metaspace
//!   normaliser, byte fallback through `<0x..>` tokens); merges are derived from the vocabulary and
//!   `tokenizer.ggml.scores` the way transformers' GGUF converter does.
//!
//! Token types 3 (CONTROL) and 4 (USER_DEFINED) become `added_tokens`; control tokens are `special`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{GgufError, GgufFile};

/// llama.cpp token type of control tokens.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp token type of user-defined tokens.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// llama.cpp token type of byte tokens (`<0x0A>`).
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// The text of the HF tokenizer files.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTokenizerFiles {
    /// `tokenizer.json` (loadable by `tokenizers::Tokenizer::from_str`).
    pub tokenizer_json: String,
    /// `tokenizer_config.json`.
    pub tokenizer_config_json: String,
    /// `special_tokens_map.json`.
    pub special_tokens_map_json: String,
}

/// llama.cpp's regex for `llama3` / `llama-bpe` pre-tokenisation.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's regex for `qwen2` pre-tokenisation (single digits).
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn split_regex(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The HF pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` value (byte-level BPE models).
pub fn gpt2_pre_tokenizer(pre: &str) -> Option<Value> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(false, true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(false, true),
        ]}),
        "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split_regex(LLAMA3_REGEX),
            byte_level(false, false),
        ]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split_regex(QWEN2_REGEX),
            byte_level(false, false),
        ]}),
        _ => return None,
    })
}

struct Meta<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i32>,
    bos: Option<usize>,
    eos: Option<usize>,
    pad: Option<usize>,
    unk: Option<usize>,
}

fn bad(f: &GgufFile, key: &str, reason: String) -> GgufError {
    GgufError::BadMetadata {
        file: f.label(),
        key: key.to_string(),
        reason,
    }
}

fn token_id(f: &GgufFile, key: &str, n: usize) -> Result<Option<usize>, GgufError> {
    match f.get_u64(key)? {
        None => Ok(None),
        Some(id) if (id as usize) < n && id <= u32::MAX as u64 => Ok(Some(id as usize)),
        Some(id) => Err(bad(
            f,
            key,
            format!("token id {id} is outside the vocabulary of {n}"),
        )),
    }
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": !special, "special": special})
}

/// Builds the HF tokenizer files from a GGUF's tokenizer metadata.
pub fn build_hf_tokenizer(f: &GgufFile) -> Result<HfTokenizerFiles, GgufError> {
    let model = f.require_str("tokenizer.ggml.model")?;
    let tokens =
        f.get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| GgufError::MissingKey {
                file: f.label(),
                key: "tokenizer.ggml.tokens".to_string(),
            })?;
    let n = tokens.len();
    let types = match f.get_i32_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == n => t,
        Some(t) => {
            return Err(bad(
                f,
                "tokenizer.ggml.token_type",
                format!("has {} entries for {n} tokens", t.len()),
            ))
        }
        None => vec![1; n],
    };
    let meta = Meta {
        bos: token_id(f, "tokenizer.ggml.bos_token_id", n)?,
        eos: token_id(f, "tokenizer.ggml.eos_token_id", n)?,
        pad: token_id(f, "tokenizer.ggml.padding_token_id", n)?,
        unk: token_id(f, "tokenizer.ggml.unknown_token_id", n)?,
        tokens,
        types,
    };
    let (tokenizer, class, add_bos_default) = match model {
        "gpt2" => (gpt2_tokenizer(f, &meta)?, "GPT2Tokenizer", false),
        "llama" => (llama_tokenizer(f, &meta)?, "LlamaTokenizer", true),
        other => {
            return Err(bad(
                f,
                "tokenizer.ggml.model",
                format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
            ))
        }
    };
    let add_bos = f
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(add_bos_default);
    let add_eos = f.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let mut tokenizer = tokenizer;
    tokenizer["post_processor"] = post_processor(f, &meta, model, add_bos, add_eos)?;

    // tokenizer_config.json
    let mut cfg = Map::new();
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    let mut decoder = Map::new();
    for t in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let mut t = t.clone();
        let id = t["id"].as_u64().unwrap_or_default();
        if let Some(o) = t.as_object_mut() {
            o.remove("id");
        }
        decoder.insert(id.to_string(), t);
    }
    cfg.insert("added_tokens_decoder".into(), Value::Object(decoder));
    let mut special_map = Map::new();
    for (name, id) in [
        ("bos_token", meta.bos),
        ("eos_token", meta.eos),
        ("pad_token", meta.pad),
        ("unk_token", meta.unk),
    ] {
        let v = id.map(|i| json!(meta.tokens[i])).unwrap_or(Value::Null);
        cfg.insert(name.into(), v.clone());
        if !v.is_null() {
            special_map.insert(name.into(), v);
        }
    }
    if let Some(t) = f.get_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    let max_len = f
        .get_str("general.architecture")?
        .and_then(|a| f.get_u64(&format!("{a}.context_length")).ok().flatten());
    // transformers' default when unknown is int(1e30).
    cfg.insert(
        "model_max_length".into(),
        max_len.map(|n| json!(n)).unwrap_or_else(|| json!(1e30)),
    );
    if model == "llama" {
        cfg.insert("legacy".into(), json!(true));
        cfg.insert("add_prefix_space".into(), json!(add_space_prefix(f)?));
    }
    cfg.insert("tokenizer_class".into(), json!(class));

    let ser = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values always serialise");
    Ok(HfTokenizerFiles {
        tokenizer_json: ser(&tokenizer),
        tokenizer_config_json: ser(&Value::Object(cfg)),
        special_tokens_map_json: ser(&Value::Object(special_map)),
    })
}

fn add_space_prefix(f: &GgufFile) -> Result<bool, GgufError> {
    Ok(f.get_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true))
}

fn added_tokens(meta: &Meta) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, (&t, &ty)) in meta.tokens.iter().zip(&meta.types).enumerate() {
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            out.push(added_token(i, t, ty == TOKEN_TYPE_CONTROL));
        }
    }
    out
}

fn vocab_map(f: &GgufFile, meta: &Meta) -> Result<Map<String, Value>, GgufError> {
    let mut vocab = Map::new();
    for (i, &t) in meta.tokens.iter().enumerate() {
        if vocab.insert(t.to_string(), json!(i)).is_some() {
            return Err(bad(
                f,
                "tokenizer.ggml.tokens",
                format!("duplicate token {t:?} (id {i})"),
            ));
        }
    }
    Ok(vocab)
}

fn gpt2_tokenizer(f: &GgufFile, meta: &Meta) -> Result<Value, GgufError> {
    let pre = f.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = gpt2_pre_tokenizer(pre).ok_or_else(|| {
        bad(
            f,
            "tokenizer.ggml.pre",
            format!("unsupported pre-tokenizer `{pre}` (supported: default, gpt2, smollm, llama3, llama-bpe, qwen2)"),
        )
    })?;
    let merges =
        f.get_str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| GgufError::MissingKey {
                file: f.label(),
                key: "tokenizer.ggml.merges".to_string(),
            })?;
    for m in &merges {
        if m.split(' ').count() != 2 {
            return Err(bad(
                f,
                "tokenizer.ggml.merges",
                format!("merge {m:?} is not two tokens separated by one space"),
            ));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(meta),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.starts_with("llama"),
            "vocab": vocab_map(f, meta)?,
            "merges": merges,
        }
    }))
}

/// Merges for a SentencePiece BPE vocabulary, derived as transformers' GGUF converter does: every split of a
/// token into two tokens of the vocabulary is a merge, ranked by the merged token's score (higher first), ties
/// by the ids of the pieces.
pub fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<String> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (merged, &t) in tokens.iter().enumerate() {
        for (split, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[merged], li, ri, format!("{l} {r}")));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| m.3).collect()
}

fn llama_tokenizer(f: &GgufFile, meta: &Meta) -> Result<Value, GgufError> {
    let scores =
        f.get_f32_array("tokenizer.ggml.scores")?
            .ok_or_else(|| GgufError::MissingKey {
                file: f.label(),
                key: "tokenizer.ggml.scores".to_string(),
            })?;
    if scores.len() != meta.tokens.len() {
        return Err(bad(
            f,
            "tokenizer.ggml.scores",
            format!(
                "has {} entries for {} tokens",
                scores.len(),
                meta.tokens.len()
            ),
        ));
    }
    let merges = match f.get_str_array("tokenizer.ggml.merges")? {
        Some(m) => m.into_iter().map(str::to_string).collect(),
        None => spm_merges(&meta.tokens, &scores),
    };
    let unk = meta.unk.map(|i| meta.tokens[i]).unwrap_or("<unk>");
    let normalizer = if add_space_prefix(f)? {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix(f)? {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_spm(meta),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map(f, meta)?,
            "merges": merges,
        }
    }))
}

/// SentencePiece models: `<unk>`, `<s>`, `</s>` are control tokens (type 3) or unknown (type 2).
fn added_tokens_spm(meta: &Meta) -> Vec<Value> {
    let mut out = added_tokens(meta);
    if let Some(u) = meta.unk {
        if meta.types[u] != TOKEN_TYPE_CONTROL && meta.types[u] != TOKEN_TYPE_USER_DEFINED {
            out.push(added_token(u, meta.tokens[u], true));
            out.sort_by_key(|t| t["id"].as_u64());
        }
    }
    out
}

fn post_processor(
    f: &GgufFile,
    meta: &Meta,
    model: &str,
    add_bos: bool,
    add_eos: bool,
) -> Result<Value, GgufError> {
    if !add_bos && !add_eos {
        return Ok(if model == "gpt2" {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        } else {
            Value::Null
        });
    }
    let tok = |id: Option<usize>, key: &str| -> Result<(String, usize), GgufError> {
        id.map(|i| (meta.tokens[i].to_string(), i))
            .ok_or_else(|| GgufError::MissingKey {
                file: f.label(),
                key: key.to_string(),
            })
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    if add_bos {
        let (b, id) = tok(meta.bos, "tokenizer.ggml.bos_token_id")?;
        single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        specials.insert(b.clone(), json!({"id": b, "ids": [id], "tokens": [b]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    let eos = if add_eos {
        let (e, id) = tok(meta.eos, "tokenizer.ggml.eos_token_id")?;
        specials.insert(e.clone(), json!({"id": e, "ids": [id], "tokens": [e]}));
        single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        Some(e)
    } else {
        None
    };
    if add_bos {
        let (b, _) = tok(meta.bos, "tokenizer.ggml.bos_token_id")?;
        pair.push(json!({"SpecialToken": {"id": b, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some(e) = eos {
        pair.push(json!({"SpecialToken": {"id": e, "type_id": 1}}));
    }
    let template = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
    Ok(if model == "gpt2" {
        json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            template,
        ]})
    } else {
        template
    })
}
