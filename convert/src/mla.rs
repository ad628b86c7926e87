//! Softmax attention (MHA/GQA, rotate-half RoPE) to DeepSeek-V3 multi-head latent attention, the
//! TransMLA / MHA2MLA way (arXiv 2502.07864, 2502.14837), in the layout transformers'
//! `DeepseekV3ForCausalLM` loads (every layer dense).
//!
//! Per layer, with `H` query heads, `G` key/value heads of size `d`:
//! - Partial RoPE: `r / 2` of the `d / 2` frequency pairs `(j, j + d/2)` stay rotary. DeepSeek-V3
//!   rotates its `r` features with frequencies `theta'^(-2i/r) / factor`, a geometric sequence, so
//!   the kept pairs are an arithmetic progression `j = o + s i`: then `theta' = theta^(s r / d)`
//!   and `factor = theta^(2 o / d)` (linear rope scaling) reproduce the original frequencies.
//!   `high` keeps `o = 0, s = 1`, `low` the last pairs, `uniform` `s = floor(d / r)`, and `2norm`
//!   the progression of largest summed score `sqrt(E|q_j|^2) sqrt(E|k_j|^2)` (MHA2MLA's 2-norm,
//!   root-mean-square pair norms from the calibration second moments, summed over heads and
//!   layers: one progression for the whole model, as rope parameters are global). The other pairs
//!   lose RoPE (approximation; healing recovers it).
//! - One rotary key shared by all heads: per kept pair, the `G` key heads mixed by the leading
//!   eigenvector of their calibration second moment (mixing heads at one frequency commutes with
//!   RoPE); each query scales its pair by its key head's weight. Exact when `G = 1`.
//! - Joint latent: PCA of the calibration activations of `[non-rotary keys of every KV head;
//!   values of every KV head]` (`G (2d - r)` features, second moment `W M W^T` from the attention
//!   input's second moment `M`); `kv_a_proj_with_mqa` holds the top `R` components, `kv_b_proj`
//!   gives each query head its group's rows of them. Exact at full rank `R = G (2d - r)`.
//! - The latent RMSNorm (`kv_a_layernorm`, and `q_a_layernorm` with `q_lora_rank`) that
//!   DeepSeek-V3 always applies ([`LatentNorm`]): by default its weight is fitted by least squares
//!   on the calibration tokens' latents.
//! - Rotary features are written in DeepSeek's interleaved pairs ([`interleave_rows`], exact).
//! - Query and key heads keep size `d` (`qk_nope_head_dim + qk_rope_head_dim = d`), so the
//!   softmax scale `d^-0.5` is unchanged; values keep `d`; `o_proj` is unchanged.
use crate::error::{Error, Result};
use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;
use serde_json::json;
use surgeon_formats::plan::{HostTensor, Source, TensorEntry};
use surgeon_formats::{Attention, AttentionKind, Family, Mlp, Plan};

/// `eps` of DeepSeek-V3's latent norms (transformers builds them with the default).
const LATENT_EPS: f64 = 1e-6;

/// Which frequency pairs keep RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeSelect {
    /// The evenly spaced pairs of largest 2-norm score on calibration text.
    TwoNorm,
    /// The highest frequencies (first pairs).
    High,
    /// The lowest frequencies (last pairs).
    Low,
    /// Evenly spaced from the first pair.
    Uniform,
}

/// How the always-applied latent RMSNorm is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatentNorm {
    /// Per-feature weight fitted by least squares on the calibration tokens so that the norm's
    /// output is as close as possible to its input (approximate: each token is still rescaled by
    /// its own 1/rms; well scaled for healing).
    Fit,
    /// The latent rows scaled by `a` so that `mean(c^2)` is about 1e-6 of `eps` on calibration
    /// text and the weight `sqrt(eps) / a`: the norm is then linear (relative deviation about
    /// 5e-7 times a token's latent energy over the mean). Exact up to that, but the tiny weights do
    /// not suit healing with a learning rate scaled for ordinary weights.
    Linear,
}

/// What `--to mla` does.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaOptions {
    /// `kv_lora_rank`: features of the latent.
    pub kv_rank: usize,
    /// `qk_rope_head_dim`: rotary features per head (even).
    pub rope_dim: usize,
    /// `q_lora_rank`: queries through a bottleneck of this size (None: one `q_proj`).
    pub q_rank: Option<usize>,
    pub rope_select: RopeSelect,
    pub latent_norm: LatentNorm,
}

/// The kept frequency pairs `o + s i`, `i < r / 2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progression {
    pub offset: usize,
    pub stride: usize,
}

impl Progression {
    /// The kept pair indices.
    pub fn pairs(self, count: usize) -> Vec<usize> {
        (0..count).map(|i| self.offset + self.stride * i).collect()
    }
}

/// Refuses what the conversion cannot do, before any calibration work.
pub fn check_options(plan: &Plan, opts: &MlaOptions) -> Result<()> {
    let arch = &plan.arch;
    let a = arch
        .uniform_attention()
        .ok_or_else(|| Error::Invalid("DeepSeek-V3 needs every layer's attention alike".into()))?;
    for (l, layer) in arch.layers.iter().enumerate() {
        let why = match (&layer.attention.kind, &layer.mlp) {
            (AttentionKind::Softmax, Mlp::Dense { .. }) => continue,
            (AttentionKind::Softmax, _) => "only dense MLPs convert to DeepSeek-V3 (dense layers)",
            _ => "only softmax attention converts to latent attention",
        };
        return Err(Error::Unsupported {
            layer: l,
            message: why.into(),
        });
    }
    if a.qkv_bias || a.qk_norm {
        return Err(Error::Invalid(format!(
            "a {} model has q/k/v biases or query/key norms, which DeepSeek-V3 attention cannot hold",
            arch.family.model_type()
        )));
    }
    if arch.sliding_window.is_some() {
        return Err(Error::Invalid(
            "`sliding_window`: DeepSeek-V3 has no sliding window".into(),
        ));
    }
    if arch.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(Error::Invalid(
            "`rope_scaling`: only plain RoPE converts exactly to DeepSeek-V3's rotary part".into(),
        ));
    }
    check_sizes(a, opts, arch.hidden_size)
}

fn check_sizes(a: &Attention, opts: &MlaOptions, hidden: usize) -> Result<()> {
    let (d, r) = (a.head_dim, opts.rope_dim);
    if r == 0 || r % 2 != 0 || r > d {
        return Err(Error::Invalid(format!(
            "`rope_dim` {r} must be even, positive and at most the head size {d}"
        )));
    }
    let full = full_kv_rank(a, r);
    if opts.kv_rank == 0 || opts.kv_rank > full {
        return Err(Error::Invalid(format!(
            "`kv_rank` {} must be between 1 and {full} (the non-rotary keys and values of {} \
             key/value heads of {d}: {} x (2 x {d} - {r}))",
            opts.kv_rank, a.num_kv_heads, a.num_kv_heads
        )));
    }
    let q_full = hidden.min(a.num_heads * d);
    if let Some(q) = opts.q_rank.filter(|&q| q == 0 || q > q_full) {
        return Err(Error::Invalid(format!(
            "`q_rank` {q} must be between 1 and {q_full} (min of hidden size and query features)"
        )));
    }
    Ok(())
}

/// The latent size that makes the conversion exact: `G (2d - r)`.
pub fn full_kv_rank(a: &Attention, rope_dim: usize) -> usize {
    a.num_kv_heads * (2 * a.head_dim - rope_dim)
}

/// The plan converted to DeepSeek-V3 latent attention; `inputs` are each layer's attention inputs
/// on calibration text, token by token (`[tokens, hidden]` row-major, as `surgeon_distill`'s probe
/// collects them).
pub fn to_mla(plan: &Plan, opts: &MlaOptions, inputs: &[Vec<f32>]) -> Result<Plan> {
    check_options(plan, opts)?;
    let arch = &plan.arch;
    let h = arch.hidden_size;
    let bad = |x: &Vec<f32>| x.is_empty() || !x.len().is_multiple_of(h);
    if inputs.len() != arch.num_layers() || inputs.iter().any(bad) {
        return Err(Error::Invalid(format!(
            "calibration inputs for {} layers (some empty or not [tokens, {h}]), the model has {}",
            inputs.len(),
            arch.num_layers()
        )));
    }
    let a = arch.layers[0].attention.clone();
    let samples: Vec<DMatrix<f64>> = inputs
        .par_iter()
        .map(|x| DMatrix::from_row_slice(x.len() / h, h, x).map(|v| v as f64))
        .collect();
    let moments: Vec<DMatrix<f64>> = samples
        .par_iter()
        .map(|x| x.tr_mul(x) / x.nrows() as f64)
        .collect();
    let prog = select_pairs(plan, &a, opts, &moments)?;
    let layers = (0..arch.num_layers())
        .into_par_iter()
        .map(|l| {
            let cal = Calib {
                x: &samples[l],
                m: &moments[l],
            };
            convert_layer(plan, l, &a, opts, prog, cal)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = plan.clone();
    for (l, tensors) in layers.into_iter().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        let dtype = plan.get(&format!("{p}.q_proj.weight"))?.dtype;
        for old in ["q_proj", "k_proj", "v_proj"] {
            out.tensors.remove(&format!("{p}.{old}.weight"));
        }
        for (name, shape, values) in tensors {
            let source = Source::inline("mla", HostTensor::from_f32(shape, &values));
            out.tensors
                .insert(format!("{p}.{name}.weight"), TensorEntry { source, dtype });
        }
    }
    rewrite_arch(&mut out, &a, opts, prog);
    out.validate()?;
    Ok(out)
}

/// DeepSeek-V3 family, latent attention in every layer, rope base and scaling of the progression.
fn rewrite_arch(out: &mut Plan, a: &Attention, opts: &MlaOptions, prog: Progression) {
    let arch = &mut out.arch;
    let (d, r) = (a.head_dim as f64, opts.rope_dim as f64);
    let theta = arch.rope_theta;
    arch.rope_theta = theta.powf(prog.stride as f64 * r / d);
    if prog.offset > 0 {
        let factor = theta.powf(2.0 * prog.offset as f64 / d);
        arch.rope_scaling = Some(json!({"rope_type": "linear", "factor": factor}));
    }
    arch.family = Family::DeepseekV3;
    for l in &mut arch.layers {
        l.attention = Attention {
            kind: AttentionKind::Mla {
                kv_lora_rank: opts.kv_rank,
                q_lora_rank: opts.q_rank,
                qk_rope_head_dim: opts.rope_dim,
            },
            num_kv_heads: a.num_heads,
            ..a.clone()
        };
    }
    let select = match opts.rope_select {
        RopeSelect::TwoNorm => "2norm",
        RopeSelect::High => "high",
        RopeSelect::Low => "low",
        RopeSelect::Uniform => "uniform",
    };
    arch.surgeon.history.push(format!(
        "convert-attention mla: kv rank {} of {}, rope {} of {} features per head ({select}: \
         pairs {} + {} i), q rank {}, latent norm {:?}",
        opts.kv_rank,
        full_kv_rank(a, opts.rope_dim),
        opts.rope_dim,
        a.head_dim,
        prog.offset,
        prog.stride,
        opts.q_rank.map_or("full".to_string(), |q| q.to_string()),
        opts.latent_norm
    ));
}

/// One layer's calibration data: attention inputs `x` (`[tokens, h]`) and `m = x^T x / tokens`.
#[derive(Clone, Copy)]
struct Calib<'a> {
    x: &'a DMatrix<f64>,
    m: &'a DMatrix<f64>,
}

/// The kept pairs: a fixed rule, or the progression of largest 2-norm score.
fn select_pairs(
    plan: &Plan,
    a: &Attention,
    opts: &MlaOptions,
    moments: &[DMatrix<f64>],
) -> Result<Progression> {
    let (half, keep) = (a.head_dim / 2, opts.rope_dim / 2);
    Ok(match opts.rope_select {
        RopeSelect::High => Progression {
            offset: 0,
            stride: 1,
        },
        RopeSelect::Low => Progression {
            offset: half - keep,
            stride: 1,
        },
        RopeSelect::Uniform => Progression {
            offset: 0,
            stride: half / keep,
        },
        RopeSelect::TwoNorm => {
            let mut score = vec![0f64; half];
            for (l, m) in moments.iter().enumerate() {
                for (j, s) in pair_scores(plan, l, a, m)?.into_iter().enumerate() {
                    score[j] += s;
                }
            }
            best_progression(&score, keep)
        }
    })
}

/// The arithmetic progression of `keep` pair indices below `score.len()` of largest summed score
/// (the first one on ties, which prefers small offsets and strides).
pub fn best_progression(score: &[f64], keep: usize) -> Progression {
    let half = score.len();
    let mut best = (
        f64::NEG_INFINITY,
        Progression {
            offset: 0,
            stride: 1,
        },
    );
    for stride in 1..=half.max(1) {
        for offset in 0..half {
            if keep == 0 || offset + stride * (keep - 1) >= half {
                break;
            }
            let p = Progression { offset, stride };
            let s: f64 = p.pairs(keep).iter().map(|&j| score[j]).sum();
            if s > best.0 {
                best = (s, p);
            }
        }
    }
    best.1
}

/// MHA2MLA's 2-norm score of every frequency pair in layer `l`: summed over query heads,
/// `sqrt(E|q_j|^2) * sqrt(E|k_j|^2)` with `k` the query's key head.
fn pair_scores(plan: &Plan, l: usize, a: &Attention, m: &DMatrix<f64>) -> Result<Vec<f64>> {
    let p = format!("model.layers.{l}.self_attn");
    let h = plan.arch.hidden_size;
    let wq = matrix(plan, &format!("{p}.q_proj.weight"), h)?;
    let wk = matrix(plan, &format!("{p}.k_proj.weight"), h)?;
    let energy = |w: &DMatrix<f64>| (w * m).component_mul(w).column_sum();
    let (eq, ek) = (energy(&wq), energy(&wk));
    let (d, per) = (a.head_dim, a.num_heads / a.num_kv_heads);
    let half = d / 2;
    Ok((0..half)
        .map(|j| {
            (0..a.num_heads)
                .map(|q| {
                    let g = q / per;
                    let qe = eq[q * d + j] + eq[q * d + j + half];
                    let ke = ek[g * d + j] + ek[g * d + j + half];
                    (qe.max(0.0) * ke.max(0.0)).sqrt()
                })
                .sum()
        })
        .collect())
}

/// Tensor `name` (`[rows, cols]`) as an f64 matrix.
fn matrix(plan: &Plan, name: &str, cols: usize) -> Result<DMatrix<f64>> {
    let (shape, v) = plan.load_f32(name)?;
    let rows = shape.first().copied().unwrap_or(0);
    if shape.len() != 2 || shape[1] != cols {
        return Err(Error::Invalid(format!(
            "tensor `{name}` has shape {shape:?}, expected [_, {cols}]"
        )));
    }
    Ok(DMatrix::from_fn(rows, cols, |i, j| v[i * cols + j] as f64))
}

/// Rows of one head in rotate-half layout that keep RoPE, in DeepSeek's interleaved order:
/// `[j0, j0 + d/2, j1, j1 + d/2, ..]`; and the rows that lose it, `[n0, n1, .., n0 + d/2, ..]`.
pub fn head_rows(d: usize, pairs: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let half = d / 2;
    let rope = interleave_rows(pairs, half);
    let nope: Vec<usize> = (0..half).filter(|j| !pairs.contains(j)).collect();
    let nope = nope
        .iter()
        .copied()
        .chain(nope.iter().map(|j| j + half))
        .collect();
    (rope, nope)
}

/// Rotate-half rows of kept pairs `js` (pair `j` is rows `j` and `j + half`) in interleaved order:
/// DeepSeek's rotary feature `2i` is pair `i`'s first half, `2i + 1` its second half.
pub fn interleave_rows(js: &[usize], half: usize) -> Vec<usize> {
    js.iter().flat_map(|&j| [j, j + half]).collect()
}

/// One converted layer: `(name under self_attn, shape, row-major values)`.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn convert_layer(
    plan: &Plan,
    l: usize,
    a: &Attention,
    opts: &MlaOptions,
    prog: Progression,
    cal: Calib,
) -> Result<Tensors> {
    let p = format!("model.layers.{l}.self_attn");
    let hsz = plan.arch.hidden_size;
    let wq = matrix(plan, &format!("{p}.q_proj.weight"), hsz)?;
    let wk = matrix(plan, &format!("{p}.k_proj.weight"), hsz)?;
    let wv = matrix(plan, &format!("{p}.v_proj.weight"), hsz)?;
    let (d, g, heads) = (a.head_dim, a.num_kv_heads, a.num_heads);
    let (rope, nope) = head_rows(d, &prog.pairs(opts.rope_dim / 2));
    let (k_rot, mix) = shared_rotary_key(&wk, &rope, g, d, cal.m);
    // Queries: per head [non-rotary | rotary interleaved], the rotary pairs weighted by their key
    // head's share in the shared key.
    let q_order: Vec<usize> = (0..heads)
        .flat_map(|q| nope.iter().chain(&rope).map(move |&r| q * d + r))
        .collect();
    let mut wq = wq.select_rows(&q_order);
    for q in 0..heads {
        let kv = q * g / heads;
        for (i, pair) in mix.iter().enumerate() {
            let row = q * d + nope.len() + 2 * i;
            for r in [row, row + 1] {
                wq.row_mut(r).scale_mut(pair[kv]);
            }
        }
    }
    // Joint latent over [non-rotary keys of every head; values of every head].
    let k_rows: Vec<usize> = (0..g)
        .flat_map(|kv| nope.iter().map(move |r| kv * d + r))
        .collect();
    let z = stack(&wk.select_rows(&k_rows), &wv);
    let u = top_components(&(&z * cal.m * z.transpose()), opts.kv_rank);
    let (latent, w_kv) = latent_norm(u.transpose() * &z, cal, opts.latent_norm);
    let kv_a = stack(&latent, &k_rot);
    let kn = nope.len();
    let kv_b_rows: Vec<usize> = (0..heads)
        .flat_map(|q| {
            let kv = q * g / heads;
            let keys = (0..kn).map(move |i| kv * kn + i);
            let vals = (0..d).map(move |i| g * kn + kv * d + i);
            keys.chain(vals)
        })
        .collect();
    let kv_b = u.select_rows(&kv_b_rows);
    let mut out: Tensors = vec![];
    match opts.q_rank {
        None => out.push(tensor("q_proj", &wq)),
        Some(rank) => {
            let v = top_components(&(&wq * cal.m * wq.transpose()), rank);
            let (qa, w_q) = latent_norm(v.transpose() * &wq, cal, opts.latent_norm);
            out.push(tensor("q_a_proj", &qa));
            out.push(("q_a_layernorm".into(), vec![rank], w_q));
            out.push(tensor("q_b_proj", &v));
        }
    }
    out.push(tensor("kv_a_proj_with_mqa", &kv_a));
    out.push(("kv_a_layernorm".into(), vec![opts.kv_rank], w_kv));
    out.push(tensor("kv_b_proj", &kv_b));
    Ok(out)
}

/// The one rotary key shared by all heads (`rope` rows of a head, interleaved pairs) and, per
/// kept pair, each key head's weight in it: the key heads mixed by the leading eigenvector of
/// their second moment on that pair (TransMLA's RoRoPE idea: a mix of heads at one frequency
/// commutes with RoPE). Exact for one key head; otherwise the best one-head approximation of the
/// pair's keys, and each query keeps `weight x` its pair.
fn shared_rotary_key(
    wk: &DMatrix<f64>,
    rope: &[usize],
    g: usize,
    d: usize,
    m: &DMatrix<f64>,
) -> (DMatrix<f64>, Vec<Vec<f64>>) {
    let mut k_rot = DMatrix::zeros(rope.len(), wk.ncols());
    let mut mix = vec![];
    for (i, pair) in rope.chunks(2).enumerate() {
        let heads: Vec<DMatrix<f64>> = (0..g)
            .map(|kv| wk.select_rows(&[kv * d + pair[0], kv * d + pair[1]]))
            .collect();
        let c = DMatrix::from_fn(g, g, |x, y| (&heads[x] * m).component_mul(&heads[y]).sum());
        let top = top_components(&c, 1);
        let sign = if top.sum() < 0.0 { -1.0 } else { 1.0 };
        let u: Vec<f64> = top.iter().map(|v| v * sign).collect();
        let mut rows = DMatrix::zeros(2, wk.ncols());
        for (kv, h) in heads.iter().enumerate() {
            rows += h * u[kv];
        }
        k_rot.rows_mut(2 * i, 2).copy_from(&rows);
        mix.push(u);
    }
    (k_rot, mix)
}

/// `[a; b]` (rows of `a`, then rows of `b`).
fn stack(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let mut out = DMatrix::zeros(a.nrows() + b.nrows(), a.ncols());
    out.rows_mut(0, a.nrows()).copy_from(a);
    out.rows_mut(a.nrows(), b.nrows()).copy_from(b);
    out
}

/// The `k` leading eigenvectors (columns) of symmetric `c`, largest eigenvalue first.
fn top_components(c: &DMatrix<f64>, k: usize) -> DMatrix<f64> {
    let eig = SymmetricEigen::new((c + c.transpose()) * 0.5);
    let mut order: Vec<usize> = (0..c.nrows()).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    DMatrix::from_fn(c.nrows(), k, |i, j| eig.eigenvectors[(i, order[j])])
}

/// The down-projection `a` (`[R, h]`) and the weight of the RMSNorm after it, as `norm` says,
/// from the calibration inputs.
fn latent_norm(a: DMatrix<f64>, cal: Calib, norm: LatentNorm) -> (DMatrix<f64>, Vec<f32>) {
    let rank = a.nrows();
    match norm {
        LatentNorm::Fit => {
            let w = fit_norm_weight(&(cal.x * a.transpose()));
            (a, w)
        }
        LatentNorm::Linear => {
            // E[mean_j c_j^2] for c = a x.
            let energy = ((&a * cal.m).component_mul(&a).sum() / rank as f64).max(0.0);
            let scale = (1e-6 * LATENT_EPS / energy.max(f64::MIN_POSITIVE)).sqrt();
            let w = (LATENT_EPS.sqrt() / scale) as f32;
            (a * scale, vec![w; rank])
        }
    }
}

/// Per feature `j`, the weight `w_j` minimising `sum_t (w_j c_tj / rms_t - c_tj)^2` over the
/// calibration latents `c` (`[tokens, R]`): `sum c^2 / rms / sum c^2 / rms^2` (1 for a feature
/// that is always zero).
pub fn fit_norm_weight(c: &DMatrix<f64>) -> Vec<f32> {
    let rank = c.ncols();
    let mut num = vec![0f64; rank];
    let mut den = vec![0f64; rank];
    for row in c.row_iter() {
        let rms = (row.norm_squared() / rank as f64 + LATENT_EPS).sqrt();
        for (j, v) in row.iter().enumerate() {
            num[j] += v * v / rms;
            den[j] += v * v / (rms * rms);
        }
    }
    num.iter()
        .zip(&den)
        .map(|(n, d)| if *d > 0.0 { (n / d) as f32 } else { 1.0 })
        .collect()
}

fn tensor(name: &str, m: &DMatrix<f64>) -> (String, Vec<usize>, Vec<f32>) {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().map(|x| *x as f32));
    }
    (name.into(), vec![m.nrows(), m.ncols()], v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotate-half RoPE of one head at angle `t * inv_freq[j]` for pair `j`.
    fn rope_rotate_half(x: &[f32], inv: &[f32], t: f32) -> Vec<f32> {
        let half = x.len() / 2;
        let mut y = vec![0f32; x.len()];
        for j in 0..half {
            let (s, c) = (t * inv[j]).sin_cos();
            y[j] = x[j] * c - x[j + half] * s;
            y[j + half] = x[j + half] * c + x[j] * s;
        }
        y
    }

    /// transformers' `apply_rotary_pos_emb_interleave` on one head: pairs `(x[2i], x[2i+1])`,
    /// output `[x1 cos - x2 sin, x2 cos + x1 sin]`.
    fn rope_interleaved(x: &[f32], inv: &[f32], t: f32) -> Vec<f32> {
        let half = x.len() / 2;
        let mut y = vec![0f32; x.len()];
        for i in 0..half {
            let (s, c) = (t * inv[i]).sin_cos();
            let (x1, x2) = (x[2 * i], x[2 * i + 1]);
            y[i] = x1 * c - x2 * s;
            y[i + half] = x2 * c + x1 * s;
        }
        y
    }

    #[test]
    fn interleave_permutation_is_exact() {
        let d = 16;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
            .collect();
        let q: Vec<f32> = (0..d).map(|i| ((i * 7 + 3) as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..d).map(|i| ((i * 5 + 1) as f32 * 0.91).cos()).collect();
        let all: Vec<usize> = (0..d / 2).collect();
        let rows = interleave_rows(&all, d / 2);
        let perm = |x: &[f32]| rows.iter().map(|&r| x[r]).collect::<Vec<f32>>();
        for t in [0.0f32, 1.0, 17.0, 511.0] {
            let (a, b) = (rope_rotate_half(&q, &inv, t), rope_rotate_half(&k, &inv, t));
            let (c, e) = (
                rope_interleaved(&perm(&q), &inv, t),
                rope_interleaved(&perm(&k), &inv, t),
            );
            // The same numbers in the same layout, bit for bit.
            assert_eq!(a, c, "queries at position {t}");
            assert_eq!(b, e, "keys at position {t}");
        }
    }

    #[test]
    fn fitted_norm_weight_undoes_a_constant_rms() {
        // Every token's latent has rms 2 (and eps is negligible): the weight is 2 everywhere.
        let c = DMatrix::from_row_slice(2, 2, &[2.0, -2.0, 2.0 * 2f64.sqrt(), 0.0]);
        let w = fit_norm_weight(&c);
        for x in w {
            assert!((x - 2.0).abs() < 1e-5, "{x}");
        }
        // A feature that is always zero keeps weight 1.
        let z = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 3.0, 0.0]);
        assert_eq!(fit_norm_weight(&z)[1], 1.0);
    }

    #[test]
    fn head_rows_split_pairs() {
        let (rope, nope) = head_rows(8, &[0, 2]);
        assert_eq!(rope, vec![0, 4, 2, 6]);
        assert_eq!(nope, vec![1, 3, 5, 7]);
    }

    #[test]
    fn best_progression_finds_the_strongest_evenly_spaced_pairs() {
        let score = [0.1, 5.0, 0.2, 4.0, 0.3, 6.0, 0.1, 0.0];
        assert_eq!(
            best_progression(&score, 3),
            Progression {
                offset: 1,
                stride: 2
            }
        );
        assert_eq!(
            best_progression(&score, 8),
            Progression {
                offset: 0,
                stride: 1
            }
        );
        assert_eq!(
            Progression {
                offset: 1,
                stride: 3
            }
            .pairs(3),
            vec![1, 4, 7]
        );
    }
}
