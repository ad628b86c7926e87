//! CLOVER (arXiv 2411.17426): every key/value head's value-output pair rotated into its singular
//! basis, then optionally pruned to its strongest directions.
//!
//! Query head `q` of group `g` computes `W_o^q A (W_v^g x)` with attention weights `A` that mix
//! tokens, never features, so any invertible `T` on the values of head `g` with `W_v' = T W_v`,
//! `W_o^q' = W_o^q T^-1` for every query head of the group leaves the model's function unchanged.
//! CLOVER picks `T` from the SVD of the group's product `P = [W_o^q1; ..; W_o^qr] W_v^g`
//! (`r * h x h`, rank at most `d = v_head_dim`): the new value rows are `S^1/2 V^T`, the new output
//! columns `U S^1/2`, each head's directions sorted by singular value. A value bias rides along as
//! one more input column (the attention rows sum to one).
//!
//! Data-aware (SVD-LLM/ASVD): with the second moment `C` of the layer's attention input on
//! calibration text the decomposition is of `P C^1/2`, so singular values measure each
//! direction's output energy on that text rather than its weight norm. Both forms are exact at full
//! rank; pruning keeps the first `k` directions of every head (error per head: the root of the
//! dropped squared singular values).
//!
//! Computed per head without forming `P`: `O = Q_o R_o` (QR), `G = R_o (W_v C W_v^T) R_o^T`
//! (`d x d`), `G = U_m S^2 U_m^T`; value rows `S^-1/2 U_m^T R_o W_v`, output columns `Q_o U_m S^1/2`.
//! Their product is `Q_o U_m U_m^T R_o W_v = O W_v` for any orthogonal `U_m`: exactness does not
//! depend on how well `S` is resolved. f64 throughout, layers in parallel (rayon); the rewritten
//! value/output projections are held in memory (inline tensors), the rest of the plan stays lazy.
//!
//! Query-key CLOVER is refused: every family surgeon reads applies RoPE to all query/key features,
//! and an SVD basis of `W_q^T W_k` does not commute with the rotations.
use crate::{Error, Result};
use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;
use surgeon_formats::plan::{Source, TensorEntry};
use surgeon_formats::{AttentionKind, HostTensor, Plan};

/// How many value-output directions each layer keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum VoRank {
    /// All of them: a rotation, the model computes the same function.
    Full,
    /// Drop this fraction of every head's directions (`prune_vo`, in (0, 1)).
    Prune(f64),
    /// Keep this many per head (`vo_rank`).
    Rank(usize),
    /// Keep the fewest directions whose squared singular values reach this fraction of the head's
    /// total (`energy`, in (0, 1]); a layer keeps the most any of its heads needs.
    Energy(f64),
}

/// What [`clover`] does.
#[derive(Clone, Debug, PartialEq)]
pub struct CloverOptions {
    pub rank: VoRank,
    /// Also decompose query-key products (refused on RoPE models, i.e. every supported family).
    pub qk: bool,
    /// Keep the original value head size and write zero rows/columns for pruned directions, so a
    /// standard class loads the model (no memory saved).
    pub pad: bool,
}

impl Default for CloverOptions {
    fn default() -> Self {
        CloverOptions {
            rank: VoRank::Full,
            qk: false,
            pad: false,
        }
    }
}

/// Statistics of one layer's attention input (after `input_layernorm`) on calibration text:
/// the plain data that data-aware CLOVER needs (collected by `surgeon_distill`'s probe).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputStats {
    pub tokens: usize,
    /// `sum_t x_t x_t^T`, row-major `h x h`.
    pub sum_outer: Vec<f64>,
    /// `sum_t x_t` (`h`), for the value bias column.
    pub sum: Vec<f64>,
}

/// One key/value head's spectrum and how much of it was kept.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadSpectrum {
    pub layer: usize,
    pub kv_head: usize,
    /// Descending.
    pub singular_values: Vec<f64>,
    pub kept: usize,
}

impl HeadSpectrum {
    /// Fraction of the squared singular values kept (1 when nothing was pruned).
    pub fn energy_kept(&self) -> f64 {
        let total: f64 = self.singular_values.iter().map(|s| s * s).sum();
        let kept: f64 = self.singular_values[..self.kept]
            .iter()
            .map(|s| s * s)
            .sum();
        if total > 0.0 {
            kept / total
        } else {
            1.0
        }
    }
    /// `sqrt(sum of dropped sigma^2)`: the Frobenius error of the head's (whitened) product.
    pub fn dropped_norm(&self) -> f64 {
        self.singular_values[self.kept..]
            .iter()
            .map(|s| s * s)
            .sum::<f64>()
            .sqrt()
    }
}

/// What [`clover`] did, head by head.
#[derive(Clone, Debug, PartialEq)]
pub struct CloverReport {
    pub heads: Vec<HeadSpectrum>,
    /// Whether singular values are of the whitened product (calibration statistics given).
    pub data_aware: bool,
}

/// One head in its singular basis: `rows` (`d x h'`, value rows, bias last when present) and
/// `cols` (`r*h x d`, the group's output columns stacked by query head), both row-major.
struct HeadBasis {
    sigma: Vec<f64>,
    rows: DMatrix<f64>,
    cols: DMatrix<f64>,
}

/// The plan with every softmax layer's value-output pairs in their singular basis, pruned as
/// `opts.rank` says; data-aware when `stats` (one per layer) are given.
pub fn clover(
    plan: &Plan,
    opts: &CloverOptions,
    stats: Option<&[InputStats]>,
) -> Result<(Plan, CloverReport)> {
    check_options(plan, opts)?;
    if let Some(s) = stats {
        check_stats(plan, s)?;
    }
    let layers: Vec<usize> = (0..plan.arch.num_layers())
        .filter(|&l| !plan.arch.layers[l].attention.is_no_op())
        .collect();
    let bases = layers
        .par_iter()
        .map(|&l| decompose_layer(plan, l, stats.map(|s| &s[l])))
        .collect::<Result<Vec<_>>>()?;
    let mut out = plan.clone();
    let mut report = CloverReport {
        heads: vec![],
        data_aware: stats.is_some(),
    };
    for (&l, heads) in layers.iter().zip(&bases) {
        let keep = layer_rank(l, heads, opts.rank);
        write_layer(plan, &mut out, l, heads, keep, opts.pad)?;
        report
            .heads
            .extend(heads.iter().enumerate().map(|(g, b)| HeadSpectrum {
                layer: l,
                kv_head: g,
                singular_values: b.sigma.clone(),
                kept: keep,
            }));
    }
    out.arch
        .surgeon
        .history
        .push(history_line(plan, &out, opts, &report, stats));
    if opts.pad && opts.rank != VoRank::Full {
        out.arch.surgeon.notes.push(
            "CLOVER pruning with --pad: pruned value/output directions are zero rows/columns of \
             the original shapes, so a standard class loads the model but no memory is saved"
                .into(),
        );
    }
    out.validate()?;
    Ok((out, report))
}

/// Refuses what CLOVER cannot do exactly or was asked out of range, before any work (callers
/// run it before collecting calibration statistics).
pub fn check_options(plan: &Plan, opts: &CloverOptions) -> Result<()> {
    if opts.qk {
        return Err(Error::Invalid(format!(
            "`qk`: query-key CLOVER is exact only where no rotary embedding acts on the query/key \
             features, and every layer of this {} model applies RoPE to all of them (an SVD basis \
             of W_q^T W_k does not commute with the rotations, so the model would compute a \
             different function); only value-output CLOVER is supported here",
            plan.arch.family.model_type()
        )));
    }
    match opts.rank {
        VoRank::Prune(r) if !(r > 0.0 && r < 1.0) => {
            return Err(Error::Invalid(format!(
                "`prune_vo` is the fraction of directions to drop and must lie in (0, 1) (got {r})"
            )))
        }
        VoRank::Energy(e) if !(e > 0.0 && e <= 1.0) => {
            return Err(Error::Invalid(format!(
                "`energy` is the fraction of squared singular values to keep and must lie in (0, 1] (got {e})"
            )))
        }
        _ => {}
    }
    for (l, layer) in plan.arch.layers.iter().enumerate() {
        let a = &layer.attention;
        match a.kind {
            AttentionKind::NoOp => continue,
            AttentionKind::Softmax => {}
            ref k => {
                return Err(Error::Unsupported {
                    layer: l,
                    message: format!(
                        "{k:?} attention: CLOVER rewrites softmax attention layers only"
                    ),
                })
            }
        }
        if let VoRank::Rank(r) = opts.rank {
            if r == 0 || r > a.v_head_dim {
                return Err(Error::Invalid(format!(
                    "`vo_rank` {r} is out of range: layer {l} has value heads of size {}, so it \
                     must be in 1..={}",
                    a.v_head_dim, a.v_head_dim
                )));
            }
        }
    }
    Ok(())
}

fn check_stats(plan: &Plan, stats: &[InputStats]) -> Result<()> {
    let (n, h) = (plan.arch.num_layers(), plan.arch.hidden_size);
    if stats.len() != n {
        return Err(Error::Invalid(format!(
            "calibration statistics cover {} layers but the model has {n}",
            stats.len()
        )));
    }
    for (l, s) in stats.iter().enumerate() {
        if plan.arch.layers[l].attention.is_no_op() {
            continue;
        }
        if s.tokens == 0 || s.sum_outer.len() != h * h || s.sum.len() != h {
            return Err(Error::Invalid(format!(
                "layer {l}: calibration statistics of {} tokens with {} second moments and {} \
                 sums do not describe an attention input of size {h}",
                s.tokens,
                s.sum_outer.len(),
                s.sum.len()
            )));
        }
    }
    Ok(())
}

/// Every key/value head of layer `l` in its singular basis.
fn decompose_layer(plan: &Plan, l: usize, stats: Option<&InputStats>) -> Result<Vec<HeadBasis>> {
    let a = &plan.arch.layers[l].attention;
    let (h, d) = (plan.arch.hidden_size, a.v_head_dim);
    let p = format!("model.layers.{l}.self_attn");
    let (_, wv) = plan.load_f32(&format!("{p}.v_proj.weight"))?;
    let (_, wo) = plan.load_f32(&format!("{p}.o_proj.weight"))?;
    let bias = match plan.tensors.get(&format!("{p}.v_proj.bias")) {
        Some(e) => Some(e.source.eval()?.to_f32()),
        None => None,
    };
    let cov = stats.map(|s| input_moment(s, bias.is_some()));
    let per = a.num_heads / a.num_kv_heads;
    (0..a.num_kv_heads)
        .map(|g| {
            let values = value_block(&wv, bias.as_deref(), g, d, h);
            let outputs = output_block(&wo, g * per..(g + 1) * per, a.o_dim(), d, h);
            decompose_head(&values, &outputs, cov.as_ref())
        })
        .collect()
}

/// The second moment of `[x; 1]` (or `x`) per token, with a ridge of 1e-6 of its mean diagonal
/// so that directions the calibration text never excites still sort by their weights.
fn input_moment(s: &InputStats, with_one: bool) -> DMatrix<f64> {
    let h = s.sum.len();
    let n = s.tokens as f64;
    let dim = h + with_one as usize;
    let mut c = DMatrix::from_fn(dim, dim, |i, j| match (i < h, j < h) {
        (true, true) => s.sum_outer[i * h + j] / n,
        (true, false) => s.sum[i] / n,
        (false, true) => s.sum[j] / n,
        (false, false) => 1.0,
    });
    let ridge = 1e-6 * c.trace() / dim as f64;
    for i in 0..dim {
        c[(i, i)] += ridge;
    }
    c
}

/// Rows of head `g` of `v_proj` (`d x h`), its bias as one more column when present.
pub(crate) fn value_block(
    wv: &[f32],
    bias: Option<&[f32]>,
    g: usize,
    d: usize,
    h: usize,
) -> DMatrix<f64> {
    let cols = h + bias.is_some() as usize;
    DMatrix::from_fn(d, cols, |i, j| {
        let r = g * d + i;
        if j < h {
            wv[r * h + j] as f64
        } else {
            bias.map_or(0.0, |b| b[r] as f64)
        }
    })
}

/// Columns of query heads `qs` of `o_proj` (`h x o_dim`), stacked: `len(qs) * h x d`.
pub(crate) fn output_block(
    wo: &[f32],
    qs: std::ops::Range<usize>,
    o_dim: usize,
    d: usize,
    h: usize,
) -> DMatrix<f64> {
    let first = qs.start;
    DMatrix::from_fn(qs.len() * h, d, |i, j| {
        let (q, row) = (first + i / h, i % h);
        wo[row * o_dim + q * d + j] as f64
    })
}

/// The SVD of a group's product `O V` (whitened by `cov` when given) without forming it: `O = Q_o R_o`
/// and the eigenvectors `U_m` (columns, by descending singular value) of `R_o V C V^T R_o^T`;
/// `O V = (Q_o U_m) S (S^-1 U_m^T R_o V)`.
pub(crate) struct HeadSvd {
    pub q_o: DMatrix<f64>,
    pub r_o: DMatrix<f64>,
    pub u_m: DMatrix<f64>,
    pub sigma: Vec<f64>,
}

/// See [`HeadSvd`].
pub(crate) fn head_svd(
    values: &DMatrix<f64>,
    outputs: &DMatrix<f64>,
    cov: Option<&DMatrix<f64>>,
) -> Result<HeadSvd> {
    let d = values.nrows();
    let qr = outputs.clone().qr();
    let (q_o, r_o) = (qr.q(), qr.r());
    if r_o.nrows() != d {
        return Err(Error::Invalid(format!(
            "value heads of size {d} need at least {d} output rows per group"
        )));
    }
    let gram = match cov {
        Some(c) => values * c * values.transpose(),
        None => values * values.transpose(),
    };
    let g = &r_o * gram * r_o.transpose();
    let eig = SymmetricEigen::new((&g + g.transpose()) * 0.5);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let u_m = DMatrix::from_fn(d, d, |i, j| eig.eigenvectors[(i, order[j])]);
    let sigma: Vec<f64> = order
        .iter()
        .map(|&j| eig.eigenvalues[j].max(0.0).sqrt())
        .collect();
    Ok(HeadSvd {
        q_o,
        r_o,
        u_m,
        sigma,
    })
}

/// The scale direction `j` of a head takes out of its value rows: its singular value, or 1 for a
/// (numerically) null direction, which is just as exact.
pub(crate) fn direction_scale(sigma: &[f64], j: usize, root: bool) -> f64 {
    let (s, top) = (sigma[j], sigma.first().copied().unwrap_or(0.0));
    match (s > 1e-12 * top, root) {
        (false, _) => 1.0,
        (true, true) => s.sqrt(),
        (true, false) => s,
    }
}

/// [`head_svd`] split balanced (`S^-1/2 | S^1/2`) into value rows and output columns; see the
/// module documentation.
fn decompose_head(
    values: &DMatrix<f64>,
    outputs: &DMatrix<f64>,
    cov: Option<&DMatrix<f64>>,
) -> Result<HeadBasis> {
    let HeadSvd {
        q_o,
        r_o,
        u_m,
        sigma,
    } = head_svd(values, outputs, cov)?;
    let mut rows = u_m.transpose() * &r_o * values;
    let mut cols = q_o * &u_m;
    for j in 0..sigma.len() {
        let k = direction_scale(&sigma, j, true);
        rows.row_mut(j).scale_mut(1.0 / k);
        cols.column_mut(j).scale_mut(k);
    }
    Ok(HeadBasis { sigma, rows, cols })
}

/// Directions layer `l` keeps (the same for all its heads: one `v_head_dim` per layer).
fn layer_rank(_l: usize, heads: &[HeadBasis], rank: VoRank) -> usize {
    let d = heads.first().map_or(0, |b| b.sigma.len());
    match rank {
        VoRank::Full => d,
        VoRank::Prune(r) => ((d as f64 * (1.0 - r)).round() as usize).clamp(1, d),
        VoRank::Rank(r) => r.min(d),
        VoRank::Energy(e) => heads
            .iter()
            .map(|b| energy_rank(&b.sigma, e))
            .max()
            .unwrap_or(d),
    }
}

/// The fewest leading singular values whose squares reach `e` of the total.
pub fn energy_rank(sigma: &[f64], e: f64) -> usize {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let mut acc = 0.0;
    for (k, s) in sigma.iter().enumerate() {
        acc += s * s;
        if acc >= e * total * (1.0 - 1e-12) {
            return k + 1;
        }
    }
    sigma.len().max(1)
}

/// Writes layer `l`'s value/output projections keeping `keep` directions per head (padded back
/// to the original head size with zeros when `pad`).
fn write_layer(
    plan: &Plan,
    out: &mut Plan,
    l: usize,
    heads: &[HeadBasis],
    keep: usize,
    pad: bool,
) -> Result<()> {
    let a = plan.arch.layers[l].attention.clone();
    let h = plan.arch.hidden_size;
    let width = if pad { a.v_head_dim } else { keep };
    let per = a.num_heads / a.num_kv_heads;
    let mut v = vec![0f32; a.num_kv_heads * width * h];
    let mut bias = vec![0f32; a.num_kv_heads * width];
    let mut o = vec![0f32; h * a.num_heads * width];
    let o_dim = a.num_heads * width;
    for (g, b) in heads.iter().enumerate() {
        for j in 0..keep {
            let r = g * width + j;
            for c in 0..h {
                v[r * h + c] = b.rows[(j, c)] as f32;
            }
            if b.rows.ncols() > h {
                bias[r] = b.rows[(j, h)] as f32;
            }
            for i in 0..per {
                let q = g * per + i;
                for row in 0..h {
                    o[row * o_dim + q * width + j] = b.cols[(i * h + row, j)] as f32;
                }
            }
        }
    }
    let label = format!("clover {keep}/{} directions", a.v_head_dim);
    let p = format!("model.layers.{l}.self_attn");
    let put = |out: &mut Plan, name: String, shape: Vec<usize>, values: &[f32]| -> Result<()> {
        let dtype = plan.get(&name)?.dtype;
        let source = Source::inline(label.clone(), HostTensor::from_f32(shape, values));
        out.tensors.insert(name, TensorEntry { source, dtype });
        Ok(())
    };
    put(
        out,
        format!("{p}.v_proj.weight"),
        vec![a.num_kv_heads * width, h],
        &v,
    )?;
    put(out, format!("{p}.o_proj.weight"), vec![h, o_dim], &o)?;
    if heads.first().is_some_and(|b| b.rows.ncols() > h) {
        put(
            out,
            format!("{p}.v_proj.bias"),
            vec![a.num_kv_heads * width],
            &bias,
        )?;
    }
    out.arch.layers[l].attention.v_head_dim = width;
    Ok(())
}

/// `clover: value-output SVD per KV head (...)` with what was kept and what it saves.
fn history_line(
    before: &Plan,
    after: &Plan,
    opts: &CloverOptions,
    report: &CloverReport,
    stats: Option<&[InputStats]>,
) -> String {
    let basis = match stats.and_then(|s| s.first()) {
        Some(s) => format!("data-aware on {} calibration tokens", s.tokens),
        None => "weights only".into(),
    };
    let rank = match opts.rank {
        VoRank::Full => "full rank".to_string(),
        VoRank::Prune(r) => format!("pruned {r} of the directions"),
        VoRank::Rank(r) => format!("rank {r}"),
        VoRank::Energy(e) => format!("energy {e}"),
    };
    let min_energy = report
        .heads
        .iter()
        .map(HeadSpectrum::energy_kept)
        .fold(1.0, f64::min);
    let (p0, p1) = (before.parameter_count(), after.parameter_count());
    let (k0, k1) = (
        before.arch.kv_cache_values_per_token(),
        after.arch.kv_cache_values_per_token(),
    );
    format!(
        "clover: value-output SVD per KV head ({basis}), {rank}{}; lowest energy kept by a head \
         {min_energy:.4}; parameters {p0} -> {p1}, KV cache values per token {k0} -> {k1}",
        if opts.pad { ", zero-padded" } else { "" }
    )
}

// ----- Channel-pruning baselines (what CLOVER pruning is compared with) -----

/// How [`prune_vo_channels`] chooses the value channels a head keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelOrder {
    /// Largest `|W_v row| * |group's W_o columns|` (the channel's rank-one product norm).
    Magnitude,
    /// Uniformly at random (seeded, reproducible).
    Random { seed: u64 },
}

/// Baseline: every KV head keeps the same number of its original value channels (rows of
/// `v_proj`, the matching columns of `o_proj` for every query head of its group) as
/// `VoRank::Prune(ratio)` keeps directions, chosen by `order`; no rotation. Lazy (row/column
/// selections of the original tensors).
pub fn prune_vo_channels(plan: &Plan, ratio: f64, order: ChannelOrder) -> Result<Plan> {
    let opts = CloverOptions {
        rank: VoRank::Prune(ratio),
        ..Default::default()
    };
    check_options(plan, &opts)?;
    let mut out = plan.clone();
    for l in 0..plan.arch.num_layers() {
        let a = plan.arch.layers[l].attention.clone();
        if a.is_no_op() {
            continue;
        }
        let d = a.v_head_dim;
        let keep = ((d as f64 * (1.0 - ratio)).round() as usize).clamp(1, d);
        let kept = kept_channels(plan, l, keep, order)?;
        let per = a.num_heads / a.num_kv_heads;
        let rows: Vec<usize> = (0..a.num_kv_heads)
            .flat_map(|g| kept[g].iter().map(move |&j| g * d + j))
            .collect();
        let cols: Vec<usize> = (0..a.num_heads)
            .flat_map(|q| kept[q / per].iter().map(move |&j| q * d + j))
            .collect();
        let label = format!("{keep}/{d} channels by {order:?}");
        let p = format!("model.layers.{l}.self_attn");
        for (name, by_rows) in [
            ("v_proj.weight", true),
            ("v_proj.bias", true),
            ("o_proj.weight", false),
        ] {
            let name = format!("{p}.{name}");
            let Some(e) = plan.tensors.get(&name) else {
                continue;
            };
            let source = if by_rows {
                e.source.clone().rows(rows.clone(), label.clone())
            } else {
                e.source.clone().cols(cols.clone(), label.clone())
            };
            out.tensors.insert(
                name,
                TensorEntry {
                    source,
                    dtype: e.dtype,
                },
            );
        }
        out.arch.layers[l].attention.v_head_dim = keep;
    }
    out.arch.surgeon.history.push(format!(
        "value-output channel pruning (baseline): dropped {ratio} of every head's channels by {order:?}"
    ));
    out.validate()?;
    Ok(out)
}

/// Per KV head of layer `l`, the `keep` channels `order` picks, ascending.
fn kept_channels(
    plan: &Plan,
    l: usize,
    keep: usize,
    order: ChannelOrder,
) -> Result<Vec<Vec<usize>>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let a = &plan.arch.layers[l].attention;
    let (h, d, per) = (
        plan.arch.hidden_size,
        a.v_head_dim,
        a.num_heads / a.num_kv_heads,
    );
    let p = format!("model.layers.{l}.self_attn");
    let mut out = vec![];
    match order {
        ChannelOrder::Random { seed } => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((l as u64) << 32));
            for _ in 0..a.num_kv_heads {
                let mut idx: Vec<usize> = (0..d).collect();
                idx.shuffle(&mut rng);
                out.push(idx[..keep].to_vec());
            }
        }
        ChannelOrder::Magnitude => {
            let (_, wv) = plan.load_f32(&format!("{p}.v_proj.weight"))?;
            let (_, wo) = plan.load_f32(&format!("{p}.o_proj.weight"))?;
            for g in 0..a.num_kv_heads {
                let values = value_block(&wv, None, g, d, h);
                let outputs = output_block(&wo, g * per..(g + 1) * per, a.o_dim(), d, h);
                let score: Vec<f64> = (0..d)
                    .map(|j| values.row(j).norm() * outputs.column(j).norm())
                    .collect();
                let mut idx: Vec<usize> = (0..d).collect();
                idx.sort_by(|&x, &y| score[y].total_cmp(&score[x]));
                out.push(idx[..keep].to_vec());
            }
        }
    }
    for k in &mut out {
        k.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_rank_counts_squares() {
        let s = [3.0, 2.0, 1.0, 0.0];
        // Squares 9, 4, 1 of 14.
        assert_eq!(energy_rank(&s, 9.0 / 14.0), 1);
        assert_eq!(energy_rank(&s, 0.65), 2);
        assert_eq!(energy_rank(&s, 1.0), 3);
        assert_eq!(energy_rank(&[0.0, 0.0], 0.5), 1);
    }

    #[test]
    fn head_product_is_kept_and_sorted() {
        // 2 query heads of a group, hidden 5, value head 3.
        let values = DMatrix::from_fn(3, 5, |i, j| ((i * 5 + j) as f64 * 0.7).sin());
        let outputs = DMatrix::from_fn(10, 3, |i, j| ((i * 3 + j) as f64 * 1.3).cos());
        let b = decompose_head(&values, &outputs, None).unwrap();
        let want = &outputs * &values;
        let got = &b.cols * &b.rows;
        assert!((want - got).amax() < 1e-12);
        assert!(b.sigma.windows(2).all(|w| w[0] >= w[1]), "{:?}", b.sigma);
        // The singular values are those of the product.
        let svd = (&outputs * &values).svd(false, false);
        let mut s: Vec<f64> = svd.singular_values.iter().copied().collect();
        s.sort_by(|a, b| b.total_cmp(a));
        for (x, y) in b.sigma.iter().zip(&s) {
            assert!((x - y).abs() < 1e-9, "{:?} vs {s:?}", b.sigma);
        }
    }
}
