//! A plan's tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`'s `chat_template`,
//! `chat_template.jinja` or `chat_template.json`), rendered with minijinja like transformers does.
use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use surgeon_formats::Plan;

pub use tokenizers::Tokenizer;

/// Loads the plan's `tokenizer.json`.
pub fn load_tokenizer(plan: &Plan) -> Result<tokenizers::Tokenizer> {
    let file = plan.files.get("tokenizer.json").ok_or_else(|| {
        Error::Tokenizer(format!("{}: the model has no tokenizer.json", plan.origin))
    })?;
    parse_tokenizer(plan, &file.read()?)
}

/// The tokenizer of `plan` from its tokenizer.json bytes: merges checked (never a panic inside
/// tokenizers), ids within the model's vocabulary.
pub fn parse_tokenizer(plan: &Plan, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    let tok = surgeon_formats::tokenizer_extend::load(bytes)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", plan.origin)))?;
    check_vocab(plan, &tok).map_err(Error::Tokenizer)?;
    Ok(tok)
}

/// Refuses a tokenizer that can produce ids at or above the model's `vocab_size` (a tokenizer
/// that belongs to another model): the message names both sizes.
pub fn check_vocab(plan: &Plan, tok: &tokenizers::Tokenizer) -> std::result::Result<(), String> {
    let vocab = plan.arch.vocab_size;
    let max_id = tok.get_vocab(true).into_values().max();
    match max_id {
        Some(m) if m as usize >= vocab => Err(format!(
            "{}: tokenizer.json has token ids up to {m} ({} tokens) but config.json's vocab_size \
             is {vocab}: the tokenizer does not belong to this model",
            plan.origin,
            tok.get_vocab_size(true)
        )),
        _ => Ok(()),
    }
}

/// Encodes `text` without adding special tokens.
pub fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Token ids that end generation: the config's `eos_token_id`s plus tokenizer_config.json's
/// `eos_token`.
pub fn stop_tokens(plan: &Plan, tok: &Tokenizer) -> Vec<u32> {
    let mut ids = plan.arch.eos_token_ids.clone();
    if let Some(f) = plan.files.get("tokenizer_config.json") {
        if let Ok(v) = f
            .read()
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|_| ()))
        {
            let eos = token_string(v.get("eos_token"));
            if let Some(id) = tok.token_to_id(&eos) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special tokens it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Finds the plan's chat template.
    pub fn from_plan(plan: &Plan) -> Result<Self> {
        let config: serde_json::Value = match plan.files.get("tokenizer_config.json") {
            Some(f) => serde_json::from_slice(&f.read()?)
                .map_err(|e| Error::Template(format!("tokenizer_config.json: {e}")))?,
            None => serde_json::Value::Null,
        };
        let mut source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take `default`, else the first.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        if source.is_none() {
            if let Some(f) = plan.files.get("chat_template.jinja") {
                source = Some(String::from_utf8_lossy(&f.read()?).into_owned());
            }
        }
        if source.is_none() {
            if let Some(f) = plan.files.get("chat_template.json") {
                let v: serde_json::Value = serde_json::from_slice(&f.read()?)
                    .map_err(|e| Error::Template(format!("chat_template.json: {e}")))?;
                source = v
                    .get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string);
            }
        }
        let source = source.ok_or_else(|| {
            Error::Template(format!("{}: the model has no chat template", plan.origin))
        })?;
        Ok(ChatTemplate {
            source,
            bos_token: token_string(config.get("bos_token")),
            eos_token: token_string(config.get("eos_token")),
        })
    }

    /// Renders `messages` (with the assistant's turn opened when `add_generation_prompt`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; a fixed date keeps outputs reproducible.
            fmt.replace("%d", "26")
                .replace("%B", "November")
                .replace("%b", "Nov")
                .replace("%Y", "2026")
                .replace("%m", "11")
        });
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_methods);
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let s = match indent {
        Some(_) => serde_json::to_string_pretty(&json),
        None => serde_json::to_string(&json),
    }
    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(s))
}

/// Python string/dict methods that HF templates call (`strip`, `startswith`, `items`...).
fn python_methods(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let unknown =
        || minijinja::Error::new(ErrorKind::UnknownMethod, format!("no method `{method}`"));
    let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str()).map(str::to_string);
    if let Some(s) = value.as_str() {
        let chars = arg_str(0);
        let set = |c: char| {
            chars
                .as_deref()
                .map_or(c.is_whitespace(), |cs| cs.contains(c))
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(set)),
            "lstrip" => Value::from(s.trim_start_matches(set)),
            "rstrip" => Value::from(s.trim_end_matches(set)),
            "lower" => Value::from(s.to_lowercase()),
            "upper" => Value::from(s.to_uppercase()),
            "startswith" => Value::from(arg_str(0).is_some_and(|p| s.starts_with(&p))),
            "endswith" => Value::from(arg_str(0).is_some_and(|p| s.ends_with(&p))),
            "replace" => match (arg_str(0), arg_str(1)) {
                (Some(a), Some(b)) => Value::from(s.replace(&a, &b)),
                _ => return Err(unknown()),
            },
            "split" => match arg_str(0) {
                Some(sep) => {
                    Value::from(s.split(sep.as_str()).map(Value::from).collect::<Vec<_>>())
                }
                None => Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>()),
            },
            _ => return Err(unknown()),
        });
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        return match method {
            "items" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        Value::from(vec![k, v])
                    })
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )),
            "get" => {
                let v = args.first().map(|k| value.get_item(k).unwrap_or_default());
                Ok(match v {
                    Some(v) if !v.is_undefined() => v,
                    _ => args.get(1).cloned().unwrap_or(Value::from(())),
                })
            }
            _ => Err(unknown()),
        };
    }
    Err(unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(s: &str) -> ChatTemplate {
        ChatTemplate {
            source: s.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }
    }

    #[test]
    fn a_merge_into_a_missing_token_is_an_error_not_a_panic() {
        let mut plan = surgeon_formats::synthetic::SyntheticSpec::tiny().plan();
        let bad = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}
        });
        let bytes = serde_json::to_vec(&bad).unwrap();
        plan.files.insert(
            "tokenizer.json".into(),
            surgeon_formats::AuxFile::Bytes(std::sync::Arc::new(bytes)),
        );
        let e = load_tokenizer(&plan).unwrap_err().to_string();
        assert!(e.contains("model.merges[0] `a b`"), "{e}");
    }

    #[test]
    fn renders_hf_idioms() {
        let t = tmpl(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[U]{{ m['content'].strip() }}{% else %}{{ raise_exception('bad role') }}{% endif %}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}",
        );
        let out = t.render(&[Message::user("  hi ")], true).unwrap();
        assert_eq!(out, "<s>[U]hi[A]");
        let bad = Message {
            role: "tool".into(),
            content: "x".into(),
        };
        let err = t.render(&[bad], false).unwrap_err().to_string();
        assert!(err.contains("bad role"), "{err}");
    }
}
