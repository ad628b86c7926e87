//! `surgeon importance`, `surgeon prune` and `surgeon search` end to end on a synthetic Llama (4
//! layers, 4 query heads over 2 KV groups, MLP 128, hidden 64) with a word-level tokenizer: the
//! outputs, a front that holds the budget and is mutually non-dominated, the same front for the
//! same seed, `--pick`, and user errors (one line, non-zero exit, nothing written).
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, DType};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The model in `dir/in` and calibration text in `dir/calib.txt`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let spec = SyntheticSpec {
        num_layers: 4,
        vocab_size: 32,
        dtype: DType::F32,
        ..SyntheticSpec::tiny()
    };
    let m = dir.join("in");
    spec.write(&m, None).unwrap();
    let vocab: Vec<String> = (0..32).map(|i| format!("\"w{i}\":{i}")).collect();
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
      "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,
      "decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(m.join("tokenizer.json"), tok).unwrap();
    let data = dir.join("calib.txt");
    let words: Vec<String> = (0..300).map(|i| format!("w{}", (i * 7 + 3) % 32)).collect();
    std::fs::write(&data, words.join(" ")).unwrap();
    (m, data)
}

fn search(m: &Path, data: &Path, out: &Path, budget: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "search".to_string(),
        s(m),
        "--data".into(),
        s(data),
        "--max-tokens".into(),
        "128".into(),
        "--window".into(),
        "64".into(),
        "--budget".into(),
        budget.into(),
        "--population".into(),
        "16".into(),
        "--generations".into(),
        "8".into(),
        "--seed".into(),
        "5".into(),
        "--out".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    surgeon(&refs)
}

#[test]
fn importance_then_prune() {
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let scores = dir.path().join("scores.json");
    ok(&surgeon(&[
        "importance",
        &s(&m),
        "--data",
        &s(&data),
        "--samples",
        "2",
        "--window",
        "64",
        "--out",
        &s(&scores),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&scores).unwrap()).unwrap();
    assert_eq!(v["samples"], 2);
    assert_eq!(v["tokens"], 128);
    assert_eq!(v["layers"][0]["heads"].as_array().unwrap().len(), 4);
    // Not overwritten without --force.
    let again = surgeon(&[
        "importance",
        &s(&m),
        "--data",
        &s(&data),
        "--out",
        &s(&scores),
    ]);
    assert!(!again.status.success());

    let out = dir.path().join("pruned");
    ok(&surgeon(&[
        "prune",
        &s(&m),
        "--scores",
        &s(&scores),
        "--ffn",
        "64",
        "--heads-per-group",
        "1",
        "--drop-layers",
        "1",
        "--out",
        &s(&out),
    ]));
    let p = open_hf_dir(&out).unwrap();
    assert_eq!(p.arch.num_layers(), 3);
    assert!(p.arch.layers.iter().all(|l| l.attention.num_heads == 2
        && l.attention.num_kv_heads == 2
        && l.attention.head_dim == 16));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["head_dim"], 16);

    let x = dir.path().join("x");
    let e = surgeon(&[
        "prune",
        &s(&m),
        "--scores",
        &s(&scores),
        "--kv-heads",
        "3",
        "--out",
        &s(&x),
    ]);
    fails(&e, "--kv-heads 3 must be in 1..=2", &x);
    let e = surgeon(&[
        "prune",
        &s(&m),
        "--scores",
        &s(&scores),
        "--heads-per-group",
        "3",
        "--out",
        &s(&x),
    ]);
    fails(&e, "--heads-per-group 3 must be in 1..=2", &x);
    let e = surgeon(&["prune", &s(&m), "--ffn", "64", "--out", &s(&x)]);
    fails(&e, "--scores", &x);
}

#[test]
fn search_writes_a_front_within_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = setup(dir.path());
    let parent = open_hf_dir(&m).unwrap().parameter_count();
    let budget = parent * 7 / 10;
    let b = format!("params={budget}");
    let out = dir.path().join("s");
    let stdout = ok(&search(&m, &data, &out, &b, &["--pick", "best"]));
    assert!(stdout.contains("chosen"), "{stdout}");
    let front: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("front.json")).unwrap()).unwrap();
    let members = front["members"].as_array().unwrap();
    assert!(!members.is_empty());
    let obj: Vec<(f64, u64)> = members
        .iter()
        .map(|x| {
            (
                x["additive_kl"].as_f64().unwrap(),
                x["params"].as_u64().unwrap(),
            )
        })
        .collect();
    for (i, a) in obj.iter().enumerate() {
        assert!(a.1 <= budget, "member {i} has {} > {budget}", a.1);
        for (j, c) in obj.iter().enumerate() {
            let dominates = a.0 <= c.0 && a.1 <= c.1 && (a.0 < c.0 || a.1 < c.1);
            assert!(i == j || !dominates, "{i} dominates {j}");
        }
    }
    // The search matches the exact optimum of the additive objective.
    let best = obj.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
    let dp = front["dp"]["additive_kl"].as_f64().unwrap();
    assert!((best - dp).abs() < 1e-9, "{best} vs {dp}");
    let chosen = &members[front["chosen"].as_u64().unwrap() as usize];
    assert!(chosen["measured_kl"].as_f64().unwrap() >= 0.0);
    assert!(out.join("front.png").exists());
    let picked = open_hf_dir(&out.join("model")).unwrap();
    assert_eq!(picked.parameter_count(), chosen["params"].as_u64().unwrap());

    // Same seed, same front.
    let again = dir.path().join("s2");
    ok(&search(&m, &data, &again, &b, &[]));
    let front2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.join("front.json")).unwrap()).unwrap();
    let specs = |f: &serde_json::Value| {
        f["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["spec"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(specs(&front), specs(&front2));

    let x = dir.path().join("x");
    fails(
        &search(&m, &data, &x, "params=1000", &[]),
        "below the smallest sub-network",
        &x,
    );
    fails(
        &search(&m, &data, &x, &b, &["--objectives", "kl,flops"]),
        "unknown objective `flops`",
        &x,
    );
    fails(&search(&m, &data, &x, "90M", &[]), "params=N", &x);
}
