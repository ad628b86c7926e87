//! Minitron activation importance (arXiv 2407.14679) as plain data: what `surgeon importance`
//! writes (`scores.json`), what `surgeon prune` and `surgeon search` read. The probe in
//! `surgeon_distill::calibrate::importance` computes it; operators only see these numbers.
//!
//! Every score is Minitron's aggregate: per calibration window, the mean of |activation| over the
//! window's tokens; over windows, the square root of the sum of squares. Larger is more important.
use crate::arch::{Mlp, ModelArch};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `format` field of a scores file.
pub const IMPORTANCE_FORMAT: &str = "surgeon-importance/1";

/// Importance of one decoder layer's neurons and heads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerImportance {
    /// One per MLP neuron (input feature of `down_proj`); empty for a skipped or MoE MLP.
    pub mlp: Vec<f64>,
    /// One per query head: the L2 norm of the head's channel scores at the input of `o_proj`;
    /// empty for skipped attention. Heads are ranked within their KV group.
    pub heads: Vec<f64>,
    /// KV heads of the layer (query head `j` belongs to group `j / (heads / num_kv_heads)`).
    pub num_kv_heads: usize,
}

impl LayerImportance {
    /// Score of each KV group: the sum of its query heads' scores.
    pub fn group_scores(&self) -> Vec<f64> {
        if self.num_kv_heads == 0 || self.heads.is_empty() {
            return vec![];
        }
        let r = self.heads.len() / self.num_kv_heads;
        self.heads.chunks(r).map(|c| c.iter().sum()).collect()
    }
}

/// Activation importance of every width a pruning can cut, and block influence per layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportanceScores {
    /// [`IMPORTANCE_FORMAT`].
    pub format: String,
    /// The model the scores were measured on (its origin).
    pub model: String,
    /// Calibration tokens seen.
    pub tokens: usize,
    /// Calibration windows (Minitron's samples).
    pub samples: usize,
    /// One per hidden channel: the sum over every RMSNorm output (both norms of every layer) of
    /// the channel's score.
    pub hidden: Vec<f64>,
    /// Per layer, ShortGPT's block influence `1 - cos(hidden in, hidden out)` (as `drop-layers`).
    pub block_influence: Vec<f64>,
    pub layers: Vec<LayerImportance>,
}

impl ImportanceScores {
    /// Reads a scores file; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: ImportanceScores =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        if s.format != IMPORTANCE_FORMAT {
            return Err(Error::config(
                path,
                "format",
                format!("`{}` is not {IMPORTANCE_FORMAT}", s.format),
            ));
        }
        Ok(s)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }

    /// Checks that the scores describe `arch` (same layers, widths and heads); the message names
    /// the first field that disagrees.
    pub fn check(&self, arch: &ModelArch) -> Result<()> {
        let bad = |field: String, m: String| Err(Error::invalid(format!("scores: `{field}` {m}")));
        if self.hidden.len() != arch.hidden_size {
            return bad(
                "hidden".into(),
                format!(
                    "has {} channels, the model {}",
                    self.hidden.len(),
                    arch.hidden_size
                ),
            );
        }
        let n = arch.num_layers();
        if self.layers.len() != n || self.block_influence.len() != n {
            return bad(
                "layers".into(),
                format!("lists {} layers, the model has {n}", self.layers.len()),
            );
        }
        for (i, (s, l)) in self.layers.iter().zip(&arch.layers).enumerate() {
            let width = match l.mlp {
                Mlp::Dense { intermediate_size } => intermediate_size,
                _ => 0,
            };
            if s.mlp.len() != width {
                return bad(
                    format!("layers[{i}].mlp"),
                    format!("has {} neurons, the layer {width}", s.mlp.len()),
                );
            }
            let heads = if l.attention.is_no_op() {
                0
            } else {
                l.attention.num_heads
            };
            if s.heads.len() != heads || (heads > 0 && s.num_kv_heads != l.attention.num_kv_heads) {
                return bad(
                    format!("layers[{i}].heads"),
                    format!(
                        "has {} heads in {} groups, the layer {heads} in {}",
                        s.heads.len(),
                        s.num_kv_heads,
                        l.attention.num_kv_heads
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The indices of the `k` largest `scores`, ascending (ties to the lower index). NaN scores
/// count as the least important.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let key = |x: f64| if x.is_nan() { f64::NEG_INFINITY } else { x };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| key(scores[b]).total_cmp(&key(scores[a])).then(a.cmp(&b)));
    let mut out = order[..k.min(scores.len())].to_vec();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.7], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[f64::NAN, 0.0], 1), vec![1]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![0, 1]);
    }

    #[test]
    fn group_scores_sum_heads() {
        let l = LayerImportance {
            mlp: vec![],
            heads: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            num_kv_heads: 2,
        };
        assert_eq!(l.group_scores(), vec![6.0, 15.0]);
    }
}
