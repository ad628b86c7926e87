//! MoE construction from a dense model: sparse upcycling (Mixtral layout) and expert splitting
//! (LLaMA-MoE, arXiv 2406.16554).
//!
//! Both operators only rewrite the plan: upcycled experts are clones of the dense MLP's sources (the
//! writer copies their bytes unchanged), split experts are row/column selections (`Op::Rows` /
//! `Op::Cols`) of the dense matrices. The only values computed here are partitions (clustering reads
//! `up_proj`) and router rows handed in by the caller.
//!
//! Calibration statistics that need a forward pass (co-activation, activation importance, hidden
//! states of prompts for the router) are computed by `surgeon_distill::moe_stats` and passed in as
//! plain vectors, so this crate stays free of the runtime.
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;
use surgeon_formats::{HostTensor, Mlp, ModelArch, MoeRouting, Op, Plan, Source, TensorEntry};

/// How experts are made from the dense MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeMethod {
    /// Every expert is a copy of the dense MLP (sparse upcycling).
    Upcycle,
    /// Neurons dealt to experts by a seeded shuffle.
    SplitRandom,
    /// Balanced k-means of the L2-normalised `up_proj` rows.
    SplitCluster,
    /// Balanced k-means of the neurons' firing patterns on calibration text.
    SplitCoactivation,
    /// Balanced assignment maximising per-token-cluster activation importance.
    SplitImportance,
}

impl MoeMethod {
    pub const ALL: [MoeMethod; 5] = [
        MoeMethod::Upcycle,
        MoeMethod::SplitRandom,
        MoeMethod::SplitCluster,
        MoeMethod::SplitCoactivation,
        MoeMethod::SplitImportance,
    ];
    pub fn name(self) -> &'static str {
        match self {
            MoeMethod::Upcycle => "upcycle",
            MoeMethod::SplitRandom => "split-random",
            MoeMethod::SplitCluster => "split-cluster",
            MoeMethod::SplitCoactivation => "split-coactivation",
            MoeMethod::SplitImportance => "split-importance",
        }
    }
    pub fn is_split(self) -> bool {
        self != MoeMethod::Upcycle
    }
    /// True when the method needs activations from calibration text (`--data`).
    pub fn needs_activations(self) -> bool {
        matches!(
            self,
            MoeMethod::SplitCoactivation | MoeMethod::SplitImportance
        )
    }
}

impl std::str::FromStr for MoeMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        MoeMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = MoeMethod::ALL.iter().map(|m| m.name()).collect();
                format!("unknown MoE method `{s}` ({})", names.join(", "))
            })
    }
}

impl std::fmt::Display for MoeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Initial router weights (`block_sparse_moe.gate.weight`, `[E, h]`).
#[derive(Clone, Debug, PartialEq)]
pub enum RouterInit {
    /// Small normal values, seeded per layer from the operator's seed.
    Random { std: f32 },
    /// All zeros: uniform routing, ties broken by expert order.
    Zeros,
    /// Rows computed by the caller (prompt hidden states, token embeddings): one `E * h` row-major
    /// vector per layer (or a single one used by every layer). `label` names them in plans.
    Given { label: String, rows: Vec<Vec<f32>> },
}

impl RouterInit {
    fn describe(&self) -> String {
        match self {
            RouterInit::Random { std } => format!("random(std {std})"),
            RouterInit::Zeros => "zeros".into(),
            RouterInit::Given { label, .. } => label.clone(),
        }
    }
}

/// Calibration data for the data-driven split methods, one entry per layer.
#[derive(Clone, Debug, PartialEq)]
pub enum SplitStats {
    /// Per layer: `[i, t]` row-major, neuron j's feature vector over `t` calibration tokens (e.g.
    /// 1 where it fires, 0 elsewhere). Neurons with similar patterns fire together.
    Coactivation {
        features: Vec<Vec<f32>>,
        tokens: usize,
    },
    /// Per layer: `[E, i]` row-major importance of neuron j for token group e (e.g. mean |activation|
    /// times the norm of its `down_proj` column, over the calibration tokens routed to group e).
    Importance { scores: Vec<Vec<f32>> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeOptions {
    pub num_experts: usize,
    pub top_k: usize,
    pub method: MoeMethod,
    pub router: RouterInit,
    pub seed: u64,
    /// Split only: multiply every expert's `w2` by E/K and use plain Mixtral routing, which computes
    /// the same function as LLaMA-MoE's scaled routing in stock Mixtral code.
    pub fold_scale: bool,
}

impl MoeOptions {
    pub fn new(method: MoeMethod, num_experts: usize, top_k: usize) -> Self {
        MoeOptions {
            num_experts,
            top_k,
            method,
            router: RouterInit::Random { std: 0.02 },
            seed: 0,
            fold_scale: false,
        }
    }
}

/// Checks a request against the model before anything is computed; one-line errors.
pub fn check_request(arch: &ModelArch, opts: &MoeOptions) -> Result<()> {
    let (e, k) = (opts.num_experts, opts.top_k);
    if e < 2 {
        return Err(Error::invalid(format!(
            "`experts` must be at least 2 (got {e})"
        )));
    }
    if k == 0 || k > e {
        return Err(Error::invalid(format!(
            "`top_k` must be between 1 and `experts` = {e} (got {k})"
        )));
    }
    if arch.layers.is_empty() {
        return Err(Error::invalid("the model has no layers"));
    }
    if arch.family.is_gemma() {
        return Err(Error::invalid(format!(
            "a {} model cannot get experts: transformers has no Gemma mixture-of-experts class, \
             and surgeon's shipped modeling code does not implement Gemma's norms and soft-capping",
            arch.family.model_type()
        )));
    }
    for (l, layer) in arch.layers.iter().enumerate() {
        match layer.mlp {
            Mlp::Moe { num_experts, .. } => {
                return Err(Error::invalid(format!(
                "the model is already a mixture of experts (layer {l} has {num_experts} experts)"
            )))
            }
            Mlp::NoOp => {
                return Err(Error::invalid(format!(
                    "layer {l} has no MLP to turn into experts"
                )))
            }
            Mlp::Dense { intermediate_size } => {
                if opts.method.is_split() && intermediate_size % e != 0 {
                    return Err(Error::invalid(format!(
                        "`experts` {e} does not divide the FFN width {intermediate_size} of layer {l} \
                         (a split needs equal experts)"
                    )));
                }
            }
        }
    }
    if let RouterInit::Random { std } = opts.router {
        if !(std.is_finite() && (0.0..=1.0).contains(&std)) {
            return Err(Error::invalid(format!(
                "`router_std` must be a finite number in [0, 1], got {std}"
            )));
        }
    }
    if opts.fold_scale && !opts.method.is_split() {
        return Err(Error::invalid(
            "`fold_scale` applies to split methods only (upcycling uses Mixtral routing)",
        ));
    }
    if let RouterInit::Given { rows, .. } = &opts.router {
        let want = e * arch.hidden_size;
        if rows.len() != 1 && rows.len() != arch.layers.len() {
            return Err(Error::invalid(format!(
                "router rows given for {} layers, the model has {}",
                rows.len(),
                arch.layers.len()
            )));
        }
        if let Some(r) = rows.iter().find(|r| r.len() != want) {
            return Err(Error::invalid(format!(
                "router rows have {} values, expected experts x hidden = {e} x {} = {want}",
                r.len(),
                arch.hidden_size
            )));
        }
    }
    Ok(())
}

fn dense_width(arch: &ModelArch, layer: usize) -> usize {
    match arch.layers[layer].mlp {
        Mlp::Dense { intermediate_size } => intermediate_size,
        Mlp::Moe { .. } | Mlp::NoOp => unreachable!("checked by check_request"),
    }
}

/// Removes layer `l`'s dense gate/up/down projections from `plan`, which the MoE replaces.
fn take_dense_mlp(
    plan: &mut Plan,
    origin: &str,
    l: usize,
) -> Result<(TensorEntry, TensorEntry, TensorEntry)> {
    let [gate, up, down] = mlp_names(l).map(|n| plan.tensors.remove(&n));
    match (gate, up, down) {
        (Some(g), Some(u), Some(d)) => Ok((g, u, d)),
        _ => Err(Error::invalid(format!(
            "{origin}: layer {l} lacks one of mlp.gate_proj/up_proj/down_proj"
        ))),
    }
}

fn mlp_names(layer: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.mlp");
    [
        format!("{p}.gate_proj.weight"),
        format!("{p}.up_proj.weight"),
        format!("{p}.down_proj.weight"),
    ]
}

fn router_entry(
    opts: &MoeOptions,
    layer: usize,
    h: usize,
    dtype: surgeon_formats::DType,
) -> TensorEntry {
    let e = opts.num_experts;
    let source = match &opts.router {
        RouterInit::Random { std } => Source::Random {
            shape: vec![e, h],
            // Own stream per (seed, layer), away from the small seeds synthetic models use.
            seed: (opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x524F_5554_4552_0000)
                .wrapping_add(layer as u64),
            mean: 0.0,
            std: *std,
        },
        RouterInit::Zeros => Source::Zeros {
            shape: vec![e, h],
            dtype,
        },
        RouterInit::Given { label, rows } => {
            let r = if rows.len() == 1 {
                &rows[0]
            } else {
                &rows[layer]
            };
            Source::inline(
                format!("{label}, layer {layer}"),
                HostTensor::from_f32(vec![e, h], r),
            )
        }
    };
    TensorEntry { source, dtype }
}

/// Sparse upcycling: every layer's MLP becomes `E` identical experts (source clones, no data read),
/// Mixtral routing, router from `opts.router`.
pub fn upcycle(plan: &Plan, opts: &MoeOptions) -> Result<Plan> {
    let mut o = opts.clone();
    o.method = MoeMethod::Upcycle;
    check_request(&plan.arch, &o)?;
    let mut out = plan.clone();
    let h = plan.arch.hidden_size;
    let e = o.num_experts;
    for l in 0..plan.arch.layers.len() {
        let i = dense_width(&plan.arch, l);
        let (gate, up, down) = take_dense_mlp(&mut out, &plan.origin, l)?;
        let q = format!("model.layers.{l}.block_sparse_moe");
        out.tensors.insert(
            format!("{q}.gate.weight"),
            router_entry(&o, l, h, gate.dtype),
        );
        for x in 0..e {
            out.tensors
                .insert(format!("{q}.experts.{x}.w1.weight"), gate.clone());
            out.tensors
                .insert(format!("{q}.experts.{x}.w2.weight"), down.clone());
            out.tensors
                .insert(format!("{q}.experts.{x}.w3.weight"), up.clone());
        }
        out.arch.layers[l].mlp = Mlp::Moe {
            num_experts: e,
            top_k: o.top_k,
            intermediate_size: i,
            routing: MoeRouting::Mixtral,
        };
    }
    out.arch.family = out.arch.family.moe_family();
    out.arch.surgeon.history.push(format!(
        "moe upcycle: {e} copies of each dense MLP, top-{}, router {}",
        o.top_k,
        o.router.describe()
    ));
    out.arch.surgeon.notes.push(format!(
        "Sparse upcycling: every expert of a layer is an exact copy of the dense MLP, so the model computes \
         the dense model's function for any router weights until it is trained. Routing is standard Mixtral \
         (softmax over {e} experts, top-{}, renormalised).",
        o.top_k
    ));
    out.validate()?;
    Ok(out)
}

/// Computes the per-layer partitions for a split method (index sets sorted ascending).
/// `stats` is required by the co-activation and importance methods.
pub fn partitions(
    plan: &Plan,
    opts: &MoeOptions,
    stats: Option<&SplitStats>,
) -> Result<Vec<Vec<Vec<usize>>>> {
    check_request(&plan.arch, opts)?;
    let e = opts.num_experts;
    let n_layers = plan.arch.layers.len();
    let mut out = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let i = dense_width(&plan.arch, l);
        let seed = opts.seed.wrapping_add(1000 * l as u64);
        let parts = match opts.method {
            MoeMethod::Upcycle => {
                return Err(Error::invalid("upcycling does not partition neurons"))
            }
            MoeMethod::SplitRandom => partition_random(i, e, seed),
            MoeMethod::SplitCluster => {
                let name = &mlp_names(l)[1];
                let (shape, up) = plan.load_f32(name)?;
                if shape.len() != 2 || shape[0] != i {
                    return Err(Error::invalid(format!(
                        "`{name}` has shape {shape:?}, expected [{i}, h]"
                    )));
                }
                partition_cluster(&up, i, shape[1], e, seed)
            }
            MoeMethod::SplitCoactivation => match stats {
                Some(SplitStats::Coactivation { features, tokens }) => {
                    let f = layer_stat(features, l, i * tokens, "co-activation features")?;
                    partition_coactivation(f, i, *tokens, e, seed)
                }
                _ => {
                    return Err(Error::invalid(
                        "split-coactivation needs neuron firing statistics from calibration text (`data`)",
                    ))
                }
            },
            MoeMethod::SplitImportance => match stats {
                Some(SplitStats::Importance { scores }) => {
                    let s = layer_stat(scores, l, e * i, "importance scores")?;
                    partition_importance(s, i, e)
                }
                _ => {
                    return Err(Error::invalid(
                        "split-importance needs activation statistics from calibration text (`data`)",
                    ))
                }
            },
        };
        check_partition(&parts, i, e)
            .map_err(|m| Error::invalid(format!("layer {l}: {} partition: {m}", opts.method)))?;
        out.push(parts);
    }
    Ok(out)
}

fn layer_stat<'a>(v: &'a [Vec<f32>], l: usize, len: usize, what: &str) -> Result<&'a [f32]> {
    let s = v.get(l).ok_or_else(|| {
        Error::invalid(format!(
            "{what} given for {} layers, need layer {l}",
            v.len()
        ))
    })?;
    if s.len() != len {
        return Err(Error::invalid(format!(
            "layer {l}: {what} have {} values, expected {len}",
            s.len()
        )));
    }
    Ok(s)
}

/// Expert splitting: computes partitions (see [`partitions`]) and applies them with
/// [`split_with_partitions`].
pub fn split(plan: &Plan, opts: &MoeOptions, stats: Option<&SplitStats>) -> Result<Plan> {
    let parts = partitions(plan, opts, stats)?;
    split_with_partitions(plan, opts, &parts)
}

/// Expert splitting with given partitions (`parts[layer][expert]` = neuron indices): expert e gets
/// rows `idx_e` of `gate_proj`/`up_proj` and columns `idx_e` of `down_proj`. Routing is LLaMA-MoE's
/// `Scaled { E/K }`, or Mixtral with the factor folded into `w2` when `opts.fold_scale`.
pub fn split_with_partitions(
    plan: &Plan,
    opts: &MoeOptions,
    parts: &[Vec<Vec<usize>>],
) -> Result<Plan> {
    check_request(&plan.arch, opts)?;
    if !opts.method.is_split() {
        return Err(Error::invalid("split_with_partitions needs a split method"));
    }
    let e = opts.num_experts;
    let k = opts.top_k;
    let h = plan.arch.hidden_size;
    if parts.len() != plan.arch.layers.len() {
        return Err(Error::invalid(format!(
            "partitions given for {} layers, the model has {}",
            parts.len(),
            plan.arch.layers.len()
        )));
    }
    let scale = e as f64 / k as f64;
    let mut out = plan.clone();
    for (l, layer_parts) in parts.iter().enumerate() {
        let i = dense_width(&plan.arch, l);
        check_partition(layer_parts, i, e)
            .map_err(|m| Error::invalid(format!("layer {l}: {m}")))?;
        let (gate, up, down) = take_dense_mlp(&mut out, &plan.origin, l)?;
        let q = format!("model.layers.{l}.block_sparse_moe");
        out.tensors.insert(
            format!("{q}.gate.weight"),
            router_entry(opts, l, h, gate.dtype),
        );
        for (x, idx) in layer_parts.iter().enumerate() {
            let idx = Arc::new(idx.clone());
            let label = format!("expert {x}");
            let rows = |t: &TensorEntry| TensorEntry {
                source: Source::op(Op::Rows {
                    input: t.source.clone(),
                    indices: idx.clone(),
                    label: label.clone(),
                }),
                dtype: t.dtype,
            };
            let mut w2 = Source::op(Op::Cols {
                input: down.source.clone(),
                indices: idx.clone(),
                label: label.clone(),
            });
            if opts.fold_scale {
                w2 = Source::op(Op::Scale {
                    input: w2,
                    factor: scale as f32,
                });
            }
            out.tensors
                .insert(format!("{q}.experts.{x}.w1.weight"), rows(&gate));
            out.tensors.insert(
                format!("{q}.experts.{x}.w2.weight"),
                TensorEntry {
                    source: w2,
                    dtype: down.dtype,
                },
            );
            out.tensors
                .insert(format!("{q}.experts.{x}.w3.weight"), rows(&up));
        }
        out.arch.layers[l].mlp = Mlp::Moe {
            num_experts: e,
            top_k: k,
            intermediate_size: i / e,
            routing: if opts.fold_scale {
                MoeRouting::Mixtral
            } else {
                MoeRouting::Scaled { scale }
            },
        };
    }
    out.arch.family = out.arch.family.moe_family();
    out.arch.surgeon.history.push(format!(
        "moe {}: FFN neurons of each layer split into {e} experts, top-{k}, router {}, seed {}{}",
        opts.method,
        opts.router.describe(),
        opts.seed,
        if opts.fold_scale {
            format!(", scale {scale} folded into w2")
        } else {
            String::new()
        }
    ));
    let what = format!(
        "Expert splitting (LLaMA-MoE, method {}): the FFN neurons of each layer were partitioned into {e} \
         experts of equal width; with all {e} experts active at weight 1 the layer equals the dense MLP, \
         with top-{k} routing it does not (heal before use).",
        opts.method
    );
    out.arch.surgeon.notes.push(what);
    let routing_note = if opts.fold_scale {
        format!(
            "Routing: LLaMA-MoE multiplies each selected expert's output by E/K = {scale}; here that factor \
             was folded into every expert's w2 (down_proj), so standard Mixtral routing (softmax over {e}, \
             top-{k}, renormalised) in any Mixtral implementation computes the LLaMA-MoE function."
        )
    } else {
        format!(
            "Routing differs from Mixtral: softmax over {e} experts, top-{k}, renormalised, then each selected \
             expert's output is multiplied by E/K = {scale} (LLaMA-MoE). config.json spells this out per \
             layer under `surgeon.layers` (routing scaled); stock transformers MixtralForCausalLM ignores it \
             and computes MoE outputs {scale}x too small. Use surgeon's runtime (eval/generate/heal), or \
             re-run with --fold-scale to fold the factor into w2 for stock Mixtral code."
        )
    };
    out.arch.surgeon.notes.push(routing_note);
    out.validate()?;
    Ok(out)
}

/// Builds the MoE model for `opts.method` (upcycle or split).
pub fn build(plan: &Plan, opts: &MoeOptions, stats: Option<&SplitStats>) -> Result<Plan> {
    match opts.method {
        MoeMethod::Upcycle => upcycle(plan, opts),
        _ => split(plan, opts, stats),
    }
}

/// Checks that `parts` are `e` sets of `i / e` indices each that together partition `0..i`.
pub fn check_partition(
    parts: &[Vec<usize>],
    i: usize,
    e: usize,
) -> std::result::Result<(), String> {
    if parts.len() != e {
        return Err(format!("{} index sets for {e} experts", parts.len()));
    }
    let mut seen = vec![false; i];
    for (x, p) in parts.iter().enumerate() {
        if p.len() * e != i {
            return Err(format!(
                "expert {x} has {} neurons, expected {}",
                p.len(),
                i / e
            ));
        }
        for &j in p {
            if j >= i {
                return Err(format!("neuron {j} out of range 0..{i}"));
            }
            if std::mem::replace(&mut seen[j], true) {
                return Err(format!("neuron {j} assigned twice"));
            }
        }
    }
    Ok(())
}

/// Balanced random partition of `0..i` into `e` sets (seeded shuffle, each set sorted).
pub fn partition_random(i: usize, e: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..i).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let cap = i / e;
    idx.chunks(cap)
        .map(|c| {
            let mut c = c.to_vec();
            c.sort_unstable();
            c
        })
        .collect()
}

/// Balanced clustering of the L2-normalised rows of `up_proj` (`[i, h]` row-major).
pub fn partition_cluster(up: &[f32], i: usize, h: usize, e: usize, seed: u64) -> Vec<Vec<usize>> {
    balanced_kmeans(up, i, h, e, seed, 25)
}

/// Balanced clustering of neuron firing patterns (`[i, t]` row-major): neurons whose patterns have a
/// high cosine similarity (fire on the same tokens) land in the same expert. Neurons that never fire
/// are spread by the balancing step.
pub fn partition_coactivation(
    features: &[f32],
    i: usize,
    t: usize,
    e: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    balanced_kmeans(features, i, t, e, seed, 25)
}

/// Balanced assignment of neurons to experts maximising `scores[e][j]` (`[E, i]` row-major).
pub fn partition_importance(scores: &[f32], i: usize, e: usize) -> Vec<Vec<usize>> {
    balanced_assign(scores, i, e)
}

/// Greedy balanced assignment: all (cluster, point) pairs by decreasing score; a pair is taken when
/// the point is unassigned and the cluster has fewer than `n / k` points. `scores` is `[k, n]`.
/// Ties break by cluster then point index, so the result is deterministic.
pub fn balanced_assign(scores: &[f32], n: usize, k: usize) -> Vec<Vec<usize>> {
    assert_eq!(scores.len(), n * k, "scores must be [k, n]");
    let cap = n / k;
    let mut order: Vec<u32> = (0..(n * k) as u32).collect();
    order.par_sort_unstable_by(|&a, &b| {
        let (sa, sb) = (scores[a as usize], scores[b as usize]);
        sb.total_cmp(&sa).then(a.cmp(&b))
    });
    let mut owner = vec![usize::MAX; n];
    let mut fill = vec![0usize; k];
    let mut left = n;
    for p in order {
        let (c, j) = (p as usize / n, p as usize % n);
        if owner[j] == usize::MAX && fill[c] < cap {
            owner[j] = c;
            fill[c] += 1;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    let mut parts = vec![Vec::with_capacity(cap); k];
    for (j, &c) in owner.iter().enumerate() {
        parts[c].push(j);
    }
    parts
}

fn normalise_rows(x: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d.max(1)).take(n).for_each(|r| {
        let norm = r
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            r.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        }
    });
    out
}

/// Balanced spherical k-means: points (`[n, d]` row-major) are L2-normalised; centroids start at `k`
/// seeded distinct points (k-means++ on cosine distance); each iteration assigns points with
/// [`balanced_assign`] on cosine similarity (capacity n/k each), then recomputes normalised mean
/// centroids, until assignments stop changing or `iters` is reached. Sets are returned sorted.
pub fn balanced_kmeans(
    points: &[f32],
    n: usize,
    d: usize,
    k: usize,
    seed: u64,
    iters: usize,
) -> Vec<Vec<usize>> {
    assert_eq!(points.len(), n * d, "points must be [n, d]");
    assert!(k >= 1 && n.is_multiple_of(k), "k must divide n");
    let x = normalise_rows(points, n, d);
    let row = |j: usize| &x[j * d..(j + 1) * d];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // k-means++ seeding with distance 1 - cos.
    let mut centroids: Vec<f32> = Vec::with_capacity(k * d);
    let first = rand::Rng::random_range(&mut rng, 0..n);
    centroids.extend_from_slice(row(first));
    let mut dist: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|j| (1.0 - dot(row(j), row(first)) as f64).max(0.0))
        .collect();
    for _ in 1..k {
        let total: f64 = dist.iter().sum();
        let pick = if total <= 0.0 {
            rand::Rng::random_range(&mut rng, 0..n)
        } else {
            let mut r = rand::Rng::random::<f64>(&mut rng) * total;
            let mut p = n - 1;
            for (j, w) in dist.iter().enumerate() {
                if r < *w {
                    p = j;
                    break;
                }
                r -= w;
            }
            p
        };
        centroids.extend_from_slice(row(pick));
        let c = row(pick).to_vec();
        dist.par_iter_mut().enumerate().for_each(|(j, dj)| {
            *dj = dj.min((1.0 - dot(row(j), &c) as f64).max(0.0));
        });
    }
    let mut assign: Vec<Vec<usize>> = vec![];
    for _ in 0..iters.max(1) {
        let scores: Vec<f32> = (0..k * n)
            .into_par_iter()
            .map(|p| dot(&centroids[(p / n) * d..(p / n + 1) * d], row(p % n)))
            .collect();
        let next = balanced_assign(&scores, n, k);
        if next == assign {
            break;
        }
        assign = next;
        centroids = assign
            .par_iter()
            .flat_map_iter(|members| {
                let mut c = vec![0f64; d];
                for &j in members {
                    for (a, v) in c.iter_mut().zip(row(j)) {
                        *a += *v as f64;
                    }
                }
                let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
                let norm = if norm > 0.0 { norm } else { 1.0 };
                c.into_iter().map(move |v| (v / norm) as f32)
            })
            .collect();
    }
    assign
}

/// Firing patterns for [`partition_coactivation`] from SwiGLU activations `acts` (`[t, i]` row-major):
/// neuron j fires on token s when `|a[s, j]|` is among the largest `fraction` of that token's
/// magnitudes. Returns `[i, t]` row-major with 1.0 where the neuron fires, 0.0 elsewhere.
pub fn coactivation_features(acts: &[f32], t: usize, i: usize, fraction: f64) -> Vec<f32> {
    assert_eq!(acts.len(), t * i, "activations must be [t, i]");
    let keep = ((i as f64 * fraction).round() as usize).clamp(1, i);
    let fires: Vec<Vec<bool>> = acts
        .par_chunks(i.max(1))
        .map(|row| {
            let mut mags: Vec<f32> = row.iter().map(|v| v.abs()).collect();
            let (_, kth, _) = mags.select_nth_unstable_by(i - keep, |a, b| a.total_cmp(b));
            let thr = *kth;
            row.iter().map(|v| v.abs() >= thr && thr > 0.0).collect()
        })
        .collect();
    let mut out = vec![0f32; i * t];
    for (s, f) in fires.iter().enumerate() {
        for (j, &b) in f.iter().enumerate() {
            if b {
                out[j * t + s] = 1.0;
            }
        }
    }
    out
}

/// Importance scores for [`partition_importance`] (`[E, i]`), LLaMA-MoE's importance split without
/// shared neurons: calibration tokens are grouped by balanced k-means of their MLP inputs
/// (`mlp_input` `[t, h]`; the first `t - t % E` tokens) into `E` groups; the score of neuron j for
/// group e is the mean over the group's tokens of `|a[s, j]|` (`acts` `[t, i]`) times the norm of
/// `down_proj`'s column j (`down_col_norms`), i.e. the mean size of the neuron's contribution.
/// Also returns the groups' normalised mean inputs `[E, h]` (usable as router rows).
#[allow(clippy::too_many_arguments)]
pub fn importance_scores(
    mlp_input: &[f32],
    acts: &[f32],
    down_col_norms: &[f32],
    t: usize,
    h: usize,
    i: usize,
    e: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(mlp_input.len(), t * h, "mlp inputs must be [t, h]");
    assert_eq!(acts.len(), t * i, "activations must be [t, i]");
    assert_eq!(down_col_norms.len(), i);
    let used = t - t % e;
    assert!(used >= e, "need at least {e} calibration tokens");
    let groups = balanced_kmeans(&mlp_input[..used * h], used, h, e, seed, 25);
    let mut scores = vec![0f32; e * i];
    let mut centroids = vec![0f32; e * h];
    for (g, members) in groups.iter().enumerate() {
        let mut acc = vec![0f64; i];
        let mut c = vec![0f64; h];
        for &s in members {
            for (a, v) in acc.iter_mut().zip(&acts[s * i..(s + 1) * i]) {
                *a += v.abs() as f64;
            }
            let x = &mlp_input[s * h..(s + 1) * h];
            let n = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if n > 0.0 {
                c.iter_mut().zip(x).for_each(|(a, v)| *a += *v as f64 / n);
            }
        }
        for j in 0..i {
            scores[g * i + j] = (acc[j] / members.len() as f64) as f32 * down_col_norms[j];
        }
        let n = c.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-30);
        for (k, v) in c.iter().enumerate() {
            centroids[g * h + k] = (v / n) as f32;
        }
    }
    (scores, centroids)
}

/// L2 norms of the columns of `down_proj` (`[h, i]` row-major).
pub fn column_norms(down: &[f32], h: usize, i: usize) -> Vec<f32> {
    let mut acc = vec![0f64; i];
    for r in 0..h {
        for (a, v) in acc.iter_mut().zip(&down[r * i..(r + 1) * i]) {
            *a += (*v as f64) * (*v as f64);
        }
    }
    acc.into_iter().map(|a| a.sqrt() as f32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_partition_is_balanced_and_seeded() {
        let p = partition_random(48, 4, 7);
        check_partition(&p, 48, 4).unwrap();
        assert_eq!(p, partition_random(48, 4, 7));
        assert_ne!(p, partition_random(48, 4, 8));
    }

    #[test]
    fn kmeans_recovers_planted_clusters() {
        // Three well separated directions, 8 points each, shuffled.
        let (n, d, k) = (24, 6, 3);
        let noise = surgeon_formats::plan::random_normal(3, n * d, 0.05);
        let mut pts = vec![0f32; n * d];
        let label = |j: usize| (j * 7) % 3;
        for j in 0..n {
            pts[j * d + label(j)] = 1.0;
            for t in 0..d {
                pts[j * d + t] += noise[j * d + t];
            }
        }
        let parts = balanced_kmeans(&pts, n, d, k, 1, 20);
        check_partition(&parts, n, k).unwrap();
        for p in &parts {
            assert!(p.iter().all(|&j| label(j) == label(p[0])), "{parts:?}");
        }
    }

    #[test]
    fn coactivation_features_mark_the_largest_magnitudes() {
        // 2 tokens, 4 neurons; keep the top half per token.
        let acts = [0.1, -3.0, 2.0, 0.0, 5.0, 0.2, -0.1, -4.0];
        let f = coactivation_features(&acts, 2, 4, 0.5);
        // [i, t]: neuron 0 fires on token 1, neuron 1 on token 0, neuron 2 on token 0, neuron 3 on 1.
        assert_eq!(f, vec![0., 1., 1., 0., 1., 0., 0., 1.]);
    }

    #[test]
    fn importance_follows_token_groups() {
        // Tokens along two directions; neuron j in 0..4 is active only for direction 0 tokens.
        let (t, h, i, e) = (8, 2, 8, 2);
        let mut x = vec![0f32; t * h];
        let mut a = vec![0f32; t * i];
        for s in 0..t {
            let g = s % 2;
            x[s * h + g] = 1.0 + s as f32 * 0.01;
            for j in 0..4 {
                a[s * i + j + 4 * g] = 1.0;
            }
        }
        let (scores, cent) = importance_scores(&x, &a, &[1.0; 8], t, h, i, e, 0);
        let parts = partition_importance(&scores, i, e);
        check_partition(&parts, i, e).unwrap();
        let mut sets = parts.clone();
        sets.sort();
        assert_eq!(sets, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        // The group whose centroid points along direction 0 owns neurons 0..4.
        let g0 = if cent[0] > cent[1] { 0 } else { 1 };
        assert_eq!(parts[g0], vec![0, 1, 2, 3]);
    }

    #[test]
    fn balanced_assign_respects_capacity() {
        // Every point prefers cluster 0.
        let (n, k) = (6, 3);
        let mut s = vec![0f32; n * k];
        for (j, v) in s.iter_mut().take(n).enumerate() {
            *v = 1.0 + j as f32;
        }
        let parts = balanced_assign(&s, n, k);
        check_partition(&parts, n, k).unwrap();
        assert_eq!(parts[0], vec![4, 5]);
    }
}
