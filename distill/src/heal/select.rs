//! Which tensors train.
use super::{Error, Result};
use surgeon_formats::arch::split_layer_name;
use surgeon_formats::Plan;

/// The `--train` choice.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
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
    /// HF tensor names matching a regular expression.
    Regex(String),
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
}

impl Selection {
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

/// Resolves `set` against the plan's tensors.
pub fn resolve(plan: &Plan, set: &TrainSet) -> Result<Selection> {
    let all = plan.tensors.keys();
    let mut rows = None;
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
    if names.is_empty() {
        return Err(Error::Invalid(format!("`train` {set} selects no tensor")));
    }
    Ok(Selection { names, rows })
}
