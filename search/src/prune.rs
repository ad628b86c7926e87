//! Sub-network extraction (Minitron, arXiv 2407.14679; LLaMA-NAS, arXiv 2405.18377): a plan rewrite
//! that keeps, per layer, the most important KV groups, query heads within each kept group, MLP
//! neurons, and model-wide the most important hidden channels, by activation importance
//! ([`ImportanceScores`], plain data from `surgeon importance`). Layers may be dropped or skipped
//! (no-op attention or MLP, nemotron-nas style).
//!
//! It lives in surgeon-search, next to the search that extracts every candidate it re-measures,
//! and takes the scores as data: no runtime is involved. Kept rows keep their order, so a head
//! stays in its group and the parent's own spec ([`PruneSpec::parent`]) selects nothing: the
//! result is the parent, tensor sources untouched (bitwise).
use crate::error::{invalid, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use surgeon_formats::arch::{split_layer_name, Attention, Layer, Mlp, ModelArch};
use surgeon_formats::importance::top_k;
use surgeon_formats::{ImportanceScores, Plan, Source, TensorEntry};

/// One layer's attention in a spec: whole KV groups and query heads per group, or skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionSpec {
    Heads {
        kv_heads: usize,
        heads_per_group: usize,
    },
    NoOp,
}

/// One layer's MLP in a spec: a dense SwiGLU of this width, or skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpSpec {
    Dense { intermediate_size: usize },
    NoOp,
}

/// One layer of the sub-network: which parent layer it comes from and what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerSpec {
    pub source: usize,
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
}

/// A sub-network of a parent model (`--spec spec.json`): the hidden size kept and its layers, in
/// parent order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PruneSpec {
    pub hidden_size: usize,
    pub layers: Vec<LayerSpec>,
}

/// The uniform form (`surgeon prune --ffn --heads-per-group --kv-heads --hidden --keep-layers`):
/// `None` keeps the parent's value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UniformPrune {
    pub intermediate_size: Option<usize>,
    pub heads_per_group: Option<usize>,
    pub kv_heads: Option<usize>,
    pub hidden_size: Option<usize>,
    /// Parent layers kept, ascending; `None` keeps all.
    pub keep_layers: Option<Vec<usize>>,
}

impl PruneSpec {
    /// The spec that selects the whole parent.
    pub fn parent(arch: &ModelArch) -> Self {
        PruneSpec {
            hidden_size: arch.hidden_size,
            layers: (0..arch.num_layers())
                .map(|i| parent_layer(arch, i))
                .collect(),
        }
    }

    /// Every kept layer cut to the same widths.
    pub fn uniform(arch: &ModelArch, u: &UniformPrune) -> Self {
        let keep = u
            .keep_layers
            .clone()
            .unwrap_or_else(|| (0..arch.num_layers()).collect());
        let layers = keep
            .iter()
            .map(|&i| {
                let mut l = parent_layer(arch, i.min(arch.num_layers().saturating_sub(1)));
                l.source = i;
                if let AttentionSpec::Heads {
                    kv_heads,
                    heads_per_group,
                } = &mut l.attention
                {
                    *kv_heads = u.kv_heads.unwrap_or(*kv_heads);
                    *heads_per_group = u.heads_per_group.unwrap_or(*heads_per_group);
                }
                if let (MlpSpec::Dense { intermediate_size }, Some(w)) =
                    (&mut l.mlp, u.intermediate_size)
                {
                    *intermediate_size = w;
                }
                l
            })
            .collect();
        PruneSpec {
            hidden_size: u.hidden_size.unwrap_or(arch.hidden_size),
            layers,
        }
    }

    /// Reads a spec file; errors name the file.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| surgeon_formats::Error::io(path, e))?;
        Ok(serde_json::from_str(&text)
            .map_err(|e| surgeon_formats::Error::format(path, e.to_string()))?)
    }

    /// The architecture this spec gives on `parent` (after [`check`](Self::check)).
    pub fn arch(&self, parent: &ModelArch) -> ModelArch {
        let mut arch = parent.clone();
        arch.hidden_size = self.hidden_size;
        arch.layers = self
            .layers
            .iter()
            .map(|s| layer_of(&parent.layers[s.source], s))
            .collect();
        arch
    }

    /// Parameters of the sub-network, from the formula (no tensors).
    pub fn parameter_count(&self, parent: &ModelArch) -> u64 {
        self.arch(parent).parameter_count()
    }

    /// Checks the spec against `parent`; errors name the field (`heads_per_group`, ...).
    pub fn check(&self, parent: &ModelArch) -> Result<()> {
        let n = parent.num_layers();
        if self.hidden_size == 0 || self.hidden_size > parent.hidden_size {
            return invalid(format!(
                "`hidden_size` {} must be in 1..={}",
                self.hidden_size, parent.hidden_size
            ));
        }
        if self.layers.is_empty() {
            return invalid("a sub-network needs at least one layer (`layers` is empty)");
        }
        for (k, s) in self.layers.iter().enumerate() {
            if s.source >= n {
                return invalid(format!(
                    "layer {k}: `source` {} is out of range: the model has {n} layers",
                    s.source
                ));
            }
            if k > 0 && s.source <= self.layers[k - 1].source {
                return invalid(format!(
                    "layer {k}: `source` {} repeats or reorders a layer (give parent layers ascending)",
                    s.source
                ));
            }
            check_layer(&parent.layers[s.source], s)?;
        }
        Ok(())
    }
}

fn parent_layer(arch: &ModelArch, i: usize) -> LayerSpec {
    let l = &arch.layers[i];
    let a = &l.attention;
    LayerSpec {
        source: i,
        attention: match a.is_no_op() {
            true => AttentionSpec::NoOp,
            false => AttentionSpec::Heads {
                kv_heads: a.num_kv_heads,
                heads_per_group: a.num_heads / a.num_kv_heads.max(1),
            },
        },
        mlp: match l.mlp {
            Mlp::Dense { intermediate_size } => MlpSpec::Dense { intermediate_size },
            _ => MlpSpec::NoOp,
        },
    }
}

fn check_layer(parent: &Layer, s: &LayerSpec) -> Result<()> {
    let i = s.source;
    let a = &parent.attention;
    if let AttentionSpec::Heads {
        kv_heads,
        heads_per_group,
    } = s.attention
    {
        if a.is_no_op() {
            return invalid(format!(
                "layer {i} has no attention to keep heads of (`attention` must be no_op)"
            ));
        }
        if kv_heads == 0 || kv_heads > a.num_kv_heads {
            return invalid(format!(
                "layer {i}: `kv_heads` {kv_heads} must be in 1..={} (whole KV groups of the parent)",
                a.num_kv_heads
            ));
        }
        let r = a.num_heads / a.num_kv_heads;
        if heads_per_group == 0 || heads_per_group > r {
            return invalid(format!(
                "layer {i}: `heads_per_group` {heads_per_group} must be in 1..={r}: each KV group has {r} query heads"
            ));
        }
    }
    match (s.mlp, &parent.mlp) {
        (MlpSpec::NoOp, _) => Ok(()),
        (
            MlpSpec::Dense { intermediate_size },
            Mlp::Dense {
                intermediate_size: p,
            },
        ) => {
            if intermediate_size == 0 || intermediate_size > *p {
                return invalid(format!(
                    "layer {i}: `intermediate_size` {intermediate_size} must be in 1..={p} (0 is a no_op MLP)"
                ));
            }
            Ok(())
        }
        (MlpSpec::Dense { .. }, Mlp::NoOp) => invalid(format!(
            "layer {i} has no MLP to keep neurons of (`mlp` must be no_op)"
        )),
        (MlpSpec::Dense { .. }, Mlp::Moe { .. }) => invalid(format!(
            "layer {i}: a mixture of experts; pruning handles dense MLPs"
        )),
    }
}

fn layer_of(parent: &Layer, s: &LayerSpec) -> Layer {
    let a = &parent.attention;
    let attention = match s.attention {
        AttentionSpec::NoOp => Attention::no_op(a.num_heads, a.head_dim),
        AttentionSpec::Heads {
            kv_heads,
            heads_per_group,
        } => Attention {
            num_heads: kv_heads * heads_per_group,
            num_kv_heads: kv_heads,
            ..a.clone()
        },
    };
    let mlp = match s.mlp {
        MlpSpec::NoOp => Mlp::NoOp,
        MlpSpec::Dense { intermediate_size } => Mlp::Dense { intermediate_size },
    };
    Layer { attention, mlp }
}

/// Row/column selections of one layer: `None` where everything is kept.
#[derive(Default)]
struct LayerSelection {
    q: Option<Vec<usize>>,
    kv: Option<Vec<usize>>,
    v: Option<Vec<usize>>,
    o: Option<Vec<usize>>,
    mlp: Option<Vec<usize>>,
}

/// `Some(indices)` unless they are all of `0..n` in order.
fn non_identity(indices: Vec<usize>, n: usize) -> Option<Vec<usize>> {
    (indices.len() != n || indices.iter().enumerate().any(|(i, &x)| i != x)).then_some(indices)
}

/// Features `i * size..(i + 1) * size` for each unit `i`.
fn expand(units: &[usize], size: usize) -> Vec<usize> {
    units
        .iter()
        .flat_map(|&u| u * size..(u + 1) * size)
        .collect()
}

/// Which KV groups and query heads (parent numbering) a layer keeps: the most important groups,
/// in each the most important heads.
pub fn kept_heads(
    parent: &Attention,
    kv_heads: usize,
    heads_per_group: usize,
    scores: Option<&surgeon_formats::LayerImportance>,
) -> (Vec<usize>, Vec<usize>) {
    let r = parent.num_heads / parent.num_kv_heads;
    let groups = match scores {
        Some(s) => top_k(&s.group_scores(), kv_heads),
        None => (0..kv_heads).collect(),
    };
    let heads = groups
        .iter()
        .flat_map(|&g| {
            let within = match scores {
                Some(s) => top_k(&s.heads[g * r..(g + 1) * r], heads_per_group),
                None => (0..heads_per_group).collect(),
            };
            within.into_iter().map(move |j| g * r + j)
        })
        .collect();
    (groups, heads)
}

fn select_layer(
    parent: &Layer,
    s: &LayerSpec,
    scores: Option<&surgeon_formats::LayerImportance>,
) -> LayerSelection {
    let mut sel = LayerSelection::default();
    let a = &parent.attention;
    if let AttentionSpec::Heads {
        kv_heads,
        heads_per_group,
    } = s.attention
    {
        let (groups, heads) = kept_heads(a, kv_heads, heads_per_group, scores);
        sel.q = non_identity(expand(&heads, a.head_dim), a.q_dim());
        sel.kv = non_identity(expand(&groups, a.head_dim), a.kv_dim());
        sel.v = non_identity(expand(&groups, a.v_head_dim), a.v_dim());
        sel.o = non_identity(expand(&heads, a.v_head_dim), a.o_dim());
    }
    if let (
        MlpSpec::Dense { intermediate_size },
        Mlp::Dense {
            intermediate_size: p,
        },
    ) = (s.mlp, &parent.mlp)
    {
        let keep = match scores {
            Some(sc) => top_k(&sc.mlp, intermediate_size),
            None => (0..intermediate_size).collect(),
        };
        sel.mlp = non_identity(keep, *p);
    }
    sel
}

/// Does `spec` cut any width (so that it needs importance scores)?
pub fn cuts_width(spec: &PruneSpec, parent: &ModelArch) -> bool {
    spec.hidden_size != parent.hidden_size
        || spec.layers.iter().any(|s| {
            let p = parent_layer(parent, s.source);
            (matches!(s.attention, AttentionSpec::Heads { .. }) && s.attention != p.attention)
                || (matches!(s.mlp, MlpSpec::Dense { .. }) && s.mlp != p.mlp)
        })
}

/// Extracts the sub-network `spec` of `plan`, keeping the rows and columns of highest importance
/// in `scores`. Without scores only layers can be dropped or skipped: cutting a width needs them
/// (the first rows are not the important ones). The parent's own spec gives the parent unchanged.
pub fn prune(plan: &Plan, spec: &PruneSpec, scores: Option<&ImportanceScores>) -> Result<Plan> {
    let parent = &plan.arch;
    spec.check(parent)?;
    if let Some(s) = scores {
        s.check(parent)?;
    } else if cuts_width(spec, parent) {
        return invalid(
            "cutting a width keeps the most important rows and columns: give importance `scores` (from `surgeon importance`)",
        );
    }
    let hidden = match scores {
        Some(s) => non_identity(top_k(&s.hidden, spec.hidden_size), parent.hidden_size),
        None => None,
    };
    let arch = spec.arch(parent);
    let mut tensors = BTreeMap::new();
    let mut per_layer: Vec<Vec<(&str, &TensorEntry)>> = vec![vec![]; parent.num_layers()];
    for (name, entry) in &plan.tensors {
        match split_layer_name(name) {
            Some((i, rest)) if i < parent.num_layers() => per_layer[i].push((rest, entry)),
            _ => {
                let src = hidden_cut(name, &entry.source, hidden.as_ref());
                tensors.insert(name.clone(), with_source(entry, src));
            }
        }
    }
    for (k, s) in spec.layers.iter().enumerate() {
        let sel = select_layer(
            &parent.layers[s.source],
            s,
            scores.map(|x| &x.layers[s.source]),
        );
        for (rest, entry) in &per_layer[s.source] {
            if !keeps(rest, s, parent.family.is_gemma()) {
                continue;
            }
            let src = layer_cut(rest, &entry.source, &sel, hidden.as_ref());
            tensors.insert(format!("model.layers.{k}.{rest}"), with_source(entry, src));
        }
    }
    let mut out = Plan {
        arch,
        tensors,
        files: plan.files.clone(),
        origin: plan.origin.clone(),
    };
    carry_layer_meta(&mut out.arch, parent, spec);
    if spec != &PruneSpec::parent(parent) {
        out.arch
            .surgeon
            .history
            .push(history_line(plan, &out, spec));
    }
    out.validate()?;
    Ok(out)
}

fn with_source(entry: &TensorEntry, source: Source) -> TensorEntry {
    TensorEntry {
        source,
        dtype: entry.dtype,
    }
}

/// Whether a parent layer's tensor survives the spec (skipped halves lose norms and projections;
/// Gemma's `post_attention_layernorm` follows the attention, its MLP has two norms of its own).
fn keeps(rest: &str, s: &LayerSpec, gemma: bool) -> bool {
    let norm = |n: &str| rest.starts_with(n);
    let attention = norm("self_attn.")
        || norm("input_layernorm.")
        || gemma && norm("post_attention_layernorm.");
    let mlp = norm("mlp.")
        || !gemma && norm("post_attention_layernorm.")
        || norm("pre_feedforward_layernorm.")
        || norm("post_feedforward_layernorm.");
    !(attention && s.attention == AttentionSpec::NoOp || mlp && s.mlp == MlpSpec::NoOp)
}

fn rows(src: &Source, sel: Option<&Vec<usize>>, label: &str) -> Source {
    match sel {
        Some(ix) => src.clone().rows(ix.clone(), label),
        None => src.clone(),
    }
}

fn cols(src: &Source, sel: Option<&Vec<usize>>, label: &str) -> Source {
    match sel {
        Some(ix) => src.clone().cols(ix.clone(), label),
        None => src.clone(),
    }
}

/// Embeddings and lm_head lose hidden columns, the final norm hidden rows.
fn hidden_cut(name: &str, src: &Source, hidden: Option<&Vec<usize>>) -> Source {
    match name {
        "model.norm.weight" => rows(src, hidden, "hidden"),
        _ if src.shape().len() == 2 => cols(src, hidden, "hidden"),
        _ => src.clone(),
    }
}

/// One layer tensor cut by the layer's selections and the hidden channels kept.
fn layer_cut(
    rest: &str,
    src: &Source,
    sel: &LayerSelection,
    hidden: Option<&Vec<usize>>,
) -> Source {
    let h = |s: Source| cols(&s, hidden, "hidden");
    match rest {
        "input_layernorm.weight"
        | "post_attention_layernorm.weight"
        | "pre_feedforward_layernorm.weight"
        | "post_feedforward_layernorm.weight" => rows(src, hidden, "hidden"),
        "self_attn.q_proj.weight" => h(rows(src, sel.q.as_ref(), "heads")),
        "self_attn.k_proj.weight" => h(rows(src, sel.kv.as_ref(), "kv groups")),
        "self_attn.v_proj.weight" => h(rows(src, sel.v.as_ref(), "kv groups")),
        "self_attn.q_proj.bias" => rows(src, sel.q.as_ref(), "heads"),
        "self_attn.k_proj.bias" => rows(src, sel.kv.as_ref(), "kv groups"),
        "self_attn.v_proj.bias" => rows(src, sel.v.as_ref(), "kv groups"),
        "self_attn.o_proj.weight" => rows(&cols(src, sel.o.as_ref(), "heads"), hidden, "hidden"),
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => h(rows(src, sel.mlp.as_ref(), "neurons")),
        "mlp.down_proj.weight" => rows(&cols(src, sel.mlp.as_ref(), "neurons"), hidden, "hidden"),
        _ => src.clone(),
    }
}

/// `surgeon.new_layers` and a per-layer `layer_types` list follow the kept layers.
fn carry_layer_meta(arch: &mut ModelArch, parent: &ModelArch, spec: &PruneSpec) {
    let map: Vec<usize> = spec.layers.iter().map(|s| s.source).collect();
    arch.surgeon.new_layers = (0..map.len())
        .filter(|&k| parent.surgeon.new_layers.contains(&map[k]))
        .collect();
    if let Some(serde_json::Value::Array(types)) = parent.extra.get("layer_types") {
        if types.len() == parent.num_layers() {
            let remapped = map.iter().map(|&i| types[i].clone()).collect();
            arch.extra
                .insert("layer_types".into(), serde_json::Value::Array(remapped));
        }
    }
}

fn history_line(parent: &Plan, out: &Plan, spec: &PruneSpec) -> String {
    let pa = &parent.arch;
    format!(
        "prune: {} -> {} parameters, {} -> {} layers, hidden {} -> {} (activation importance)",
        surgeon_formats::plan::group_digits(pa.parameter_count()),
        surgeon_formats::plan::group_digits(out.arch.parameter_count()),
        pa.num_layers(),
        spec.layers.len(),
        pa.hidden_size,
        spec.hidden_size
    )
}
