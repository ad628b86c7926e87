//! Calibration statistics for MoE construction (`surgeon moe`), computed with the runtime:
//!
//! - [`capture_layers`] (a [`crate::probe`] collector, re-exported): per decoder layer, the MLP input
//!   (output of `post_attention_layernorm`, what a router sees) and the SwiGLU neuron activations
//!   `silu(gate x) * up x` of calibration tokens. The split methods `split-coactivation` /
//!   `split-importance` turn these into partitions
//!   (`surgeon_surgery::moe::{coactivation_features, importance_scores}`).
//! - [`router_rows_hidden`]: router rows from prompts per expert (mergekit-moe `hidden`).
//! - [`router_rows_embed`]: the same from token embeddings only, without a forward pass
//!   (mergekit-moe `cheap_embed`).
use crate::error::{Error, Result};
use crate::model::Llama;
use burn::tensor::backend::Backend;
use surgeon_formats::Plan;

pub use crate::probe::{capture_layers, LayerCapture};

/// Mean of L2-normalised vectors, normalised again (zero vectors are skipped).
fn mean_direction(vectors: &[Vec<f32>], h: usize) -> Vec<f32> {
    let mut acc = vec![0f64; h];
    for v in vectors {
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if n > 0.0 {
            for (a, x) in acc.iter_mut().zip(v) {
                *a += *x as f64 / n;
            }
        }
    }
    let n = acc.iter().map(|x| x * x).sum::<f64>().sqrt();
    acc.iter()
        .map(|x| if n > 0.0 { (x / n) as f32 } else { 0.0 })
        .collect()
}

fn mean_rows(v: &[f32], rows: usize, h: usize) -> Vec<f32> {
    let mut acc = vec![0f64; h];
    for r in 0..rows {
        for (a, x) in acc.iter_mut().zip(&v[r * h..(r + 1) * h]) {
            *a += *x as f64;
        }
    }
    acc.iter()
        .map(|a| (a / rows.max(1) as f64) as f32)
        .collect()
}

/// Router rows from prompts (mergekit-moe `hidden`): for every layer, row e is the normalised mean,
/// over expert e's prompts, of the normalised mean (over the prompt's tokens) of the layer's MLP input
/// (what the router multiplies). Returns one `[E, h]` row-major vector per layer.
pub fn router_rows_hidden<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<Vec<u32>>],
) -> Result<Vec<Vec<f32>>> {
    let h = model.embed_tokens.val().dims()[1];
    let n_layers = model.layers.len();
    // per_layer[l][e] = list of per-prompt mean vectors
    let mut per_layer: Vec<Vec<Vec<Vec<f32>>>> = vec![vec![vec![]; prompts.len()]; n_layers];
    for (e, ps) in prompts.iter().enumerate() {
        for p in ps {
            if p.is_empty() {
                continue;
            }
            let caps = capture_layers(model, &[p.as_slice()], false)?;
            for (l, c) in caps.iter().enumerate() {
                per_layer[l][e].push(mean_rows(&c.mlp_input, c.tokens, h));
            }
        }
    }
    Ok(per_layer
        .into_iter()
        .map(|experts| {
            experts
                .iter()
                .flat_map(|vs| mean_direction(vs, h))
                .collect()
        })
        .collect())
}

/// Router rows from token embeddings only (mergekit-moe `cheap_embed`): row e is the normalised mean
/// over expert e's prompts of the normalised mean embedding of the prompt's tokens. One `[E, h]`
/// vector, used by every layer. Reads only `model.embed_tokens.weight` (no forward pass).
pub fn router_rows_embed(plan: &Plan, prompts: &[Vec<Vec<u32>>]) -> Result<Vec<f32>> {
    let (shape, emb) = plan.load_f32("model.embed_tokens.weight")?;
    let (v, h) = (shape[0], shape[1]);
    let mut rows = Vec::with_capacity(prompts.len() * h);
    for ps in prompts {
        let mut vecs = vec![];
        for p in ps {
            if p.is_empty() {
                continue;
            }
            let mut acc = vec![0f64; h];
            for &t in p {
                let t = t as usize;
                if t >= v {
                    return Err(Error::Invalid(format!(
                        "token id {t} is outside the model's vocabulary of {v}"
                    )));
                }
                for (a, x) in acc.iter_mut().zip(&emb[t * h..(t + 1) * h]) {
                    *a += *x as f64;
                }
            }
            vecs.push(
                acc.iter()
                    .map(|a| (a / p.len() as f64) as f32)
                    .collect::<Vec<_>>(),
            );
        }
        rows.extend(mean_direction(&vecs, h));
    }
    Ok(rows)
}

/// Parses a prompts file into one list of prompts per expert. Two layouts:
/// - blocks separated by blank lines, block e = expert e's prompts (one per line);
/// - without blank lines, exactly `num_experts` lines: one prompt per expert.
///
/// Lines starting with `#` are comments.
pub fn parse_prompts(
    text: &str,
    num_experts: usize,
) -> std::result::Result<Vec<Vec<String>>, String> {
    let mut blocks: Vec<Vec<String>> = vec![vec![]];
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('#') {
            continue;
        }
        if l.is_empty() {
            if !blocks.last().unwrap().is_empty() {
                blocks.push(vec![]);
            }
        } else {
            blocks.last_mut().unwrap().push(l.to_string());
        }
    }
    if blocks.last().is_some_and(|b| b.is_empty()) {
        blocks.pop();
    }
    if blocks.len() == 1 && blocks[0].len() == num_experts {
        return Ok(blocks[0].iter().map(|p| vec![p.clone()]).collect());
    }
    if blocks.len() != num_experts {
        return Err(format!(
            "the prompts file has {} block(s) of prompts, expected one per expert ({num_experts}): \
             separate experts' prompts by blank lines, or give exactly {num_experts} lines",
            blocks.len()
        ));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_layouts() {
        assert_eq!(
            parse_prompts("a\nb\n", 2).unwrap(),
            vec![vec!["a".to_string()], vec!["b".to_string()]]
        );
        assert_eq!(
            parse_prompts("# c\na\na2\n\n\nb\n\n", 2).unwrap(),
            vec![vec!["a".to_string(), "a2".into()], vec!["b".to_string()]]
        );
        let e = parse_prompts("a\nb\nc\n", 2).unwrap_err();
        assert!(e.contains("expected one per expert (2)"), "{e}");
    }
}
