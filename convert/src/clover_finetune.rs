//! The factorisation behind CLOVER's singular-value fine-tuning (fxmeng/CLOVER,
//! `clover_for_full_rank_finetuning`): each adapted linear layer as `W = blockdiag(L_h T_h^T) B`
//! with an orthonormal-row basis `B` (same shape as `W`, frozen), a trainable `b x b` core `T_h`
//! per block of `b` output rows and, for values, a frozen left factor `L_h`:
//!
//! - `q_proj`, per query head (`b = head_dim`): `W_h^T = Q R` (QR), `B_h = Q^T`, `T_h = R`. The
//!   core acts before RoPE, so the keys and the rotary embedding are untouched.
//! - `v_proj`, per key/value head (`b = v_head_dim`): the SVD of the group's value-output product
//!   `O V = U S V'^T` (the decomposition of [`crate::clover`], o_proj blocks of every query head of
//!   the group stacked, weights only), `B_h = V'^T`, `T_h = S` (diagonal). The reference rewrites
//!   `o_proj` to `U`; here `o_proj` stays as it is and `L_h = O^+ U = R_o^-1 U_m` carries the
//!   basis change into the values, the same function of `T_h` (so the same training), but
//!   merging an untrained core gives back the original weights.
//! - `up_proj`, per block of `head_dim / 2` rows (the reference's split): QR as for queries.
//!
//! Merging (`W' = blockdiag(L_h T_h^T) B`) happens in the runtime when the healed model is saved;
//! biases are left as they are (the cores act before them).
use crate::clover::{direction_scale, head_svd, output_block, value_block};
use crate::{Error, Result};
use nalgebra::DMatrix;
use rayon::prelude::*;
use surgeon_formats::{AttentionKind, Mlp, Plan};

/// One linear layer's factors (plain data, row-major f32).
#[derive(Clone, PartialEq)]
pub struct BlockFactors {
    /// HF module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Rows per block (`b`).
    pub block: usize,
    /// `B`, `[out, in]`.
    pub basis: Vec<f32>,
    /// `T_h`, `[out / b, b, b]`.
    pub core: Vec<f32>,
    /// `L_h`, `[out / b, b, b]` (values only).
    pub left: Option<Vec<f32>>,
}

impl std::fmt::Debug for BlockFactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockFactors({}, block {})", self.module, self.block)
    }
}

fn flat(m: &DMatrix<f64>) -> Vec<f32> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().map(|&x| x as f32));
    }
    v
}

/// QR per block of `b` rows of `w` (`[out, in]`): basis `Q^T` and core `R` per block.
fn qr_blocks(module: String, w: &[f32], out: usize, inp: usize, b: usize) -> Result<BlockFactors> {
    if b == 0 || !out.is_multiple_of(b) || b > inp {
        return Err(Error::Invalid(format!(
            "`{module}`: {out} rows do not split into blocks of {b} (of at most {inp})"
        )));
    }
    let (mut basis, mut core) = (Vec::with_capacity(out * inp), vec![]);
    for blk in 0..out / b {
        let wt = DMatrix::from_fn(inp, b, |i, j| w[(blk * b + j) * inp + i] as f64);
        let qr = wt.qr();
        basis.extend(flat(&qr.q().transpose()));
        core.extend(flat(&qr.r()));
    }
    Ok(BlockFactors {
        module,
        block: b,
        basis,
        core,
        left: None,
    })
}

/// `v_proj` of layer `l` through the value-output SVD per key/value head.
fn value_factors(plan: &Plan, l: usize) -> Result<BlockFactors> {
    let a = &plan.arch.layers[l].attention;
    let (h, d) = (plan.arch.hidden_size, a.v_head_dim);
    let p = format!("model.layers.{l}.self_attn");
    let (_, wv) = plan.load_f32(&format!("{p}.v_proj.weight"))?;
    let (_, wo) = plan.load_f32(&format!("{p}.o_proj.weight"))?;
    let per = a.num_heads / a.num_kv_heads;
    let (mut basis, mut core, mut left) = (vec![], vec![], vec![]);
    for g in 0..a.num_kv_heads {
        let values = value_block(&wv, None, g, d, h);
        let outputs = output_block(&wo, g * per..(g + 1) * per, a.o_dim(), d, h);
        let svd = head_svd(&values, &outputs, None)?;
        let k: Vec<f64> = (0..d)
            .map(|j| direction_scale(&svd.sigma, j, false))
            .collect();
        let mut rows = svd.u_m.transpose() * &svd.r_o * &values;
        for (j, kj) in k.iter().enumerate() {
            rows.row_mut(j).scale_mut(1.0 / kj);
        }
        let l_h = svd.r_o.solve_upper_triangular(&svd.u_m).ok_or_else(|| {
            Error::Invalid(format!(
                "{p}: the o_proj columns of key/value head {g} are linearly dependent"
            ))
        })?;
        basis.extend(flat(&rows));
        core.extend(flat(&DMatrix::from_diagonal(&k.into())));
        left.extend(flat(&l_h));
    }
    Ok(BlockFactors {
        module: format!("{p}.v_proj"),
        block: d,
        basis,
        core,
        left: Some(left),
    })
}

/// Layer `l`'s factors: `q_proj` and `v_proj` of a softmax attention, `up_proj` of a dense MLP.
fn layer_factors(plan: &Plan, l: usize) -> Result<Vec<BlockFactors>> {
    let layer = &plan.arch.layers[l];
    let (a, h) = (&layer.attention, plan.arch.hidden_size);
    let mut out = vec![];
    if a.kind == AttentionKind::Softmax {
        let q = format!("model.layers.{l}.self_attn.q_proj");
        let (_, w) = plan.load_f32(&format!("{q}.weight"))?;
        out.push(qr_blocks(q, &w, a.num_heads * a.head_dim, h, a.head_dim)?);
        out.push(value_factors(plan, l)?);
    }
    match &layer.mlp {
        Mlp::Dense { intermediate_size } => {
            let up = format!("model.layers.{l}.mlp.up_proj");
            let (_, w) = plan.load_f32(&format!("{up}.weight"))?;
            let b = (a.head_dim / 2).max(1);
            out.push(qr_blocks(up, &w, *intermediate_size, h, b)?);
        }
        Mlp::Moe { .. } => {
            return Err(Error::Invalid(format!(
                "layer {l} is a MoE layer: CLOVER fine-tuning supports softmax attention and \
                 dense MLPs"
            )))
        }
        Mlp::NoOp => {}
    }
    Ok(out)
}

/// CLOVER fine-tuning's factors of every adapted linear layer of `plan` (layers in parallel).
pub fn finetune_factors(plan: &Plan) -> Result<Vec<BlockFactors>> {
    let per_layer: Vec<Result<Vec<BlockFactors>>> = (0..plan.arch.num_layers())
        .into_par_iter()
        .map(|l| layer_factors(plan, l))
        .collect();
    let mut all = vec![];
    for f in per_layer {
        all.extend(f?);
    }
    Ok(all)
}
