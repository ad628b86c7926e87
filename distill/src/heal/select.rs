//! Which tensors train.
use super::{Error, Result};
use surgeon_formats::arch::split_layer_name;
use surgeon_formats::Plan;

/// The `--train` choice.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum TrainSet {
    #[default]
    All,
    /// Only the layers in `arch.surgeon.new_layers` (block expansion).
    NewBlocks,
    /// `embed_tokens` and `lm_head`.
    Embeddings,
    /// Only the rows of `arch.surgeon.new_token_ids` in `embed_tokens` / `lm_head`.
    NewEmbeddings,
    /// Hedgehog feature maps and window mixing factors (attention transfer).
    FeatureMaps,
    /// LoRA adapters on linear layers, merged into their weights at save.
    Lora(LoraSpec),
    /// CLOVER singular-value fine-tuning: per-head cores of `q_proj` and `v_proj` (value-output
    /// SVD) and per-block cores of `up_proj`, merged at save.
    Clover,
    /// HF tensor names matching a regular expression.
    Regex(String),
}

/// `lora[:r=8,alpha=16,targets=q+k+v+o+gate+up+down]`: rank, scale numerator and the linear
/// layers (by the last part of their module name; `q` is short for `q_proj`) that get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
}

/// The linear layers LoRA adapts by default (attention and MLP projections, as peft's Llama preset
/// extended to the MLP).
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: 8,
            alpha: 16.0,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    /// Parses the options after `lora:` (`r=8,alpha=16,targets=q+v`).
    fn from_str(opts: &str) -> std::result::Result<Self, String> {
        let mut spec = LoraSpec::default();
        let bad = |why: String| {
            Err(format!(
                "`lora:{opts}`: {why} (lora[:r=8,alpha=16,targets=q+k+v+o+gate+up+down])"
            ))
        };
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return bad(format!("`{kv}` is not key=value"));
            };
            match k.trim() {
                "r" => match v.trim().parse::<usize>() {
                    Ok(r) if r > 0 => spec.r = r,
                    _ => return bad(format!("r must be a positive integer, not `{v}`")),
                },
                "alpha" => match v.trim().parse::<f64>() {
                    Ok(a) if a.is_finite() && a > 0.0 => spec.alpha = a,
                    _ => return bad(format!("alpha must be a positive number, not `{v}`")),
                },
                "targets" => {
                    let t: Vec<String> = v
                        .split('+')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| match s {
                            "q" | "k" | "v" | "o" | "gate" | "up" | "down" => format!("{s}_proj"),
                            s => s.to_string(),
                        })
                        .collect();
                    if t.is_empty() {
                        return bad("targets is empty".into());
                    }
                    spec.targets = t;
                }
                other => return bad(format!("unknown option `{other}` (r, alpha, targets)")),
            }
        }
        Ok(spec)
    }
}

impl std::fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lora:r={},alpha={}", self.r, self.alpha)?;
        if self.targets != LoraSpec::default().targets {
            write!(f, ",targets={}", self.targets.join("+"))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for TrainSet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "all" => TrainSet::All,
            "new-blocks" => TrainSet::NewBlocks,
            "embeddings" => TrainSet::Embeddings,
            "new-embeddings" => TrainSet::NewEmbeddings,
            "feature-maps" => TrainSet::FeatureMaps,
            "lora" => TrainSet::Lora(LoraSpec::default()),
            "clover" => TrainSet::Clover,
            s if s.starts_with("lora:") => TrainSet::Lora(s["lora:".len()..].parse()?),
            re => TrainSet::Regex(re.to_string()),
        })
    }
}

impl std::fmt::Display for TrainSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainSet::All => "all",
            TrainSet::NewBlocks => "new-blocks",
            TrainSet::Embeddings => "embeddings",
            TrainSet::NewEmbeddings => "new-embeddings",
            TrainSet::FeatureMaps => "feature-maps",
            TrainSet::Lora(spec) => return write!(f, "{spec}"),
            TrainSet::Clover => "clover",
            TrainSet::Regex(re) => re,
        })
    }
}

/// The resolved trainable set.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// HF tensor names that train, sorted.
    pub names: Vec<String>,
    /// For `new-embeddings`: the only rows of the embedding tensors that may change.
    pub rows: Option<Vec<u32>>,
    /// For adapter runs: `names` are the weights the adapters merge into; only the adapters train.
    pub adapter: Option<AdapterKind>,
}

/// Adapters trained instead of the selected weights.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterKind {
    Lora { r: usize, alpha: f64 },
    Clover,
}

impl Selection {
    /// Whether the parameter `name` of the training model trains.
    pub fn trains(&self, name: &str) -> bool {
        match self.adapter {
            Some(_) => crate::model::is_adapter_param(name),
            None => self.contains(name),
        }
    }

    /// Number of parameters that train in `plan`.
    pub fn parameters(&self, plan: &Plan) -> u64 {
        let shape = |n: &String| plan.tensors[n].shape();
        let count = |n: &String| match self.adapter {
            Some(AdapterKind::Lora { r, .. }) => (r * shape(n).iter().sum::<usize>()) as u64,
            Some(AdapterKind::Clover) => (shape(n)[0] * clover_block(plan, n)) as u64,
            None => plan.tensors[n].numel() as u64,
        };
        self.names.iter().map(count).sum()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
    }
}

const EMBEDDINGS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Tensor name endings of Hedgehog feature maps and mixing factors.
const FEATURE_MAPS: [&str; 3] = [
    ".self_attn.feature_map_q.weight",
    ".self_attn.feature_map_k.weight",
    ".self_attn.window_factors",
];

fn feature_maps(plan: &Plan) -> Result<Vec<String>> {
    let names: Vec<String> = plan
        .tensors
        .keys()
        .filter(|n| FEATURE_MAPS.iter().any(|e| n.ends_with(e)))
        .cloned()
        .collect();
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "`train` feature-maps: {} has no Hedgehog attention layer (convert-attention \
             --to hedgehog adds them)",
            plan.origin
        )));
    }
    Ok(names)
}

/// The weights of the linear layers `spec` names (matrices `*.{target}.weight`).
fn lora_targets(plan: &Plan, spec: &LoraSpec) -> Result<Vec<String>> {
    let mut names = vec![];
    for t in &spec.targets {
        let suffix = format!(".{t}.weight");
        let found: Vec<&String> = plan
            .tensors
            .iter()
            .filter(|(n, e)| n.ends_with(&suffix) && e.shape().len() == 2)
            .map(|(n, _)| n)
            .collect();
        if found.is_empty() {
            return Err(Error::Invalid(format!(
                "`train` {spec}: no linear layer of {} is called `{t}`",
                plan.origin
            )));
        }
        names.extend(found.into_iter().cloned());
    }
    Ok(names)
}

/// Rows per CLOVER block of the weight `name`: the head size for `q_proj`, the value head size for
/// `v_proj`, half the head size for `up_proj` (the reference's split).
fn clover_block(plan: &Plan, name: &str) -> usize {
    let a = split_layer_name(name).map(|(l, _)| &plan.arch.layers[l].attention);
    match a {
        Some(a) if name.ends_with(".v_proj.weight") => a.v_head_dim,
        Some(a) if name.ends_with(".up_proj.weight") => (a.head_dim / 2).max(1),
        Some(a) => a.head_dim,
        None => 0,
    }
}

/// `q_proj` and `v_proj` of softmax attention layers, `up_proj` of dense MLPs.
fn clover_targets(plan: &Plan) -> Result<Vec<String>> {
    let mut names = vec![];
    for (l, layer) in plan.arch.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        if layer.attention.kind == surgeon_formats::AttentionKind::Softmax {
            names.push(format!("{p}.self_attn.q_proj.weight"));
            names.push(format!("{p}.self_attn.v_proj.weight"));
        }
        match layer.mlp {
            surgeon_formats::Mlp::Dense { .. } => names.push(format!("{p}.mlp.up_proj.weight")),
            surgeon_formats::Mlp::Moe { .. } => {
                return Err(Error::Invalid(format!(
                    "`train` clover: layer {l} is a MoE layer (CLOVER fine-tuning adapts softmax \
                     attention and dense MLPs)"
                )))
            }
            surgeon_formats::Mlp::NoOp => {}
        }
    }
    Ok(names)
}

/// Resolves `set` against the plan's tensors.
pub fn resolve(plan: &Plan, set: &TrainSet) -> Result<Selection> {
    let all = plan.tensors.keys();
    let mut rows = None;
    let mut adapter = None;
    let names: Vec<String> = match set {
        TrainSet::All => all.cloned().collect(),
        TrainSet::NewBlocks => {
            let new = &plan.arch.surgeon.new_layers;
            if new.is_empty() {
                return Err(Error::Invalid(format!(
                    "`train` new-blocks: {} records no new layers (surgeon.new_layers in \
                     config.json is empty; `surgeon expand` sets it)",
                    plan.origin
                )));
            }
            if let Some(bad) = new.iter().find(|&&l| l >= plan.arch.num_layers()) {
                return Err(Error::Invalid(format!(
                    "surgeon.new_layers names layer {bad}, but the model has {} layers",
                    plan.arch.num_layers()
                )));
            }
            all.filter(|n| split_layer_name(n).is_some_and(|(i, _)| new.contains(&i)))
                .cloned()
                .collect()
        }
        TrainSet::Embeddings => all
            .filter(|n| EMBEDDINGS.contains(&n.as_str()))
            .cloned()
            .collect(),
        TrainSet::NewEmbeddings => {
            let ids = &plan.arch.surgeon.new_token_ids;
            if ids.is_empty() {
                return Err(Error::Invalid(format!(
                    "`train` new-embeddings: {} records no new tokens (surgeon.new_token_ids is \
                     empty; `surgeon extend-vocab` sets it)",
                    plan.origin
                )));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= plan.arch.vocab_size) {
                return Err(Error::Invalid(format!(
                    "surgeon.new_token_ids holds {bad}, outside the vocabulary of {}",
                    plan.arch.vocab_size
                )));
            }
            rows = Some(ids.clone());
            all.filter(|n| EMBEDDINGS.contains(&n.as_str()))
                .cloned()
                .collect()
        }
        TrainSet::FeatureMaps => feature_maps(plan)?,
        TrainSet::Lora(spec) => {
            adapter = Some(AdapterKind::Lora {
                r: spec.r,
                alpha: spec.alpha,
            });
            lora_targets(plan, spec)?
        }
        TrainSet::Clover => {
            adapter = Some(AdapterKind::Clover);
            clover_targets(plan)?
        }
        TrainSet::Regex(re) => {
            let r = regex::Regex::new(re)
                .map_err(|e| Error::Invalid(format!("`train` pattern `{re}`: bad regex: {e}")))?;
            let v: Vec<String> = all.filter(|n| r.is_match(n)).cloned().collect();
            if v.is_empty() {
                let examples: Vec<&String> = plan.tensors.keys().take(4).collect();
                return Err(Error::Invalid(format!(
                    "`train` pattern `{re}` matches no tensor of {} (names look like {examples:?})",
                    plan.origin
                )));
            }
            v
        }
    };
    let mut names = names;
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Invalid(format!("`train` {set} selects no tensor")));
    }
    Ok(Selection {
        names,
        rows,
        adapter,
    })
}
