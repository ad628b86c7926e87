//! Multi-objective search over one block choice per layer (LLaMA-NAS, arXiv 2405.18377): NSGA-II
//! (non-dominated sorting with crowding distance, Deb et al. 2002) as a genetic-rs `Eliminator`
//! and `Repopulator`, with constrained domination for the parameter budget (a feasible candidate
//! beats an infeasible one; of two infeasible ones the smaller excess wins), memoised objectives
//! and a seeded ChaCha RNG (genetic-rs's own operators draw from an unseedable RNG), and the exact
//! baseline: dynamic programming over the additive block scores under the budget.
use crate::error::{invalid, Result};
use crate::library::BlockLibrary;
use genetic_rs::prelude::{Eliminator, GeneticSim, Repopulator};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which objectives the search minimises (additive KL always; parameters and latency optional).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Objectives {
    pub params: bool,
    pub latency: bool,
}

impl Objectives {
    /// Parses `kl,params` or `kl,params,latency` (any order; `kl` required).
    pub fn parse(text: &str) -> Result<Self> {
        let mut o = Objectives {
            params: false,
            latency: false,
        };
        let mut kl = false;
        for w in text.split(',').map(str::trim) {
            match w {
                "kl" => kl = true,
                "params" => o.params = true,
                "latency" => o.latency = true,
                other => {
                    return invalid(format!(
                        "unknown objective `{other}` in `objectives` (known: kl, params, latency)"
                    ))
                }
            }
        }
        if !kl {
            return invalid("`objectives` must include kl (the quality objective)");
        }
        Ok(o)
    }
}

/// A candidate's objective values and budget excess.
#[derive(Clone, Debug, PartialEq)]
pub struct Fitness {
    pub kl: f64,
    pub params: u64,
    pub latency: f64,
    /// Parameters over the budget (0 when feasible).
    pub excess: u64,
}

impl Fitness {
    fn values(&self, o: Objectives) -> Vec<f64> {
        let mut v = vec![self.kl];
        if o.params {
            v.push(self.params as f64);
        }
        if o.latency {
            v.push(self.latency);
        }
        v
    }
}

/// Constrained domination: does `a` dominate `b`?
pub fn dominates(a: &Fitness, b: &Fitness, o: Objectives) -> bool {
    match (a.excess, b.excess) {
        (0, 0) => {
            let (va, vb) = (a.values(o), b.values(o));
            va.iter().zip(&vb).all(|(x, y)| x <= y) && va.iter().zip(&vb).any(|(x, y)| x < y)
        }
        (0, _) => true,
        (_, 0) => false,
        (ea, eb) => ea < eb,
    }
}

/// Fronts of non-dominated sorting: indices into `f`, best front first.
pub fn non_dominated_sort(f: &[Fitness], o: Objectives) -> Vec<Vec<usize>> {
    let n = f.len();
    let mut dominated_by = vec![0usize; n];
    let mut dominates_list = vec![vec![]; n];
    for i in 0..n {
        for j in 0..n {
            if i != j && dominates(&f[i], &f[j], o) {
                dominates_list[i].push(j);
            } else if i != j && dominates(&f[j], &f[i], o) {
                dominated_by[i] += 1;
            }
        }
    }
    let mut fronts = vec![];
    let mut current: Vec<usize> = (0..n).filter(|&i| dominated_by[i] == 0).collect();
    while !current.is_empty() {
        let mut next = vec![];
        for &i in &current {
            for &j in &dominates_list[i] {
                dominated_by[j] -= 1;
                if dominated_by[j] == 0 {
                    next.push(j);
                }
            }
        }
        fronts.push(current);
        current = next;
    }
    fronts
}

/// Crowding distance of each member of one front (infinite at the ends of every objective).
pub fn crowding(f: &[Fitness], front: &[usize], o: Objectives) -> Vec<f64> {
    let mut d = vec![0.0; front.len()];
    let m = f[front[0]].values(o).len();
    for k in 0..m {
        let mut order: Vec<usize> = (0..front.len()).collect();
        let val = |i: usize| f[front[i]].values(o)[k];
        order.sort_by(|&a, &b| val(a).total_cmp(&val(b)));
        let (lo, hi) = (val(order[0]), val(order[order.len() - 1]));
        d[order[0]] = f64::INFINITY;
        d[order[order.len() - 1]] = f64::INFINITY;
        if hi > lo {
            for w in 1..order.len().saturating_sub(1) {
                d[order[w]] += (val(order[w + 1]) - val(order[w - 1])) / (hi - lo);
            }
        }
    }
    d
}

/// One genome: a block choice per layer, with its rank and crowding after elimination.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub genes: Vec<u8>,
    rank: usize,
    crowd: f64,
}

/// Memoised objectives shared by the eliminator and the caller.
pub struct Evaluator<'a> {
    pub library: &'a BlockLibrary,
    pub budget: u64,
    pub memo: HashMap<Vec<u8>, Fitness>,
}

impl Evaluator<'_> {
    pub fn fitness(&mut self, genes: &[u8]) -> Fitness {
        if let Some(f) = self.memo.get(genes) {
            return f.clone();
        }
        let (kl, params, latency) = self.library.objectives(genes);
        let f = Fitness {
            kl,
            params,
            latency,
            excess: params.saturating_sub(self.budget),
        };
        self.memo.insert(genes.to_vec(), f.clone());
        f
    }
}

/// NSGA-II survivor selection: distinct genomes, by front then crowding, half the population.
struct Nsga2Eliminator<'a> {
    eval: Arc<Mutex<Evaluator<'a>>>,
    objectives: Objectives,
}

impl Eliminator<Candidate> for Nsga2Eliminator<'_> {
    fn eliminate(&mut self, genomes: Vec<Candidate>) -> Vec<Candidate> {
        let keep = genomes.len().div_ceil(2).max(1);
        let mut seen = std::collections::HashSet::new();
        let mut pop: Vec<Candidate> = genomes
            .into_iter()
            .filter(|c| seen.insert(c.genes.clone()))
            .collect();
        let f: Vec<Fitness> = {
            let mut e = self.eval.lock().expect("evaluator lock");
            pop.iter().map(|c| e.fitness(&c.genes)).collect()
        };
        for (rank, front) in non_dominated_sort(&f, self.objectives).iter().enumerate() {
            for (i, d) in front.iter().zip(crowding(&f, front, self.objectives)) {
                pop[*i].rank = rank;
                pop[*i].crowd = d;
            }
        }
        pop.sort_by(|a, b| a.rank.cmp(&b.rank).then(b.crowd.total_cmp(&a.crowd)));
        pop.truncate(keep);
        pop
    }
}

/// Binary tournaments (rank, then crowding), uniform crossover, per-gene mutation at rate 1/L.
struct SeededRepopulator {
    rng: ChaCha8Rng,
    options: Vec<u8>,
}

impl SeededRepopulator {
    fn tournament<'c>(&mut self, pop: &'c [Candidate]) -> &'c Candidate {
        let a = &pop[self.rng.random_range(0..pop.len())];
        let b = &pop[self.rng.random_range(0..pop.len())];
        let a_wins = a.rank < b.rank || (a.rank == b.rank && a.crowd >= b.crowd);
        if a_wins {
            a
        } else {
            b
        }
    }
}

impl Repopulator<Candidate> for SeededRepopulator {
    fn repopulate(&mut self, genomes: &mut Vec<Candidate>, target: usize) {
        let parents = genomes.clone();
        let rate = 1.0 / self.options.len().max(1) as f64;
        while genomes.len() < target {
            let (x, y) = (self.tournament(&parents), self.tournament(&parents));
            let (x, y) = (x.genes.clone(), y.genes.clone());
            let genes: Vec<u8> = (0..x.len())
                .map(|l| {
                    let g = if self.rng.random_bool(0.5) {
                        x[l]
                    } else {
                        y[l]
                    };
                    match self.rng.random_bool(rate) {
                        true => self.rng.random_range(0..self.options[l]),
                        false => g,
                    }
                })
                .collect();
            genomes.push(Candidate {
                genes,
                rank: usize::MAX,
                crowd: 0.0,
            });
        }
    }
}

/// What [`search`] found: the feasible non-dominated choices (distinct, by additive KL) and how
/// many distinct candidates it scored.
#[derive(Clone, Debug)]
pub struct SearchResult {
    pub front: Vec<(Vec<u8>, Fitness)>,
    pub evaluated: usize,
}

/// Settings of [`search`].
#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub budget: u64,
    pub objectives: Objectives,
    pub population: usize,
    pub generations: usize,
    pub seed: u64,
    /// Genomes placed in the first population (e.g. the DP optimum, the parent).
    pub seeds: Vec<Vec<u8>>,
}

/// NSGA-II over `library` under the parameter budget. Same options and seed, same front.
pub fn search(library: &BlockLibrary, opts: &SearchOptions) -> Result<SearchResult> {
    if library.min_params() > opts.budget {
        return invalid(format!(
            "`budget` {} is below the smallest sub-network the library can build ({} parameters)",
            opts.budget,
            library.min_params()
        ));
    }
    if opts.population < 2 {
        return invalid("`population` must be at least 2");
    }
    let options: Vec<u8> = library.layers.iter().map(|o| o.len() as u8).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut start: Vec<Candidate> = opts
        .seeds
        .iter()
        .take(opts.population)
        .map(|g| Candidate {
            genes: g.clone(),
            rank: 0,
            crowd: 0.0,
        })
        .collect();
    while start.len() < opts.population {
        let genes = options.iter().map(|&k| rng.random_range(0..k)).collect();
        start.push(Candidate {
            genes,
            rank: 0,
            crowd: 0.0,
        });
    }
    let eval = Arc::new(Mutex::new(Evaluator {
        library,
        budget: opts.budget,
        memo: HashMap::new(),
    }));
    let elim = Nsga2Eliminator {
        eval: eval.clone(),
        objectives: opts.objectives,
    };
    let repop = SeededRepopulator { rng, options };
    let mut sim = GeneticSim::new(start, elim, repop);
    sim.perform_generations(opts.generations);
    let mut e = eval.lock().expect("evaluator lock");
    let mut all: Vec<(Vec<u8>, Fitness)> =
        e.memo.iter().map(|(g, f)| (g.clone(), f.clone())).collect();
    for c in &sim.genomes {
        all.push((c.genes.clone(), e.fitness(&c.genes)));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.dedup_by(|a, b| a.0 == b.0);
    let f: Vec<Fitness> = all.iter().map(|x| x.1.clone()).collect();
    let first = non_dominated_sort(&f, opts.objectives).swap_remove(0);
    let mut front: Vec<(Vec<u8>, Fitness)> = first
        .into_iter()
        .map(|i| all[i].clone())
        .filter(|(_, f)| f.excess == 0)
        .collect();
    front.sort_by(|a, b| a.1.kl.total_cmp(&b.1.kl).then(a.0.cmp(&b.0)));
    Ok(SearchResult {
        front,
        evaluated: e.memo.len(),
    })
}

/// The exact optimum of the additive objective: the choice per layer of least total KL whose
/// parameters fit `budget` (a multiple-choice knapsack, solved by dynamic programming over
/// parameters in units of their greatest common divisor). `None` when nothing fits.
pub fn dp_optimum(library: &BlockLibrary, budget: u64) -> Result<Option<(Vec<u8>, f64)>> {
    if budget < library.fixed_params {
        return Ok(None);
    }
    let unit = library
        .layers
        .iter()
        .flatten()
        .fold(0u64, |g, o| gcd(g, o.params))
        .max(1);
    let cap = ((budget - library.fixed_params) / unit) as usize;
    let cells = cap.saturating_add(1).saturating_mul(library.layers.len());
    if cells > 400_000_000 {
        return invalid(format!(
            "the budget is {cap} units of {unit} parameters: too fine for the exact baseline"
        ));
    }
    let mut best = vec![0.0f64; cap + 1];
    let mut choice = vec![vec![u8::MAX; cap + 1]; library.layers.len()];
    for (l, opts) in library.layers.iter().enumerate() {
        let mut next = vec![f64::INFINITY; cap + 1];
        for c in 0..=cap {
            for (k, o) in opts.iter().enumerate() {
                let w = (o.params / unit) as usize;
                if w <= c && best[c - w] + o.kl < next[c] {
                    next[c] = best[c - w] + o.kl;
                    choice[l][c] = k as u8;
                }
            }
        }
        best = next;
    }
    if !best[cap].is_finite() {
        return Ok(None);
    }
    let mut genes = vec![0u8; library.layers.len()];
    let mut c = cap;
    for l in (0..library.layers.len()).rev() {
        let k = choice[l][c];
        genes[l] = k;
        c -= (library.layers[l][k as usize].params / unit) as usize;
    }
    Ok(Some((genes, best[cap])))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
