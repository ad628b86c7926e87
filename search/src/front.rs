//! `surgeon search` as a library call: block library, exact DP baseline, NSGA-II, re-measured KL
//! of the best candidates with the whole sub-network, and the Pareto front as plain data
//! (`front.json`).
use crate::error::{invalid, Result};
use crate::library::{build_library, kl_per_token, BlockLibrary};
use crate::nsga::{dp_optimum, search, Objectives, SearchOptions};
use crate::prune::{prune, PruneSpec};
use serde::Serialize;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::model::{log_softmax, Llama};
use surgeon_formats::{ImportanceScores, Plan};

/// One sub-network of the front.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    pub spec: PruneSpec,
    pub params: u64,
    /// Sum of the blocks' measured layer times (seconds per calibration pass).
    pub latency_s: f64,
    /// Sum of the blocks' KL scores (each measured alone in the parent).
    pub additive_kl: f64,
    /// KL(parent || sub-network) per token, measured with the whole sub-network.
    pub measured_kl: Option<f64>,
}

/// What `front.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct FrontReport {
    pub model: String,
    pub budget_params: u64,
    pub parent_params: u64,
    pub objectives: String,
    pub seed: u64,
    pub population: usize,
    pub generations: usize,
    /// Distinct candidates scored by the search (memoised).
    pub evaluated: usize,
    pub calibration_tokens: usize,
    /// The exact optimum of the additive objective under the budget.
    pub dp: Member,
    /// Feasible non-dominated sub-networks, by additive KL.
    pub members: Vec<Member>,
    /// Index in `members` of the re-measured member of least measured KL.
    pub chosen: usize,
}

/// Settings of [`run`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub budget: u64,
    pub objectives: String,
    pub population: usize,
    pub generations: usize,
    pub seed: u64,
    /// Front members (those nearest the budget) re-measured with the whole sub-network.
    pub remeasure: usize,
}

fn member(lib: &BlockLibrary, hidden: usize, genes: &[u8]) -> Member {
    let (kl, params, latency) = lib.objectives(genes);
    Member {
        spec: lib.spec(hidden, genes),
        params,
        latency_s: latency,
        additive_kl: kl,
        measured_kl: None,
    }
}

/// Builds the library, searches, and re-measures; `progress(what, done, total)` reports phases.
pub fn run<B: Backend>(
    plan: &Plan,
    scores: &ImportanceScores,
    windows: &[&[u32]],
    opts: &RunOptions,
    device: &B::Device,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(FrontReport, BlockLibrary)> {
    let objectives = Objectives::parse(&opts.objectives)?;
    let floor = crate::library::fixed_params(&plan.arch);
    if floor > opts.budget {
        return invalid(format!(
            "`budget` {} is below the smallest sub-network: embeddings and final norm alone have {floor} parameters",
            opts.budget
        ));
    }
    let lib = build_library::<B>(plan, scores, windows, device, &mut |d, n| {
        progress("block library", d, n)
    })?;
    if lib.min_params() > opts.budget {
        return invalid(format!(
            "`budget` {} is below the smallest sub-network the library can build ({} parameters)",
            opts.budget,
            lib.min_params()
        ));
    }
    let hidden = plan.arch.hidden_size;
    let Some((dp_genes, _)) = dp_optimum(&lib, opts.budget)? else {
        return invalid(format!("nothing fits the `budget` of {}", opts.budget));
    };
    let parent_genes = vec![0u8; lib.layers.len()];
    let found = search(
        &lib,
        &SearchOptions {
            budget: opts.budget,
            objectives,
            population: opts.population,
            generations: opts.generations,
            seed: opts.seed,
            seeds: vec![dp_genes.clone(), parent_genes],
        },
    )?;
    let mut members: Vec<Member> = found
        .front
        .iter()
        .map(|(g, _)| member(&lib, hidden, g))
        .collect();
    let mut dp = member(&lib, hidden, &dp_genes);
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| members[b].params.cmp(&members[a].params).then(a.cmp(&b)));
    order.truncate(opts.remeasure.max(1));
    let mut specs: Vec<PruneSpec> = order.iter().map(|&i| members[i].spec.clone()).collect();
    specs.push(dp.spec.clone());
    let kls = measured_kl::<B>(plan, scores, &specs, windows, device, &mut |d, n| {
        progress("re-measuring", d, n)
    })?;
    for (&i, &kl) in order.iter().zip(&kls) {
        members[i].measured_kl = Some(kl);
    }
    dp.measured_kl = kls.last().copied();
    let chosen = order
        .iter()
        .copied()
        .min_by(|&a, &b| {
            let k = |i: usize| members[i].measured_kl.unwrap_or(f64::INFINITY);
            k(a).total_cmp(&k(b))
        })
        .unwrap_or(0);
    let report = FrontReport {
        model: plan.origin.clone(),
        budget_params: opts.budget,
        parent_params: plan.parameter_count(),
        objectives: opts.objectives.clone(),
        seed: opts.seed,
        population: opts.population,
        generations: opts.generations,
        evaluated: found.evaluated,
        calibration_tokens: windows.iter().map(|w| w.len()).sum(),
        dp,
        members,
        chosen,
    };
    Ok((report, lib))
}

/// KL(parent || sub-network) per token of each spec, whole sub-networks on the windows.
pub fn measured_kl<B: Backend>(
    plan: &Plan,
    scores: &ImportanceScores,
    specs: &[PruneSpec],
    windows: &[&[u32]],
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let tensor = |w: &[u32]| {
        let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, w.len()]), device)
    };
    let parent = Llama::<B>::from_plan(plan, device)?;
    let logp: Vec<Tensor<B, 3>> = windows
        .iter()
        .map(|w| log_softmax(parent.forward(tensor(w)), 2))
        .collect();
    drop(parent);
    let mut out = vec![];
    for (k, spec) in specs.iter().enumerate() {
        let sub = Llama::<B>::from_plan(&prune(plan, spec, Some(scores))?, device)?;
        let total: f64 = windows
            .iter()
            .zip(&logp)
            .map(|(w, p)| kl_per_token(p, sub.forward(tensor(w))))
            .sum();
        out.push(total / windows.len() as f64);
        progress(k + 1, specs.len());
    }
    Ok(out)
}

/// Parses `params=90M` (suffixes K, M, B; plain numbers too) into a parameter count.
pub fn parse_budget(text: &str) -> Result<u64> {
    let Some(v) = text.strip_prefix("params=") else {
        return invalid(format!(
            "`budget` `{text}`: expected params=N (e.g. params=90M)"
        ));
    };
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1e3),
        Some('M' | 'm') => (&v[..v.len() - 1], 1e6),
        Some('B' | 'b' | 'G' | 'g') => (&v[..v.len() - 1], 1e9),
        _ => (v, 1.0),
    };
    match num.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok((x * mult).round() as u64),
        _ => invalid(format!("`budget` `{text}`: `{v}` is not a positive number")),
    }
}
