//! surgeon-surgery: structural surgery on a model [`Plan`]: depth up-scaling (SOLAR), block
//! expansion (LLaMA Pro) and layer dropping.
//!
//! Every operator returns a new plan and touches no tensor data: kept and duplicated tensors are
//! clones of their [`Source`] (an `Arc` bump), so the writer copies their bytes file-to-file.
//! Inserted zero projections are [`Source::Zeros`].
use std::ops::Range;
use surgeon_formats::arch::{split_layer_name, Mlp};
use surgeon_formats::{Plan, Source, TensorEntry};

pub mod error;
pub mod moe;
pub mod vocab;
pub use error::{Error, Result};

/// Parses a comma-separated list of half-open layer ranges, e.g. `0..24,8..32`.
/// Checks only the syntax and that each range is non-empty; [`upscale`] checks the bounds.
pub fn parse_slices(text: &str) -> Result<Vec<Range<usize>>> {
    let mut out = vec![];
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = part
            .split_once("..")
            .ok_or_else(|| Error::Syntax(format!("slice `{part}` is not of the form A..B")))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| Error::Syntax(format!("slice `{part}`: `{s}` is not a layer number")))
        };
        let r = parse(a)?..parse(b)?;
        check_slice_order(&r)?;
        out.push(r);
    }
    Ok(out)
}

/// Parses a comma-separated list of layer indices, e.g. `3,7,12`.
pub fn parse_indices(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| Error::Syntax(format!("`{}` is not a layer number", s.trim())))
        })
        .collect()
}

fn check_slice_order(r: &Range<usize>) -> Result<()> {
    if r.start > r.end {
        return Err(Error::ReversedSlice {
            start: r.start,
            end: r.end,
        });
    }
    if r.start == r.end {
        return Err(Error::EmptySlice { at: r.start });
    }
    Ok(())
}

/// SOLAR slices for an `n`-layer model up-scaled to `s` layers: `0..s/2` of one copy and
/// `n-s/2..n` of the other (m = n - s/2 layers dropped from each). Needs s even and n < s < 2n.
pub fn solar_slices(n: usize, s: usize) -> Result<Vec<Range<usize>>> {
    if !s.is_multiple_of(2) || s <= n || s >= 2 * n {
        return Err(Error::InvalidTarget { n, s });
    }
    Ok(vec![0..s / 2, n - s / 2..n])
}

/// Restacks the decoder: new layer `k` is a copy of old layer `map[k]`. Non-layer tensors are kept,
/// layer tensors are renamed (sources cloned, no data touched), `surgeon.new_layers` is carried over
/// to the copies of new layers, and a per-layer `layer_types` list in config.json follows the layers.
/// `map` must be non-empty and in range (callers check and report their own errors).
fn restack(plan: &Plan, map: &[usize]) -> Plan {
    let n = plan.arch.num_layers();
    let mut per_layer: Vec<Vec<(&str, &TensorEntry)>> = vec![vec![]; n];
    let mut tensors = std::collections::BTreeMap::new();
    for (name, entry) in &plan.tensors {
        match split_layer_name(name) {
            Some((i, rest)) if i < n => per_layer[i].push((rest, entry)),
            _ => {
                tensors.insert(name.clone(), entry.clone());
            }
        }
    }
    for (k, &old) in map.iter().enumerate() {
        for (rest, entry) in &per_layer[old] {
            tensors.insert(format!("model.layers.{k}.{rest}"), (*entry).clone());
        }
    }
    let mut arch = plan.arch.clone();
    arch.layers = map.iter().map(|&i| plan.arch.layers[i].clone()).collect();
    let was_new = &plan.arch.surgeon.new_layers;
    arch.surgeon.new_layers = (0..map.len())
        .filter(|&k| was_new.contains(&map[k]))
        .collect();
    if let Some(serde_json::Value::Array(types)) = plan.arch.extra.get("layer_types") {
        if types.len() == n {
            let remapped = map.iter().map(|&i| types[i].clone()).collect();
            arch.extra
                .insert("layer_types".into(), serde_json::Value::Array(remapped));
        }
    }
    Plan {
        arch,
        tensors,
        files: plan.files.clone(),
        origin: plan.origin.clone(),
    }
}

fn check_layer(n: usize, layer: usize) -> Result<()> {
    if layer >= n {
        return Err(Error::LayerOutOfRange { layer, n });
    }
    Ok(())
}

fn ranges_text(slices: &[Range<usize>]) -> String {
    slices
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

/// Depth up-scaling (SOLAR, arXiv 2312.15166), general form: the new decoder is the concatenation
/// of the half-open layer `slices` of the old one (mergekit passthrough). Duplicated layers are
/// exact copies; embeddings, final norm and lm_head are unchanged.
pub fn upscale(plan: &Plan, slices: &[Range<usize>]) -> Result<Plan> {
    let n = plan.arch.num_layers();
    if slices.is_empty() {
        return Err(Error::Syntax("no slices given".into()));
    }
    for r in slices {
        check_slice_order(r)?;
        if r.end > n {
            return Err(Error::SliceOutOfRange {
                start: r.start,
                end: r.end,
                n,
            });
        }
    }
    let map: Vec<usize> = slices.iter().flat_map(|r| r.clone()).collect();
    let mut out = restack(plan, &map);
    out.arch.surgeon.history.push(format!(
        "upscale: depth up-scaling {n} -> {} layers, slices {}",
        map.len(),
        ranges_text(slices)
    ));
    Ok(out)
}

/// SOLAR depth up-scaling of an `n`-layer model to `s` layers (see [`solar_slices`]).
pub fn upscale_solar(plan: &Plan, s: usize) -> Result<Plan> {
    upscale(plan, &solar_slices(plan.arch.num_layers(), s)?)
}

/// LLaMA Pro insertion points: with `p` blocks added to `n`, after every `n/p`-th block
/// (`n/p - 1, 2n/p - 1, ..., n - 1`). `p` must divide `n`.
pub fn expansion_positions(n: usize, p: usize) -> Result<Vec<usize>> {
    if p == 0 || p > n || !n.is_multiple_of(p) {
        return Err(Error::NotDivisible { n, p });
    }
    let split = n / p;
    Ok((1..=p).map(|k| k * split - 1).collect())
}

/// Tensor-name suffixes (within a layer) that block expansion zeroes: the projections that write
/// into the residual stream.
fn zeroed_in_copy(rest: &str) -> bool {
    rest == "self_attn.o_proj.weight"
        || rest == "self_attn.o_proj.bias"
        || rest == "mlp.down_proj.weight"
        || rest == "mlp.down_proj.bias"
        || (rest.starts_with("block_sparse_moe.experts.")
            && (rest.ends_with(".w2.weight") || rest.ends_with(".w2.bias")))
}

/// Block expansion (LLaMA Pro, arXiv 2401.02415): after each original block in `positions`, insert a
/// copy of it whose `o_proj` and `down_proj` (every expert's `w2` in MoE layers) are zero, so each
/// inserted block is the identity. Norms and everything else are copied. The new blocks' indices
/// are recorded in `surgeon.new_layers`. `positions` are original layer indices, distinct.
pub fn expand(plan: &Plan, positions: &[usize]) -> Result<Plan> {
    let n = plan.arch.num_layers();
    if positions.is_empty() {
        return Err(Error::Syntax("no positions given".into()));
    }
    let mut pos = positions.to_vec();
    pos.sort_unstable();
    for w in pos.windows(2) {
        if w[0] == w[1] {
            return Err(Error::DuplicateLayer { layer: w[0] });
        }
    }
    for &i in &pos {
        check_layer(n, i)?;
    }
    let mut map = vec![];
    let mut inserted = vec![];
    for i in 0..n {
        map.push(i);
        if pos.binary_search(&i).is_ok() {
            inserted.push(map.len());
            map.push(i);
        }
    }
    let mut out = restack(plan, &map);
    for &k in &inserted {
        let prefix = format!("model.layers.{k}.");
        for (name, entry) in out.tensors.iter_mut() {
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            if zeroed_in_copy(rest) {
                entry.source = Source::Zeros {
                    shape: entry.shape(),
                    dtype: entry.dtype,
                };
            }
        }
    }
    let mut new_layers = out.arch.surgeon.new_layers.clone();
    new_layers.extend(&inserted);
    new_layers.sort_unstable();
    out.arch.surgeon.new_layers = new_layers;
    let moe = inserted
        .iter()
        .any(|&k| matches!(out.arch.layers[k].mlp, Mlp::Moe { .. }));
    out.arch.surgeon.history.push(format!(
        "expand: block expansion {n} -> {} layers, identity copies of blocks {} at {} (o_proj{} zeroed)",
        out.arch.num_layers(),
        join(&pos),
        join(&inserted),
        if moe { ", down_proj, expert w2" } else { ", down_proj" },
    ));
    Ok(out)
}

/// Block expansion with `p` blocks at the LLaMA Pro positions (see [`expansion_positions`]).
pub fn expand_even(plan: &Plan, p: usize) -> Result<Plan> {
    expand(plan, &expansion_positions(plan.arch.num_layers(), p)?)
}

fn join(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Removes the decoder layers `layers` (distinct, in range, not all of them) and renumbers the rest.
pub fn drop_layers(plan: &Plan, layers: &[usize]) -> Result<Plan> {
    let n = plan.arch.num_layers();
    if layers.is_empty() {
        return Err(Error::Syntax("no layers to drop".into()));
    }
    let mut drop = layers.to_vec();
    drop.sort_unstable();
    for w in drop.windows(2) {
        if w[0] == w[1] {
            return Err(Error::DuplicateLayer { layer: w[0] });
        }
    }
    for &i in &drop {
        check_layer(n, i)?;
    }
    if drop.len() == n {
        return Err(Error::DropAll { n });
    }
    let map: Vec<usize> = (0..n).filter(|i| drop.binary_search(i).is_err()).collect();
    let mut out = restack(plan, &map);
    out.arch.surgeon.history.push(format!(
        "drop-layers: removed layers {} ({n} -> {} layers)",
        join(&drop),
        map.len()
    ));
    Ok(out)
}

/// The `k` layers with the lowest influence `scores` (one per layer), ascending by layer index.
/// Ties go to the lower layer index. `k` must leave at least one layer; scores must not be NaN.
pub fn lowest_influence(scores: &[f64], k: usize) -> Result<Vec<usize>> {
    let n = scores.len();
    if k == 0 {
        return Err(Error::Syntax("`count` must be at least 1".into()));
    }
    if k >= n {
        return Err(Error::DropAll { n });
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::Syntax(format!("influence of layer {i} is NaN")));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out = order[..k].to_vec();
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_parse_and_solar() {
        assert_eq!(parse_slices("0..24, 8..32").unwrap(), vec![0..24, 8..32]);
        assert_eq!(solar_slices(32, 48).unwrap(), vec![0..24, 8..32]);
        assert!(matches!(
            parse_slices("3..3"),
            Err(Error::EmptySlice { at: 3 })
        ));
        assert!(matches!(
            parse_slices("5..2"),
            Err(Error::ReversedSlice { start: 5, end: 2 })
        ));
        assert!(parse_slices("0-4").is_err());
        assert!(parse_slices("a..4").is_err());
        for s in [47, 32, 31, 64, 65] {
            assert!(matches!(
                solar_slices(32, s),
                Err(Error::InvalidTarget { .. })
            ));
        }
    }

    #[test]
    fn positions_and_influence() {
        assert_eq!(
            expansion_positions(32, 8).unwrap(),
            vec![3, 7, 11, 15, 19, 23, 27, 31]
        );
        assert_eq!(expansion_positions(4, 1).unwrap(), vec![3]);
        assert!(matches!(
            expansion_positions(32, 5),
            Err(Error::NotDivisible { n: 32, p: 5 })
        ));
        assert!(expansion_positions(4, 0).is_err());
        assert_eq!(
            lowest_influence(&[0.5, 0.1, 0.3, 0.1], 2).unwrap(),
            vec![1, 3]
        );
        assert_eq!(
            lowest_influence(&[0.5, 0.1, 0.3, 0.1], 3).unwrap(),
            vec![1, 2, 3]
        );
        assert!(matches!(
            lowest_influence(&[0.1, 0.2], 2),
            Err(Error::DropAll { n: 2 })
        ));
        assert!(lowest_influence(&[0.1, f64::NAN], 1).is_err());
    }
}
