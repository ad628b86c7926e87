//! NSGA-II and the exact baseline on small synthetic block libraries: DP equals brute force, the
//! front is feasible and mutually non-dominated, the search matches the DP optimum on the additive
//! objective, a seed fixes the front, and bad budgets and objectives are errors.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use surgeon_search::front::parse_budget;
use surgeon_search::library::{BlockLibrary, BlockOption};
use surgeon_search::nsga::{dominates, dp_optimum, search, Objectives, SearchOptions};
use surgeon_search::{AttentionSpec, MlpSpec};

/// `layers` layers of `options` choices each: option 0 costs most and scores 0, the others
/// random parameters (multiples of 10) and KL.
fn library(layers: usize, options: usize, seed: u64) -> BlockLibrary {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    BlockLibrary {
        fixed_params: 1000,
        layers: (0..layers)
            .map(|_| {
                (0..options)
                    .map(|k| BlockOption {
                        attention: AttentionSpec::NoOp,
                        mlp: MlpSpec::NoOp,
                        kl: if k == 0 {
                            0.0
                        } else {
                            rng.random_range(0.0..1.0)
                        },
                        params: if k == 0 {
                            200
                        } else {
                            10 * rng.random_range(0..20u64)
                        },
                        latency: rng.random_range(0.0..1.0),
                    })
                    .collect()
            })
            .collect(),
    }
}

/// Every choice, enumerated.
fn brute_force(lib: &BlockLibrary, budget: u64) -> Option<f64> {
    let n = lib.layers.len();
    let k = lib.layers[0].len();
    let mut best: Option<f64> = None;
    for code in 0..k.pow(n as u32) {
        let genes: Vec<u8> = (0..n)
            .map(|l| ((code / k.pow(l as u32)) % k) as u8)
            .collect();
        let (kl, params, _) = lib.objectives(&genes);
        if params <= budget && best.is_none_or(|b| kl < b) {
            best = Some(kl);
        }
    }
    best
}

fn opts(budget: u64, objectives: &str, seed: u64) -> SearchOptions {
    SearchOptions {
        budget,
        objectives: Objectives::parse(objectives).unwrap(),
        population: 24,
        generations: 15,
        seed,
        seeds: vec![],
    }
}

#[test]
fn dp_equals_brute_force() {
    for seed in 0..5 {
        let lib = library(5, 4, seed);
        for budget in [1000, 1100, 1300, 1600, 2000] {
            let dp = dp_optimum(&lib, budget).unwrap();
            let bf = brute_force(&lib, budget);
            match (dp, bf) {
                (Some((genes, kl)), Some(want)) => {
                    assert!((kl - want).abs() < 1e-12, "seed {seed} budget {budget}");
                    let (k, p, _) = lib.objectives(&genes);
                    assert!((k - kl).abs() < 1e-12 && p <= budget);
                }
                (None, None) => {}
                other => panic!("seed {seed} budget {budget}: {other:?}"),
            }
        }
    }
    assert_eq!(dp_optimum(&library(3, 3, 0), 999).unwrap(), None);
}

#[test]
fn front_is_feasible_non_dominated_and_matches_the_dp() {
    let lib = library(6, 5, 7);
    let budget = 1500;
    for objectives in ["kl,params", "kl,params,latency"] {
        let (dp_genes, dp_kl) = dp_optimum(&lib, budget).unwrap().unwrap();
        let mut o = opts(budget, objectives, 3);
        o.seeds = vec![dp_genes];
        let r = search(&lib, &o).unwrap();
        assert!(!r.front.is_empty());
        let objs = Objectives::parse(objectives).unwrap();
        for (i, (g, f)) in r.front.iter().enumerate() {
            assert_eq!(f.excess, 0);
            assert!(lib.objectives(g).1 <= budget);
            for (j, (_, h)) in r.front.iter().enumerate() {
                assert!(i == j || !dominates(f, h, objs), "{i} dominates {j}");
            }
        }
        // Matches (cannot beat) the exact optimum of the additive objective.
        let best = r
            .front
            .iter()
            .map(|(_, f)| f.kl)
            .fold(f64::INFINITY, f64::min);
        assert!((best - dp_kl).abs() < 1e-12, "{best} vs {dp_kl}");
    }
    // Unseeded by the DP, the search still finds feasible members; never below the optimum.
    let r = search(&lib, &opts(budget, "kl,params", 1)).unwrap();
    let (_, dp_kl) = dp_optimum(&lib, budget).unwrap().unwrap();
    assert!(r
        .front
        .iter()
        .all(|(_, f)| f.kl >= dp_kl - 1e-12 && f.excess == 0));
}

#[test]
fn the_seed_fixes_the_front() {
    let lib = library(6, 5, 11);
    let a = search(&lib, &opts(1400, "kl,params", 42)).unwrap();
    let b = search(&lib, &opts(1400, "kl,params", 42)).unwrap();
    let genes = |r: &surgeon_search::nsga::SearchResult| {
        r.front.iter().map(|x| x.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(genes(&a), genes(&b));
    assert_eq!(a.evaluated, b.evaluated);
}

#[test]
fn bad_budgets_and_objectives_are_errors() {
    let lib = library(4, 3, 0);
    let e = search(&lib, &opts(lib.min_params() - 1, "kl,params", 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("below the smallest sub-network"), "{e}");
    let e = Objectives::parse("kl,flops").unwrap_err().to_string();
    assert!(e.contains("unknown objective `flops`"), "{e}");
    assert!(Objectives::parse("params").is_err());
    assert_eq!(parse_budget("params=90M").unwrap(), 90_000_000);
    assert_eq!(parse_budget("params=1.5B").unwrap(), 1_500_000_000);
    assert_eq!(parse_budget("params=120000").unwrap(), 120_000);
    assert!(parse_budget("latency=3").is_err());
    assert!(parse_budget("params=-5M").is_err());
}
