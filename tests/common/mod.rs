//! Helpers shared by the integration tests that run models through the burn runtime.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};
use surgeon_distill::burn;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::model::Llama;
use surgeon_formats::Plan;

pub type B = burn::backend::Flex;

/// A `[1, T]` batch of token ids.
pub fn ids(tokens: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, tokens.len()]), &Default::default())
}

/// A tensor's values on the host.
pub fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Bit patterns of a tensor's values, for bitwise comparisons.
pub fn bits(t: Tensor<B, 3>) -> Vec<u32> {
    to_vec(t).iter().map(|x| x.to_bits()).collect()
}

/// Logits `[T, vocab]` (flattened) of one forward of `plan` over `tokens`.
pub fn logits(plan: &Plan, tokens: &[u32]) -> Vec<f32> {
    let model = Llama::<B>::from_plan(plan, &Default::default()).expect("load");
    to_vec(model.forward(ids(tokens)))
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A JSON array of token ids.
pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A file of little-endian f32 values (the goldens' `_logits.bin`).
pub fn read_f32s(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Runs the `surgeon` binary built with the tests.
pub fn surgeon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surgeon"))
        .args(args)
        .output()
        .expect("run surgeon")
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "surgeon failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts a one-line error containing `want`, a non-zero exit, no `out_dir` and no temporary
/// left beside it.
pub fn fails(out: &Output, want: &str, out_dir: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(want), "`{want}` not in: {err}");
    assert!(!out_dir.exists(), "{} was written", out_dir.display());
    let parent = out_dir.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("surgeon-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
