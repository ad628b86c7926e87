//! Tensor names as a family stores them, and the names plans use.
//!
//! Plans name every tensor the Llama / Mixtral way, so that operators and the runtime need not
//! know the family. A family that stores some tensors under other names (Qwen3-MoE's
//! `mlp.experts.{e}.gate_proj`) is renamed when it is read and renamed back when it is written.
use crate::arch::{split_layer_name, Family};
use crate::plan::TensorEntry;
use std::collections::BTreeMap;

/// Qwen3-MoE's names (after `model.layers.{i}.`) and their Mixtral counterparts; the first two
/// say whether a tensor belongs to the MoE block at all.
const QWEN3_MOE: [(&str, &str); 5] = [
    ("mlp.gate.", "block_sparse_moe.gate."),
    ("mlp.experts.", "block_sparse_moe.experts."),
    (".gate_proj.", ".w1."),
    (".up_proj.", ".w3."),
    (".down_proj.", ".w2."),
];

/// The plan's name for tensor `stored` of a `family` checkpoint.
pub fn plan_name(family: Family, stored: &str) -> String {
    rename(family, stored, false)
}

/// The name under which a `family` checkpoint stores plan tensor `name`.
pub fn stored_name(family: Family, name: &str) -> String {
    rename(family, name, true)
}

/// Renames every key of `tensors` with `plan_name` (after reading a checkpoint).
pub fn to_plan_names(
    family: Family,
    tensors: BTreeMap<String, TensorEntry>,
) -> BTreeMap<String, TensorEntry> {
    if !renames(family) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (plan_name(family, &k), v))
        .collect()
}

/// Whether `family` stores any tensor under another name than plans use.
pub fn renames(family: Family) -> bool {
    family == Family::Qwen3Moe
}

fn rename(family: Family, name: &str, to_stored: bool) -> String {
    let pair = |(stored, plan): (&'static str, &'static str)| match to_stored {
        true => (plan, stored),
        false => (stored, plan),
    };
    let Some((layer, rest)) = split_layer_name(name).filter(|_| renames(family)) else {
        return name.to_string();
    };
    // Only the MoE block: a dense layer's `mlp.gate_proj` keeps its name.
    if !QWEN3_MOE[..2].iter().any(|&p| rest.starts_with(pair(p).0)) {
        return name.to_string();
    }
    let mut out = format!(".{rest}");
    for p in QWEN3_MOE {
        let (from, to) = pair(p);
        out = out.replacen(from, to, 1);
    }
    format!("model.layers.{layer}{out}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_moe_names_round_trip_and_dense_names_stay() {
        for (stored, plan) in [
            (
                "model.layers.3.mlp.gate.weight",
                "model.layers.3.block_sparse_moe.gate.weight",
            ),
            (
                "model.layers.0.mlp.experts.7.gate_proj.weight",
                "model.layers.0.block_sparse_moe.experts.7.w1.weight",
            ),
            (
                "model.layers.0.mlp.experts.12.up_proj.weight",
                "model.layers.0.block_sparse_moe.experts.12.w3.weight",
            ),
            (
                "model.layers.1.mlp.experts.0.down_proj.weight",
                "model.layers.1.block_sparse_moe.experts.0.w2.weight",
            ),
            (
                "model.layers.1.mlp.gate_proj.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            (
                "model.layers.1.self_attn.q_norm.weight",
                "model.layers.1.self_attn.q_norm.weight",
            ),
            ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ] {
            assert_eq!(plan_name(Family::Qwen3Moe, stored), plan, "{stored}");
            assert_eq!(stored_name(Family::Qwen3Moe, plan), stored, "{plan}");
        }
        let mixtral = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
        assert_eq!(stored_name(Family::Mixtral, mixtral), mixtral);
    }
}
