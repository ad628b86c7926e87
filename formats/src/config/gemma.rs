//! Gemma 2 and Gemma 3 (text) config.json fields: layer types, soft-capping, the attention scale
//! and Gemma 3's per-layer-type RoPE bases.
use super::{Fields, KNOWN_KEYS};
use crate::arch::{Family, GemmaParams, Layer, ModelArch};
use crate::Result;
use serde_json::{json, Map, Value};

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

/// Gemma's parameters, and which `layers` attend globally (`layer_types`, or transformers'
/// default pattern: every 2nd layer for Gemma 2, every `sliding_window_pattern`th (6) for Gemma 3).
/// Without a `sliding_window` every layer is global.
pub(super) fn params(
    f: &Fields,
    family: Family,
    rope_local_theta: Option<f64>,
    sliding_window: Option<usize>,
    layers: &mut [Layer],
) -> Result<GemmaParams> {
    debug_assert!(KNOWN_KEYS.contains(&"layer_types"));
    if f.bool_opt("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(f.err(
            "use_bidirectional_attention",
            "bidirectional (encoder) attention is not supported",
        ));
    }
    let full = layer_is_full(f, family, layers.len())?;
    for (layer, full) in layers.iter_mut().zip(full) {
        layer.attention.full_attention = full || sliding_window.is_none();
    }
    // transformers' defaults when a key is absent; an explicit null turns soft-capping off.
    let cap = |field: &str, gemma2_default: f64| -> Result<Option<f64>> {
        match f.map.get(field) {
            None if family == Family::Gemma2 => Ok(Some(gemma2_default)),
            None => Ok(None),
            Some(_) => positive(f, field),
        }
    };
    Ok(GemmaParams {
        query_pre_attn_scalar: Some(positive(f, "query_pre_attn_scalar")?.unwrap_or(256.0)),
        attn_logit_softcapping: cap("attn_logit_softcapping", 50.0)?,
        final_logit_softcapping: cap("final_logit_softcapping", 30.0)?,
        rope_local_theta,
    })
}

fn positive(f: &Fields, field: &str) -> Result<Option<f64>> {
    match f.f64_opt(field)? {
        Some(x) if !(x.is_finite() && x > 0.0) => {
            Err(f.err(field, format!("must be a positive number, got {x}")))
        }
        x => Ok(x),
    }
}

/// Per layer: whether it is a `full_attention` layer.
fn layer_is_full(f: &Fields, family: Family, n: usize) -> Result<Vec<bool>> {
    let Some(types) = f.map.get("layer_types").filter(|v| !v.is_null()) else {
        let pattern = match family {
            Family::Gemma2 => 2,
            _ => f.usize_opt("sliding_window_pattern")?.unwrap_or(6),
        };
        if pattern == 0 {
            return Err(f.err("sliding_window_pattern", "must be positive"));
        }
        return Ok((0..n).map(|i| (i + 1) % pattern == 0).collect());
    };
    let types = types
        .as_array()
        .ok_or_else(|| f.err("layer_types", "expected a list"))?;
    if types.len() != n {
        return Err(f.err(
            "layer_types",
            format!("lists {} layers but num_hidden_layers = {n}", types.len()),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            Some(SLIDING) => Ok(false),
            Some(FULL) => Ok(true),
            _ => Err(f.err("layer_types", format!("`{t}` is not {SLIDING} or {FULL}"))),
        })
        .collect()
}

/// Gemma 3's RoPE: `(rope_theta, rope_scaling, rope_local_base_freq)` of the global and the
/// sliding layers, from transformers >= 5's `rope_parameters` per layer type or the older
/// top-level `rope_theta` (default 1e6), `rope_scaling` and `rope_local_base_freq` (default 1e4).
pub(super) fn rope(f: &Fields) -> Result<(f64, Option<Value>, Option<f64>)> {
    let nested = f.map.get("rope_parameters").and_then(Value::as_object);
    let theta = |p: Option<&Map<String, Value>>, field: &str, top: &str, default: f64| match p
        .and_then(|p| p.get("rope_theta"))
    {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| f.err(field, format!("expected a number, got {v}"))),
        None => Ok(f.f64_opt(top)?.unwrap_or(default)),
    };
    let full = nested.and_then(|p| p.get(FULL)).and_then(Value::as_object);
    let sliding = nested
        .and_then(|p| p.get(SLIDING))
        .and_then(Value::as_object);
    let global = theta(
        full,
        "rope_parameters.full_attention.rope_theta",
        "rope_theta",
        1e6,
    )?;
    let local = theta(
        sliding,
        "rope_parameters.sliding_attention.rope_theta",
        "rope_local_base_freq",
        1e4,
    )?;
    if let Some(kind) = sliding
        .and_then(|s| s.get("rope_type"))
        .and_then(Value::as_str)
    {
        if kind != "default" {
            return Err(f.err(
                "rope_parameters.sliding_attention.rope_type",
                format!("`{kind}`: only the sliding layers' default RoPE is supported"),
            ));
        }
    }
    let scaling = match f.map.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(v) => Some(v.clone()),
        None => full.and_then(|p| {
            let kind = p.get("rope_type").and_then(Value::as_str);
            (kind.unwrap_or("default") != "default").then(|| {
                let mut s = p.clone();
                s.remove("rope_theta");
                Value::Object(s)
            })
        }),
    };
    for (field, x) in [("rope_theta", global), ("rope_local_base_freq", local)] {
        if !(x.is_finite() && x > 0.0) {
            return Err(f.err(field, format!("must be a positive finite number, got {x}")));
        }
    }
    Ok((global, scaling, Some(local)))
}

/// Gemma 3's RoPE in both spellings: `rope_parameters` per layer type, and the older top-level
/// `rope_theta`, `rope_scaling` (global layers) and `rope_local_base_freq`.
pub(super) fn insert_rope(arch: &ModelArch, m: &mut Map<String, Value>) {
    let local = arch.gemma.rope_local_theta.unwrap_or(arch.rope_theta);
    m.insert("rope_theta".into(), json!(arch.rope_theta));
    m.insert("rope_local_base_freq".into(), json!(local));
    m.insert(
        "rope_scaling".into(),
        arch.rope_scaling.clone().unwrap_or(Value::Null),
    );
    let mut full = match &arch.rope_scaling {
        Some(Value::Object(s)) => s.clone(),
        _ => Map::from_iter([("rope_type".to_string(), json!("default"))]),
    };
    full.insert("rope_theta".into(), json!(arch.rope_theta));
    m.insert(
        "rope_parameters".into(),
        json!({FULL: full, SLIDING: {"rope_type": "default", "rope_theta": local}}),
    );
}

/// Activation, layer types, sliding window, attention scale and soft-capping (null when off, so
/// that transformers' Gemma 2 defaults do not turn it on).
pub(super) fn insert_attention_fields(arch: &ModelArch, m: &mut Map<String, Value>) {
    let g = &arch.gemma;
    m.insert("hidden_activation".into(), json!(arch.hidden_act));
    let types: Vec<&str> = arch
        .layers
        .iter()
        .map(
            |l| match l.attention.full_attention || arch.sliding_window.is_none() {
                true => FULL,
                false => SLIDING,
            },
        )
        .collect();
    m.insert("layer_types".into(), json!(types));
    m.insert("sliding_window".into(), json!(arch.sliding_window));
    // transformers >= 5 validates this field as an int (real models: 256, 144).
    let scalar = g.query_pre_attn_scalar.map(|s| match s.fract() == 0.0 {
        true => json!(s as u64),
        false => json!(s),
    });
    m.insert("query_pre_attn_scalar".into(), json!(scalar));
    m.insert(
        "attn_logit_softcapping".into(),
        json!(g.attn_logit_softcapping),
    );
    m.insert(
        "final_logit_softcapping".into(),
        json!(g.final_logit_softcapping),
    );
    m.insert("attention_bias".into(), json!(false));
}

#[cfg(test)]
mod tests {
    use crate::config::{config_json, parse_config};
    use crate::DType;
    use serde_json::{json, Value};
    use std::path::Path;

    fn gemma(model_type: &str) -> Value {
        json!({
            "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 96, "vocab_size": 128, "sliding_window": 4, "torch_dtype": "bfloat16"
        })
    }

    fn full(arch: &crate::ModelArch) -> Vec<bool> {
        arch.layers
            .iter()
            .map(|l| l.attention.full_attention)
            .collect()
    }

    #[test]
    fn older_gemma3_config_reads_and_round_trips() {
        let mut v = gemma("gemma3_text");
        v["rope_theta"] = json!(1e6);
        v["rope_local_base_freq"] = json!(1e4);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        v["sliding_window_pattern"] = json!(3);
        let arch = parse_config(Path::new("c.json"), &v).unwrap();
        assert_eq!(full(&arch), [false, false, true, false, false, true]);
        assert_eq!(arch.rope_theta, 1e6);
        assert_eq!(arch.gemma.rope_local_theta, Some(1e4));
        assert_eq!(arch.rope_scaling.as_ref().unwrap()["factor"], json!(8.0));
        assert!(arch.tie_word_embeddings && arch.layers[0].attention.qk_norm);
        assert_eq!(arch.hidden_act, "gelu_pytorch_tanh");
        assert_eq!(arch.gemma.attn_logit_softcapping, None);
        let out = config_json(&arch, DType::BF16).unwrap();
        assert_eq!(out["architectures"], json!(["Gemma3ForCausalLM"]));
        assert_eq!(
            out["rope_parameters"]["sliding_attention"]["rope_theta"],
            json!(1e4)
        );
        assert_eq!(out["layer_types"][2], json!("full_attention"));
        assert_eq!(parse_config(Path::new("c.json"), &out).unwrap(), arch);
    }

    #[test]
    fn gemma2_defaults_are_transformers_and_null_turns_capping_off() {
        let mut v = gemma("gemma2");
        let arch = parse_config(Path::new("c.json"), &v).unwrap();
        assert_eq!(full(&arch), [false, true, false, true, false, true]);
        assert_eq!(arch.gemma.attn_logit_softcapping, Some(50.0));
        assert_eq!(arch.gemma.final_logit_softcapping, Some(30.0));
        assert_eq!(arch.gemma.query_pre_attn_scalar, Some(256.0));
        assert!(!arch.layers[0].attention.qk_norm);
        v["final_logit_softcapping"] = Value::Null;
        let arch = parse_config(Path::new("c.json"), &v).unwrap();
        assert_eq!(arch.gemma.final_logit_softcapping, None);
        let out = config_json(&arch, DType::BF16).unwrap();
        assert_eq!(out["final_logit_softcapping"], Value::Null);
        assert_eq!(out["hidden_activation"], json!("gelu_pytorch_tanh"));
        assert_eq!(parse_config(Path::new("c.json"), &out).unwrap(), arch);
    }

    #[test]
    fn gemma_configs_we_cannot_run_name_the_field() {
        for (field, value, want) in [
            ("layer_types", json!(["full_attention"]), "lists 1 layers"),
            ("layer_types", json!(vec!["sliding_attention"; 6]), ""),
            ("use_bidirectional_attention", json!(true), "bidirectional"),
            (
                "hidden_activation",
                json!("relu"),
                "`relu` is not supported",
            ),
            ("attn_logit_softcapping", json!(-1.0), "must be a positive"),
        ] {
            let mut v = gemma("gemma2");
            v[field] = value;
            match parse_config(Path::new("c.json"), &v) {
                Ok(_) => assert!(want.is_empty(), "{field}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains(field) && e.contains(want), "{e}");
                }
            }
        }
    }
}
