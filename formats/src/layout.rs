//! Tensors as a family stores them, and as plans hold them.
//!
//! Plans name and shape every tensor the Llama / Mixtral way, so that operators and the runtime
//! need not know the family. A family that stores some tensors otherwise is translated when it is
//! read and translated back when it is written as that class:
//! - Qwen3-MoE names its experts `mlp.experts.{e}.gate_proj` (plans: `block_sparse_moe.experts.{e}.w1`);
//! - Phi-3 fuses `q_proj`, `k_proj`, `v_proj` into `qkv_proj` and `gate_proj`, `up_proj` into
//!   `gate_up_proj` (rows stacked in that order); plans hold row selections of the fused tensor,
//!   and a selection that covers the fused tensor in order is written back as that tensor itself.
use crate::arch::{split_layer_name, Family, Mlp, ModelArch};
use crate::export::{choose_export, ExportFormat};
use crate::plan::{Op, Plan, Source, TensorEntry};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

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

fn rename(family: Family, name: &str, to_stored: bool) -> String {
    let pair = |(stored, plan): (&'static str, &'static str)| match to_stored {
        true => (plan, stored),
        false => (stored, plan),
    };
    let Some((layer, rest)) = split_layer_name(name).filter(|_| family == Family::Qwen3Moe) else {
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

/// A fused tensor of layer `p` (`model.layers.{i}`) and the plan tensors it stacks, with their rows.
fn fused_parts(arch: &ModelArch, i: usize) -> Vec<(String, Vec<(String, usize)>)> {
    let p = format!("model.layers.{i}");
    let l = &arch.layers[i];
    let mut out = vec![];
    if !l.attention.is_no_op() {
        let a = &l.attention;
        out.push((
            format!("{p}.self_attn.qkv_proj.weight"),
            vec![
                (format!("{p}.self_attn.q_proj.weight"), a.q_dim()),
                (format!("{p}.self_attn.k_proj.weight"), a.kv_dim()),
                (format!("{p}.self_attn.v_proj.weight"), a.v_dim()),
            ],
        ));
    }
    if let Mlp::Dense { intermediate_size } = l.mlp {
        out.push((
            format!("{p}.mlp.gate_up_proj.weight"),
            vec![
                (format!("{p}.mlp.gate_proj.weight"), intermediate_size),
                (format!("{p}.mlp.up_proj.weight"), intermediate_size),
            ],
        ));
    }
    out
}

/// The plan's tensors from those a `arch.family` checkpoint at `path` stores.
pub fn from_stored(
    path: &Path,
    arch: &ModelArch,
    mut tensors: BTreeMap<String, TensorEntry>,
) -> Result<BTreeMap<String, TensorEntry>> {
    match arch.family {
        Family::Qwen3Moe => Ok(tensors
            .into_iter()
            .map(|(k, v)| (plan_name(arch.family, &k), v))
            .collect()),
        Family::Phi3 => {
            for i in 0..arch.num_layers() {
                for (fused, parts) in fused_parts(arch, i) {
                    split(path, &mut tensors, &fused, &parts)?;
                }
            }
            Ok(tensors)
        }
        _ => Ok(tensors),
    }
}

/// Replaces `fused` by row selections named `parts`.
fn split(
    path: &Path,
    tensors: &mut BTreeMap<String, TensorEntry>,
    fused: &str,
    parts: &[(String, usize)],
) -> Result<()> {
    let Some(entry) = tensors.remove(fused) else {
        // Already split: a remote-code export of the family holds the plans' own tensors.
        if parts.iter().all(|(n, _)| tensors.contains_key(n)) {
            return Ok(());
        }
        return Err(Error::format(path, format!("tensor `{fused}` is missing")));
    };
    let rows: usize = parts.iter().map(|(_, r)| r).sum();
    let shape = entry.shape();
    if shape.first() != Some(&rows) {
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        return Err(Error::format(
            path,
            format!(
                "tensor `{fused}` has shape {shape:?}; the config implies {rows} rows ({})",
                names.join(" + ")
            ),
        ));
    }
    let mut start = 0;
    for (name, r) in parts {
        let source = entry
            .source
            .clone()
            .rows((start..start + r).collect(), format!("split {fused}"));
        let dtype = entry.dtype;
        tensors.insert(name.clone(), TensorEntry { source, dtype });
        start += r;
    }
    Ok(())
}

/// `plan` with its tensors as the class it is exported as stores them (the plan itself when
/// that is the plans' own layout, as for every remote-code export).
pub fn stored_plan(plan: &Plan) -> Cow<'_, Plan> {
    let family = match choose_export(&plan.arch).format {
        ExportFormat::Native(family @ (Family::Qwen3Moe | Family::Phi3)) => family,
        _ => return Cow::Borrowed(plan),
    };
    let mut out = plan.clone();
    if family == Family::Phi3 {
        for i in 0..plan.arch.num_layers() {
            for (fused, parts) in fused_parts(&plan.arch, i) {
                let entries: Vec<TensorEntry> = parts
                    .iter()
                    .map(|(n, _)| out.tensors.remove(n).expect("validated plan"))
                    .collect();
                out.tensors.insert(fused, fuse(entries));
            }
        }
    }
    out.tensors = out
        .tensors
        .into_iter()
        .map(|(k, v)| (stored_name(family, &k), v))
        .collect();
    Cow::Owned(out)
}

/// The parts stacked by rows: the original fused tensor when they are its rows in order.
fn fuse(parts: Vec<TensorEntry>) -> TensorEntry {
    let dtype = parts[0].dtype;
    let same_dtype = parts.iter().all(|p| p.dtype == dtype);
    if let Some(whole) = unsplit(&parts).filter(|w| same_dtype && w.dtype() == dtype) {
        return TensorEntry {
            source: whole,
            dtype,
        };
    }
    let source = Source::op(Op::Concat {
        inputs: parts.into_iter().map(|p| p.source).collect(),
        dim: 0,
    });
    TensorEntry { source, dtype }
}

/// The source that `parts` split into consecutive row ranges covering all of it, if they do.
fn unsplit(parts: &[TensorEntry]) -> Option<Source> {
    let mut whole: Option<&Source> = None;
    let mut next = 0;
    for p in parts {
        let Source::Op(op) = &p.source else {
            return None;
        };
        let Op::Rows { input, indices, .. } = op.as_ref() else {
            return None;
        };
        if !indices.iter().enumerate().all(|(j, &r)| r == next + j) {
            return None;
        }
        next += indices.len();
        match whole {
            None => whole = Some(input),
            Some(w) if same_source(w, input) => {}
            Some(_) => return None,
        }
    }
    let whole = whole?;
    (whole.shape().first() == Some(&next)).then(|| whole.clone())
}

/// The same stored tensor (the only sources a checkpoint's split starts from).
fn same_source(a: &Source, b: &Source) -> bool {
    match (a, b) {
        (
            Source::Stored {
                file: fa,
                offset: oa,
                ..
            },
            Source::Stored {
                file: fb,
                offset: ob,
                ..
            },
        ) => Arc::ptr_eq(fa, fb) && oa == ob,
        _ => false,
    }
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
