//! CLOVER on synthetic checkpoints: at full rank every query head's value-output product is
//! unchanged (biases too) and each head is in its singular basis, sorted; pruning keeps the
//! leading directions with the error the spectrum predicts; bad requests are refused.
use surgeon_convert::clover::energy_rank;
use surgeon_convert::{clover, CloverOptions, InputStats, VoRank};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{Family, Plan};

/// Qwen2-style (value biases), 6 query heads over 2 key/value heads of size 8, hidden 48.
fn model() -> Plan {
    SyntheticSpec {
        family: Family::Qwen2,
        hidden_size: 48,
        num_heads: 6,
        num_kv_heads: 2,
        ..SyntheticSpec::tiny()
    }
    .plan()
}

const H: usize = 48;

struct Attn {
    d: usize,
    heads: usize,
    kv: usize,
    v: Vec<f32>,
    bias: Vec<f32>,
    o: Vec<f32>,
}

fn attn(plan: &Plan, l: usize) -> Attn {
    let a = &plan.arch.layers[l].attention;
    let p = format!("model.layers.{l}.self_attn");
    Attn {
        d: a.v_head_dim,
        heads: a.num_heads,
        kv: a.num_kv_heads,
        v: plan.load_f32(&format!("{p}.v_proj.weight")).unwrap().1,
        bias: plan.load_f32(&format!("{p}.v_proj.bias")).unwrap().1,
        o: plan.load_f32(&format!("{p}.o_proj.weight")).unwrap().1,
    }
}

impl Attn {
    /// Query head `q`'s map from `[x; 1]` to its output: `W_o^q [W_v^g | b_v^g]`, `H x (H+1)`.
    fn product(&self, q: usize) -> Vec<f64> {
        let g = q / (self.heads / self.kv);
        let o_dim = self.heads * self.d;
        let mut p = vec![0f64; H * (H + 1)];
        for r in 0..H {
            for c in 0..=H {
                let mut s = 0f64;
                for j in 0..self.d {
                    let vrow = g * self.d + j;
                    let v = if c < H {
                        self.v[vrow * H + c]
                    } else {
                        self.bias[vrow]
                    };
                    s += self.o[r * o_dim + q * self.d + j] as f64 * v as f64;
                }
                p[r * (H + 1) + c] = s;
            }
        }
        p
    }
    /// `W_v W_v^T` entry (i, j) within head `g` (value rows with the bias column).
    fn gram(&self, g: usize, i: usize, j: usize) -> f64 {
        let (a, b) = (g * self.d + i, g * self.d + j);
        let mut s = self.bias[a] as f64 * self.bias[b] as f64;
        for c in 0..H {
            s += self.v[a * H + c] as f64 * self.v[b * H + c] as f64;
        }
        s
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn full_rank_keeps_every_head_product_and_sorts_directions() {
    let plan = model();
    let (out, report) = clover(&plan, &CloverOptions::default(), None).unwrap();
    assert_eq!(out.arch.layers, plan.arch.layers);
    assert_eq!(report.heads.len(), 2 * 2);
    for l in 0..2 {
        let (before, after) = (attn(&plan, l), attn(&out, l));
        for q in 0..6 {
            let (p0, p1) = (before.product(q), after.product(q));
            let scale = p0.iter().fold(0f64, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(&p0, &p1);
            assert!(
                diff <= 1e-5 * scale,
                "layer {l} head {q}: {diff} of {scale}"
            );
        }
        for g in 0..2 {
            let head = &report.heads[l * 2 + g];
            let s = &head.singular_values;
            assert_eq!((head.layer, head.kv_head, head.kept), (l, g, 8));
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "{s:?}");
            assert!(s[7] > 0.0 && (head.energy_kept() - 1.0).abs() < 1e-12);
            // In the singular basis the value rows are orthogonal with squared norms sigma
            // (S^1/2 V^T (S^1/2 V^T)^T = S).
            for i in 0..8 {
                for j in 0..8 {
                    let want = if i == j { s[i] } else { 0.0 };
                    let got = after.gram(g, i, j);
                    assert!(
                        (got - want).abs() < 1e-5 * s[0],
                        "({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
    // The other tensors are untouched (same sources).
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(plan.load_f32(q).unwrap(), out.load_f32(q).unwrap());
    let text = out.render();
    assert!(
        text.contains("history: clover: value-output SVD per KV head (weights only), full rank"),
        "{text}"
    );
}

/// Frobenius norm of the group's stacked product difference, over all layers' first group.
fn group_error(before: &Attn, after: &Attn, g: usize) -> f64 {
    let per = before.heads / before.kv;
    let mut s = 0.0;
    for q in g * per..(g + 1) * per {
        let (a, b) = (before.product(q), after.product(q));
        s += a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    }
    s.sqrt()
}

#[test]
fn pruning_keeps_leading_directions_with_the_predicted_error() {
    let plan = model();
    let opts = CloverOptions {
        rank: VoRank::Rank(5),
        ..Default::default()
    };
    let (out, report) = clover(&plan, &opts, None).unwrap();
    for l in 0..2 {
        let a = &out.arch.layers[l].attention;
        assert_eq!((a.head_dim, a.v_head_dim), (8, 5));
        let p = format!("model.layers.{l}.self_attn");
        assert_eq!(
            out.get(&format!("{p}.v_proj.weight")).unwrap().shape(),
            [10, H]
        );
        assert_eq!(out.get(&format!("{p}.v_proj.bias")).unwrap().shape(), [10]);
        assert_eq!(
            out.get(&format!("{p}.o_proj.weight")).unwrap().shape(),
            [H, 30]
        );
        let (before, after) = (attn(&plan, l), attn(&out, l));
        for g in 0..2 {
            let head = &report.heads[l * 2 + g];
            assert_eq!(head.kept, 5);
            let want = head.dropped_norm();
            let got = group_error(&before, &after, g);
            assert!(
                want > 0.0 && (got - want).abs() < 1e-5 * want,
                "{got} vs {want}"
            );
        }
    }
    // Value-output pruning shrinks the KV cache by the values only: 2 layers x 2 heads x 3.
    assert_eq!(
        plan.arch.kv_cache_values_per_token() - out.arch.kv_cache_values_per_token(),
        12
    );
    let saved = 2 * (2 * 3 * (H + 1) + H * 6 * 3);
    assert_eq!(plan.parameter_count() - out.parameter_count(), saved as u64);

    // --pad: the same function in the original shapes.
    let padded = CloverOptions { pad: true, ..opts };
    let (pad, _) = clover(&plan, &padded, None).unwrap();
    assert_eq!(pad.arch.layers, plan.arch.layers);
    for l in 0..2 {
        let (a, b) = (attn(&out, l), attn(&pad, l));
        for q in 0..6 {
            assert!(max_abs_diff(&a.product(q), &b.product(q)) < 1e-7);
        }
        // Pruned rows are zero.
        assert!(b.v[5 * H..8 * H].iter().all(|&x| x == 0.0));
    }
    assert!(pad
        .arch
        .surgeon
        .notes
        .iter()
        .any(|n| n.contains("no memory is saved")));
}

#[test]
fn ratio_and_energy_choose_ranks() {
    let plan = model();
    let run = |rank| {
        clover(
            &plan,
            &CloverOptions {
                rank,
                ..Default::default()
            },
            None,
        )
        .unwrap()
    };
    let (out, _) = run(VoRank::Prune(0.25));
    assert_eq!(out.arch.layers[0].attention.v_head_dim, 6);
    let (out, _) = run(VoRank::Prune(0.5));
    assert_eq!(out.arch.layers[1].attention.v_head_dim, 4);
    let (_, full) = run(VoRank::Full);
    let (out, report) = run(VoRank::Energy(0.8));
    for l in 0..2 {
        // A layer keeps what its most demanding head needs; every head reaches 0.8.
        let need = (0..2)
            .map(|g| energy_rank(&full.heads[l * 2 + g].singular_values, 0.8))
            .max()
            .unwrap();
        assert_eq!(out.arch.layers[l].attention.v_head_dim, need);
        assert!(need < 8);
    }
    assert!(report.heads.iter().all(|h| h.energy_kept() >= 0.8));
}

/// Per-layer statistics of random inputs with very different scales per feature (a stand-in for
/// massive activations), and those inputs.
fn stats(tokens: usize) -> (Vec<InputStats>, Vec<Vec<f64>>) {
    let noise = surgeon_formats::plan::random_normal(7, tokens * H, 1.0);
    let xs: Vec<Vec<f64>> = noise
        .chunks(H)
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, &z)| {
                    let scale = if i % 7 == 0 { 20.0 } else { 0.5 };
                    scale * z as f64 + 0.1
                })
                .collect()
        })
        .collect();
    let mut s = InputStats {
        tokens,
        sum_outer: vec![0.0; H * H],
        sum: vec![0.0; H],
    };
    for x in &xs {
        for i in 0..H {
            s.sum[i] += x[i];
            for j in 0..H {
                s.sum_outer[i * H + j] += x[i] * x[j];
            }
        }
    }
    (vec![s.clone(), s], xs)
}

/// Squared output error of the first group on inputs `xs`.
fn output_error(before: &Attn, after: &Attn, xs: &[Vec<f64>]) -> f64 {
    let mut e = 0.0;
    for q in 0..3 {
        let (a, b) = (before.product(q), after.product(q));
        for x in xs {
            for r in 0..H {
                let mut y = a[r * (H + 1) + H] - b[r * (H + 1) + H];
                for c in 0..H {
                    y += (a[r * (H + 1) + c] - b[r * (H + 1) + c]) * x[c];
                }
                e += y * y;
            }
        }
    }
    e
}

#[test]
fn data_aware_is_exact_at_full_rank_and_beats_weights_only_on_its_data() {
    let plan = model();
    let (st, xs) = stats(200);
    let (full, report) = clover(&plan, &CloverOptions::default(), Some(&st)).unwrap();
    assert!(report.data_aware);
    for q in 0..6 {
        let (a, b) = (attn(&plan, 0).product(q), attn(&full, 0).product(q));
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(max_abs_diff(&a, &b) <= 1e-5 * scale);
    }
    let opts = CloverOptions {
        rank: VoRank::Rank(3),
        ..Default::default()
    };
    let (aware, report) = clover(&plan, &opts, Some(&st)).unwrap();
    let (plain, _) = clover(&plan, &opts, None).unwrap();
    let before = attn(&plan, 0);
    let e_aware = output_error(&before, &attn(&aware, 0), &xs);
    let e_plain = output_error(&before, &attn(&plain, 0), &xs);
    // The whitened spectrum predicts the error on the calibration tokens (up to the 1e-6 ridge).
    let want = report.heads[0].dropped_norm().powi(2) * xs.len() as f64;
    assert!((e_aware - want).abs() < 1e-3 * want, "{e_aware} vs {want}");
    assert!(e_aware < e_plain, "{e_aware} vs {e_plain}");
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let plan = model();
    let err = |opts: CloverOptions| clover(&plan, &opts, None).err().unwrap().to_string();
    let with = |rank| CloverOptions {
        rank,
        ..Default::default()
    };
    for r in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
        let e = err(with(VoRank::Prune(r)));
        assert!(e.contains("`prune_vo`") && e.contains("(0, 1)"), "{e}");
    }
    for r in [0, 9] {
        let e = err(with(VoRank::Rank(r)));
        assert!(e.contains("`vo_rank`") && e.contains("1..=8"), "{e}");
    }
    for e in [0.0, 1.01] {
        let e = err(with(VoRank::Energy(e)));
        assert!(e.contains("`energy`") && e.contains("(0, 1]"), "{e}");
    }
    let e = err(CloverOptions {
        qk: true,
        ..Default::default()
    });
    assert!(e.contains("`qk`") && e.contains("RoPE"), "{e}");
    let (st, _) = stats(4);
    let e = clover(&plan, &CloverOptions::default(), Some(&st[..1]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cover 1 layers but the model has 2"), "{e}");
}

#[test]
fn channel_baselines_keep_original_channels() {
    use surgeon_convert::clover::{prune_vo_channels, ChannelOrder};
    let plan = model();
    for order in [ChannelOrder::Magnitude, ChannelOrder::Random { seed: 3 }] {
        let out = prune_vo_channels(&plan, 0.25, order).unwrap();
        let (before, after) = (attn(&plan, 1), attn(&out, 1));
        assert_eq!(after.d, 6);
        for g in 0..2 {
            // Each kept row is one of the head's original rows, and each query head of the group
            // reads the same channels from o_proj: the product is the sum of the kept rank-one terms.
            let kept: Vec<usize> = (0..6)
                .map(|i| {
                    let row = &after.v[(g * 6 + i) * H..(g * 6 + i + 1) * H];
                    (0..8)
                        .find(|&j| &before.v[(g * 8 + j) * H..(g * 8 + j + 1) * H] == row)
                        .expect("an original row")
                })
                .collect();
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
            for q in g * 3..(g + 1) * 3 {
                for r in 0..H {
                    for (i, &j) in kept.iter().enumerate() {
                        assert_eq!(after.o[r * 36 + q * 6 + i], before.o[r * 48 + q * 8 + j]);
                    }
                }
            }
            if order == ChannelOrder::Magnitude {
                let score = |j: usize| {
                    let v: f64 = (0..H)
                        .map(|c| (before.v[(g * 8 + j) * H + c] as f64).powi(2))
                        .sum();
                    let o: f64 = (0..H)
                        .flat_map(|r| (g * 3..g * 3 + 3).map(move |q| (r, q)))
                        .map(|(r, q)| (before.o[r * 48 + q * 8 + j] as f64).powi(2))
                        .sum();
                    v * o
                };
                let dropped_best = (0..8)
                    .filter(|j| !kept.contains(j))
                    .map(score)
                    .fold(0.0, f64::max);
                let kept_worst = kept.iter().map(|&j| score(j)).fold(f64::MAX, f64::min);
                assert!(kept_worst >= dropped_best);
            }
        }
    }
    assert!(prune_vo_channels(&plan, 1.0, ChannelOrder::Magnitude).is_err());
}
