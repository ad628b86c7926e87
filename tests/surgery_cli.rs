//! `surgeon upscale`, `surgeon expand` and `surgeon drop-layers` end to end: outputs, dry runs, and
//! every user error (one line on stderr, non-zero exit, nothing written).
mod common;

use common::*;
use std::path::{Path, PathBuf};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, DType};

/// An 8-layer synthetic Llama in `dir/in`.
fn model(dir: &Path) -> PathBuf {
    let spec = SyntheticSpec {
        num_layers: 8,
        hidden_size: 16,
        num_heads: 2,
        num_kv_heads: 1,
        intermediate_size: 32,
        vocab_size: 32,
        dtype: DType::BF16,
        ..SyntheticSpec::tiny()
    };
    let p = dir.join("in");
    spec.write(&p, None).unwrap();
    p
}

#[test]
fn upscale_writes_solar_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let out = dir.path().join("up");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&surgeon(&[
        "upscale",
        &s(&m),
        "--layers",
        "12",
        "--out",
        &s(&out),
    ]));
    let plan = open_hf_dir(&out).unwrap();
    assert_eq!(plan.arch.num_layers(), 12);
    assert_eq!(
        plan.arch.surgeon.history,
        vec!["upscale: depth up-scaling 8 -> 12 layers, slices 0..6,2..8"]
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("\"num_hidden_layers\": 12"), "{config}");

    // The same stack via --slices, as a dry run: a plan on stdout, nothing written.
    let dry = dir.path().join("dry");
    let text = ok(&surgeon(&[
        "upscale",
        &s(&m),
        "--slices",
        "0..6,2..8",
        "--out",
        &s(&dry),
        "--dry-run",
    ]));
    assert!(text.starts_with("model llama: 12 layers"), "{text}");
    assert!(text.contains("history: upscale: depth up-scaling 8 -> 12 layers, slices 0..6,2..8"));
    let line = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("model.layers.6.input_layernorm.weight ")
        })
        .unwrap_or_else(|| panic!("no layer 6 in {text}"));
    assert!(
        line.ends_with("= load(model.safetensors: model.layers.2.input_layernorm.weight, bf16)"),
        "{line}"
    );
    assert!(!dry.exists());
}

#[test]
fn expand_and_drop_write_models() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ex = dir.path().join("ex");
    ok(&surgeon(&[
        "expand",
        &s(&m),
        "--add",
        "4",
        "--out",
        &s(&ex),
    ]));
    let plan = open_hf_dir(&ex).unwrap();
    assert_eq!(plan.arch.num_layers(), 12);
    assert_eq!(plan.arch.surgeon.new_layers, vec![2, 5, 8, 11]);
    let config = std::fs::read_to_string(ex.join("config.json")).unwrap();
    assert!(config.contains("\"new_layers\""), "{config}");

    let ex2 = dir.path().join("ex2");
    ok(&surgeon(&[
        "expand",
        &s(&m),
        "--add",
        "3",
        "--positions",
        "0,5,2",
        "--out",
        &s(&ex2),
    ]));
    assert_eq!(
        open_hf_dir(&ex2).unwrap().arch.surgeon.new_layers,
        vec![1, 4, 8]
    );

    let dr = dir.path().join("dr");
    ok(&surgeon(&[
        "drop-layers",
        &s(&m),
        "--layers",
        "7,0",
        "--out",
        &s(&dr),
    ]));
    let plan = open_hf_dir(&dr).unwrap();
    assert_eq!(plan.arch.num_layers(), 6);
    assert_eq!(
        plan.arch.surgeon.history,
        vec!["drop-layers: removed layers 0,7 (8 -> 6 layers)"]
    );
}

#[test]
fn user_errors_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let m = m.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        // Layer indices out of range.
        (
            &["drop-layers", m, "--layers", "3,8"],
            "layer 8 is out of range: the model has 8 layers (0..8)",
        ),
        (
            &["expand", m, "--add", "1", "--positions", "8"],
            "layer 8 is out of range",
        ),
        (
            &["upscale", m, "--slices", "0..6,2..9"],
            "slice 2..9 is out of range: the model has 8 layers (0..8)",
        ),
        // Empty or reversed slices.
        (
            &["upscale", m, "--slices", "0..6,4..4"],
            "slice 4..4 is empty",
        ),
        (
            &["upscale", m, "--slices", "6..2"],
            "slice 6..2 is reversed",
        ),
        (
            &["upscale", m, "--slices", "0:4"],
            "is not of the form A..B",
        ),
        // P not dividing n without --positions.
        (
            &["expand", m, "--add", "3"],
            "cannot add 3 blocks to 8 layers evenly: 3 does not divide 8 (give --positions)",
        ),
        (
            &["expand", m, "--add", "2", "--positions", "1"],
            "--positions lists 1 layer but --add is 2",
        ),
        // Dropping every layer.
        (
            &["drop-layers", m, "--layers", "0,1,2,3,4,5,6,7"],
            "cannot drop all 8 layers",
        ),
        // S invalid: odd, <= n, >= 2n.
        (
            &["upscale", m, "--layers", "11"],
            "cannot up-scale 8 layers to 11",
        ),
        (
            &["upscale", m, "--layers", "8"],
            "cannot up-scale 8 layers to 8",
        ),
        (
            &["upscale", m, "--layers", "16"],
            "cannot up-scale 8 layers to 16",
        ),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        args.extend(["--out", o]);
        fails(&surgeon(&args), want, &out);
    }
}

#[test]
fn drop_layers_by_block_influence() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    // A word-level tokenizer over the model's 32 ids.
    let vocab: Vec<String> = (0..32).map(|i| format!("\"w{i}\":{i}")).collect();
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
      "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,
      "decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(m.join("tokenizer.json"), tok).unwrap();
    let data = dir.path().join("calib.txt");
    let words: Vec<String> = (0..300).map(|i| format!("w{}", (i * 7 + 3) % 32)).collect();
    std::fs::write(&data, words.join(" ")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let dr = dir.path().join("dr");
    let stdout = ok(&surgeon(&[
        "drop-layers",
        &s(&m),
        "--count",
        "3",
        "--data",
        &s(&data),
        "--max-tokens",
        "200",
        "--window",
        "64",
        "--out",
        &s(&dr),
    ]));
    let scores: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("layer "))
        .map(|l| l.split(':').nth(1).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(scores.len(), 8, "{stdout}");
    assert!(
        scores
            .iter()
            .all(|x| x.is_finite() && (0.0..=2.0).contains(x)),
        "{stdout}"
    );
    assert!(stdout.contains("200 tokens"), "{stdout}");
    let plan = open_hf_dir(&dr).unwrap();
    assert_eq!(plan.arch.num_layers(), 5);
    // The dropped layers are the three lowest scores.
    let mut order: Vec<usize> = (0..8).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut want: Vec<usize> = order[..3].to_vec();
    want.sort();
    let line = stdout.lines().find(|l| l.starts_with("dropping ")).unwrap();
    let got: Vec<usize> = line["dropping ".len()..]
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, want, "{stdout}");

    // --count without --data, and a count that would drop every layer, are errors.
    let o = dir.path().join("x");
    let e = surgeon(&["drop-layers", &s(&m), "--count", "2", "--out", &s(&o)]);
    assert!(!e.status.success());
    let e = surgeon(&[
        "drop-layers",
        &s(&m),
        "--count",
        "8",
        "--data",
        &s(&data),
        "--out",
        &s(&o),
    ]);
    assert!(!e.status.success());
    assert!(!o.exists());
}
