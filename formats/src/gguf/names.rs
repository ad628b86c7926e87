//! llama.cpp → Hugging Face tensor names for the Llama family (incl. Mixtral experts) and the inverse of
//! llama.cpp's RoPE row permutation of `q_proj` / `k_proj`.
//!
//! Shapes: GGUF dims list ne0 (innermost) first, so the HF shape is the GGUF dims reversed
//! ([`super::GgufTensorInfo::hf_shape`]); the dequantised data is already row-major over that shape.

use super::{GgufError, LlamaHyper};

/// Which RoPE permutation llama.cpp's converter applied to a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePermutation {
    /// `q_proj`: permuted with `n_head = num_attention_heads`.
    Query,
    /// `k_proj`: permuted with `n_head = num_key_value_heads`.
    Key,
}

/// The HF counterpart of a llama.cpp tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensorName {
    /// HF name. For stacked expert tensors (`blk.N.ffn_{gate,up,down}_exps.weight`, 3-D with the expert index
    /// outermost) it contains the placeholder `{E}`; use [`HfTensorName::expert`].
    pub name: String,
    /// Set for `q_proj` / `k_proj` weights and biases, whose rows must be un-permuted with
    /// [`unpermute_rope_rows`].
    pub rope: Option<RopePermutation>,
    /// Whether this is a stacked expert tensor to split along its outermost HF dimension.
    pub stacked_experts: bool,
}

impl HfTensorName {
    /// The number of heads to pass to [`unpermute_rope_rows`], or `None` if no un-permutation is needed.
    pub fn rope_heads(&self, hyper: &LlamaHyper) -> Option<usize> {
        if !hyper.rope_permuted() {
            return None;
        }
        match self.rope? {
            RopePermutation::Query => Some(hyper.head_count),
            RopePermutation::Key => Some(hyper.head_count_kv),
        }
    }

    /// The name of expert `e` of a stacked expert tensor (the name itself for other tensors).
    pub fn expert(&self, e: usize) -> String {
        self.name.replace("{E}", &e.to_string())
    }
}

fn unknown(name: &str, reason: &str) -> GgufError {
    GgufError::UnknownTensorName {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

/// Maps a llama.cpp tensor name (Llama/Mistral/Mixtral) to its HF name. Unknown names are an error; so is
/// `rope_freqs.weight` (Llama 3 RoPE scaling factors, which belong in config.json, not in the weights).
pub fn hf_tensor_name(name: &str) -> Result<HfTensorName, GgufError> {
    let plain = |n: &str| HfTensorName {
        name: n.to_string(),
        rope: None,
        stacked_experts: false,
    };
    match name {
        "token_embd.weight" => return Ok(plain("model.embed_tokens.weight")),
        "output_norm.weight" => return Ok(plain("model.norm.weight")),
        "output.weight" => return Ok(plain("lm_head.weight")),
        "rope_factors_long.weight" | "rope_factors_short.weight" => {
            return Err(unknown(name, "Phi-3 LongRoPE factors are not supported"))
        }
        "rope_freqs.weight" => return Err(unknown(
            name,
            "RoPE frequency factors have no HF tensor (they come from rope_scaling in config.json)",
        )),
        _ => {}
    }
    let rest = name
        .strip_prefix("blk.")
        .ok_or_else(|| unknown(name, "not a Llama-family tensor"))?;
    let (layer, rest) = rest
        .split_once('.')
        .ok_or_else(|| unknown(name, "missing block index"))?;
    let layer: usize = layer
        .parse()
        .map_err(|_| unknown(name, "block index is not a number"))?;
    let (stem, suffix) = rest
        .rsplit_once('.')
        .ok_or_else(|| unknown(name, "missing .weight/.bias suffix"))?;
    if suffix != "weight" && suffix != "bias" {
        return Err(unknown(name, "suffix is neither .weight nor .bias"));
    }
    let p = format!("model.layers.{layer}");
    // Per-expert tensors: blk.N.ffn_{gate,down,up}.E.weight
    if let Some((base, e)) = stem.rsplit_once('.') {
        let e: usize = e
            .parse()
            .map_err(|_| unknown(name, "unexpected dotted tensor name"))?;
        let w = match base {
            "ffn_gate" => "w1",
            "ffn_down" => "w2",
            "ffn_up" => "w3",
            _ => return Err(unknown(name, "unknown per-expert tensor")),
        };
        return Ok(plain(&format!(
            "{p}.block_sparse_moe.experts.{e}.{w}.{suffix}"
        )));
    }
    let (hf, rope, stacked) = match stem {
        "attn_q" => ("self_attn.q_proj", Some(RopePermutation::Query), false),
        "attn_k" => ("self_attn.k_proj", Some(RopePermutation::Key), false),
        "attn_v" => ("self_attn.v_proj", None, false),
        "attn_output" => ("self_attn.o_proj", None, false),
        "attn_q_norm" => ("self_attn.q_norm", None, false),
        "attn_k_norm" => ("self_attn.k_norm", None, false),
        "attn_norm" => ("input_layernorm", None, false),
        "ffn_norm" | "post_attention_norm" => ("post_attention_layernorm", None, false),
        "post_ffw_norm" => ("post_feedforward_layernorm", None, false),
        "ffn_gate" => ("mlp.gate_proj", None, false),
        "ffn_up" => ("mlp.up_proj", None, false),
        "ffn_down" => ("mlp.down_proj", None, false),
        "ffn_gate_inp" => ("block_sparse_moe.gate", None, false),
        "ffn_gate_exps" => ("block_sparse_moe.experts.{E}.w1", None, true),
        "ffn_down_exps" => ("block_sparse_moe.experts.{E}.w2", None, true),
        "ffn_up_exps" => ("block_sparse_moe.experts.{E}.w3", None, true),
        _ => return Err(unknown(name, "unknown tensor in a Llama block")),
    };
    Ok(HfTensorName {
        name: format!("{p}.{hf}.{suffix}"),
        rope,
        stacked_experts: stacked,
    })
}

/// [`hf_tensor_name`] for a file of llama.cpp architecture `arch`: Gemma's sandwich norms are
/// `post_attention_norm`, `ffn_norm` (HF `pre_feedforward_layernorm`) and `post_ffw_norm`; Phi-3's
/// fused `attn_qkv` and `ffn_up` (gate and up rows) are HF's `qkv_proj` and `gate_up_proj`.
pub fn hf_tensor_name_in(arch: &str, name: &str) -> Result<HfTensorName, GgufError> {
    if let Some(hf) = Some(arch)
        .filter(|&a| a == "phi3")
        .and_then(|_| phi3_fused(name))
    {
        return Ok(hf);
    }
    let mut hf = hf_tensor_name(name)?;
    if !arch.starts_with("gemma") {
        return Ok(hf);
    }
    let stem = name.rsplit('.').nth(1).unwrap_or_default();
    let to = match stem {
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        _ => return Ok(hf),
    };
    let layer = hf.name.rsplitn(3, '.').nth(2).unwrap_or_default();
    hf.name = format!("{layer}.{to}.weight");
    Ok(hf)
}

fn phi3_fused(name: &str) -> Option<HfTensorName> {
    let (layer, stem) = name.strip_prefix("blk.")?.split_once('.')?;
    let hf = match stem {
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "ffn_up.weight" => "mlp.gate_up_proj.weight",
        _ => return None,
    };
    Some(HfTensorName {
        name: format!("model.layers.{}.{hf}", layer.parse::<usize>().ok()?),
        rope: None,
        stacked_experts: false,
    })
}

fn check_rope_shape(
    len: usize,
    n_rows: usize,
    n_cols: usize,
    n_head: usize,
) -> Result<usize, GgufError> {
    if n_rows.checked_mul(n_cols) != Some(len) {
        return Err(GgufError::BadRopeShape(format!(
            "{len} values do not form a {n_rows} x {n_cols} matrix"
        )));
    }
    if n_head == 0 || !n_rows.is_multiple_of(2 * n_head) {
        return Err(GgufError::BadRopeShape(format!(
            "{n_rows} rows are not divisible into {n_head} heads of an even number of rows"
        )));
    }
    Ok(n_rows / n_head / 2)
}

/// The HF row order of a llama.cpp-permuted q/k matrix: `order[hf_row] = gguf_row`.
/// llama.cpp applied `w.reshape(n_head, 2, half, cols).swapaxes(1, 2)` to HF rows.
pub fn rope_row_order(n_rows: usize, n_head: usize) -> Vec<usize> {
    let rows_per_head = n_rows / n_head.max(1);
    let half = rows_per_head / 2;
    let mut order = vec![0; n_rows];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                order[h * rows_per_head + i * half + j] = h * rows_per_head + j * 2 + i;
            }
        }
    }
    order
}

/// Undoes llama.cpp's RoPE permutation of `q_proj` (`n_head = num_attention_heads`) or `k_proj`
/// (`n_head = num_key_value_heads`) rows, in place. `data` is row-major `n_rows x n_cols` (for a bias,
/// `n_cols = 1`).
pub fn unpermute_rope_rows(
    data: &mut [f32],
    n_rows: usize,
    n_cols: usize,
    n_head: usize,
) -> Result<(), GgufError> {
    check_rope_shape(data.len(), n_rows, n_cols, n_head)?;
    let src = data.to_vec();
    for (hf_row, gguf_row) in rope_row_order(n_rows, n_head).into_iter().enumerate() {
        data[hf_row * n_cols..(hf_row + 1) * n_cols]
            .copy_from_slice(&src[gguf_row * n_cols..(gguf_row + 1) * n_cols]);
    }
    Ok(())
}

/// llama.cpp's permutation (HF → GGUF row order), the inverse of [`unpermute_rope_rows`]; used by writers
/// and tests.
pub fn permute_rope_rows(
    data: &mut [f32],
    n_rows: usize,
    n_cols: usize,
    n_head: usize,
) -> Result<(), GgufError> {
    check_rope_shape(data.len(), n_rows, n_cols, n_head)?;
    let src = data.to_vec();
    for (hf_row, gguf_row) in rope_row_order(n_rows, n_head).into_iter().enumerate() {
        data[gguf_row * n_cols..(gguf_row + 1) * n_cols]
            .copy_from_slice(&src[hf_row * n_cols..(hf_row + 1) * n_cols]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
            (
                "blk.12.attn_v.weight",
                "model.layers.12.self_attn.v_proj.weight",
            ),
            (
                "blk.1.attn_output.weight",
                "model.layers.1.self_attn.o_proj.weight",
            ),
            (
                "blk.1.attn_norm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "blk.2.ffn_gate.weight",
                "model.layers.2.mlp.gate_proj.weight",
            ),
            ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight"),
            (
                "blk.2.ffn_down.weight",
                "model.layers.2.mlp.down_proj.weight",
            ),
            (
                "blk.4.ffn_gate_inp.weight",
                "model.layers.4.block_sparse_moe.gate.weight",
            ),
            (
                "blk.4.ffn_gate.7.weight",
                "model.layers.4.block_sparse_moe.experts.7.w1.weight",
            ),
            (
                "blk.4.ffn_down.0.weight",
                "model.layers.4.block_sparse_moe.experts.0.w2.weight",
            ),
            (
                "blk.4.ffn_up.3.weight",
                "model.layers.4.block_sparse_moe.experts.3.w3.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).unwrap().name, h, "{g}");
        }
        let q = hf_tensor_name("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.rope, Some(RopePermutation::Query));
        assert_eq!(
            hf_tensor_name("blk.0.attn_k.weight").unwrap().rope,
            Some(RopePermutation::Key)
        );
        for (g, h) in [
            ("blk.1.attn_norm.weight", "input_layernorm"),
            (
                "blk.1.post_attention_norm.weight",
                "post_attention_layernorm",
            ),
            ("blk.1.ffn_norm.weight", "pre_feedforward_layernorm"),
            ("blk.1.post_ffw_norm.weight", "post_feedforward_layernorm"),
        ] {
            let name = hf_tensor_name_in("gemma2", g).unwrap().name;
            assert_eq!(name, format!("model.layers.1.{h}.weight"), "{g}");
        }
        for (g, h) in [
            ("blk.1.attn_qkv.weight", "self_attn.qkv_proj"),
            ("blk.1.ffn_up.weight", "mlp.gate_up_proj"),
            ("blk.1.ffn_norm.weight", "post_attention_layernorm"),
        ] {
            let name = hf_tensor_name_in("phi3", g).unwrap().name;
            assert_eq!(name, format!("model.layers.1.{h}.weight"), "{g}");
        }
        assert_eq!(
            hf_tensor_name_in("llama", "blk.1.ffn_up.weight")
                .unwrap()
                .name,
            "model.layers.1.mlp.up_proj.weight"
        );
        let s = hf_tensor_name("blk.5.ffn_up_exps.weight").unwrap();
        assert!(s.stacked_experts);
        assert_eq!(
            s.expert(2),
            "model.layers.5.block_sparse_moe.experts.2.w3.weight"
        );
        for bad in [
            "blk.x.attn_q.weight",
            "foo.weight",
            "blk.0.attn_qq.weight",
            "blk.0.attn_q.scale",
            "rope_freqs.weight",
        ] {
            let e = hf_tensor_name(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    /// Matches numpy: `w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)` is llama.cpp's
    /// permutation; for 2 heads of 4 rows the GGUF row order is [0, 2, 1, 3, 4, 6, 5, 7].
    #[test]
    fn rope_permutation_matches_numpy_and_round_trips() {
        let rows = 8;
        let cols = 3;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut g = hf.clone();
        permute_rope_rows(&mut g, rows, cols, 2).unwrap();
        let order: Vec<usize> = (0..rows).map(|r| g[r * cols] as usize / cols).collect();
        assert_eq!(order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        // 1 head of 8 rows: half = 4, GGUF row 2j+i = HF row 4i+j.
        let mut g1 = hf.clone();
        permute_rope_rows(&mut g1, rows, cols, 1).unwrap();
        let order: Vec<usize> = (0..rows).map(|r| g1[r * cols] as usize / cols).collect();
        assert_eq!(order, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        unpermute_rope_rows(&mut g1, rows, cols, 1).unwrap();
        assert_eq!(g1, hf);
        unpermute_rope_rows(&mut g, rows, cols, 2).unwrap();
        assert_eq!(g, hf);
        assert!(unpermute_rope_rows(&mut g, rows, cols, 3).is_err());
        assert!(unpermute_rope_rows(&mut g, rows, cols + 1, 2).is_err());
    }
}
