//! Regrouping key/value heads (GQA, arXiv 2305.13245): every layer gets `G` key/value heads.
//!
//! Query head `q` of `H` reads key/value head `q / (H / G)` (transformers' `repeat_kv` order). The
//! new key/value head `g` is the mean of the old heads that the query heads of group `g` read,
//! one term per query head. Fewer heads mean-pool the old ones (GQA's conversion); more heads
//! repeat them, which is exact: mean-pooling copies of one row gives the row back. Biases follow
//! their projections. `G` equal to the current count leaves the plan unchanged.
use crate::{Error, Result};
use std::sync::Arc;
use surgeon_formats::plan::{Op, Source, TensorEntry};
use surgeon_formats::{AttentionKind, Plan};

/// The plan with `kv_heads` key/value heads in every layer.
pub fn regroup_kv_heads(plan: &Plan, kv_heads: usize) -> Result<Plan> {
    let mut out = plan.clone();
    let mut changed = 0;
    for (l, layer) in plan.arch.layers.iter().enumerate() {
        let a = &layer.attention;
        if a.is_no_op() {
            continue; // a skipped attention has no heads to regroup
        }
        check_layer(l, &a.kind, a.num_heads, kv_heads)?;
        if a.num_kv_heads == kv_heads {
            continue;
        }
        // Keys have `head_dim` rows per head, values `v_head_dim`.
        for (proj, d) in [("k_proj", a.head_dim), ("v_proj", a.v_head_dim)] {
            let groups = Arc::new(row_groups(a.num_heads, a.num_kv_heads, kv_heads, d));
            for part in ["weight", "bias"] {
                let name = format!("model.layers.{l}.self_attn.{proj}.{part}");
                let Some(old) = plan.tensors.get(&name) else {
                    continue;
                };
                let source = Source::op(Op::MeanRows {
                    input: old.source.clone(),
                    groups: groups.clone(),
                    label: format!("{kv_heads} kv heads"),
                });
                let entry = TensorEntry {
                    source,
                    dtype: old.dtype,
                };
                out.tensors.insert(name, entry);
            }
        }
        out.arch.layers[l].attention.num_kv_heads = kv_heads;
        changed += 1;
    }
    if changed > 0 {
        let before = describe_heads(plan);
        out.arch.surgeon.history.push(format!(
            "convert-attention: {before} -> {kv_heads} key/value heads per layer ({changed} layers)"
        ));
        out.validate()?;
    }
    Ok(out)
}

/// `kv_heads` must divide the query heads of a softmax-attention layer.
fn check_layer(l: usize, kind: &AttentionKind, heads: usize, kv_heads: usize) -> Result<()> {
    if !matches!(kind, AttentionKind::Softmax) {
        return Err(Error::Unsupported {
            layer: l,
            message: format!(
                "{kind:?} attention: key/value heads are regrouped in softmax attention only"
            ),
        });
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Invalid(format!(
            "`kv_heads` {kv_heads} must divide the {heads} query heads of layer {l} (choose one of {})",
            divisors(heads)
        )));
    }
    Ok(())
}

/// For every row of the new projection (`new` heads of `d` rows), the old rows whose mean it is:
/// one old row per query head of the new group.
pub fn row_groups(heads: usize, old: usize, new: usize, d: usize) -> Vec<Vec<usize>> {
    let (per_old, per_new) = (heads / old, heads / new);
    let mut groups = Vec::with_capacity(new * d);
    for g in 0..new {
        let sources: Vec<usize> = (g * per_new..(g + 1) * per_new)
            .map(|q| q / per_old)
            .collect();
        for i in 0..d {
            groups.push(sources.iter().map(|&k| k * d + i).collect());
        }
    }
    groups
}

fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|&k| n.is_multiple_of(k))
        .map(|k| k.to_string())
        .collect();
    d.join(", ")
}

/// `3` when every layer has 3 key/value heads, else the per-layer list.
fn describe_heads(plan: &Plan) -> String {
    let counts: Vec<usize> = plan
        .arch
        .layers
        .iter()
        .map(|l| l.attention.num_kv_heads)
        .collect();
    match counts.first() {
        Some(&c) if counts.iter().all(|&x| x == c) => c.to_string(),
        _ => format!("{counts:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_repeat_kv_order() {
        // 4 query heads, 2 kv heads, head size 1: queries 0,1 read kv 0; queries 2,3 read kv 1.
        assert_eq!(row_groups(4, 2, 1, 1), vec![vec![0, 0, 1, 1]]);
        assert_eq!(
            row_groups(4, 2, 4, 1),
            vec![vec![0], vec![0], vec![1], vec![1]]
        );
        assert_eq!(row_groups(4, 2, 2, 1), vec![vec![0, 0], vec![1, 1]]);
        // Head size 2: every row of a head maps to the same row of the source head.
        assert_eq!(row_groups(2, 2, 1, 2), vec![vec![0, 2], vec![1, 3]]);
        // 6 query heads, 3 kv -> 2 kv: group 0 = queries 0,1,2 = kv 0,0,1.
        assert_eq!(row_groups(6, 3, 2, 1), vec![vec![0, 0, 1], vec![1, 2, 2]]);
    }

    #[test]
    fn divisors_are_listed() {
        assert_eq!(divisors(9), "1, 3, 9");
    }
}
