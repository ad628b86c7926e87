//! Depth up-scaling of the real model, SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers) to 48 layers:
//! written with `write_model`, reopened, every tensor compared bytewise with its source.
//!
//! The GGUF is looked up as `$SURGEON_SMOLLM2_GGUF`, else `$SURGEON_CACHE/<name>`, else
//! `~/.cache/surgeon/<name>`, else `/work/cache/<name>` (`scripts/fetch-smollm2.sh` fetches it).
//! The test fails, with a message saying why, when the file is missing or cannot be imported.
use std::path::PathBuf;
use surgeon_formats::arch::{layer_tensors, split_layer_name};
use surgeon_formats::{open_hf_dir, write_model, WriteOptions};
use surgeon_surgery::upscale_solar;

const NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> PathBuf {
    let mut candidates = vec![];
    if let Some(p) = std::env::var_os("SURGEON_SMOLLM2_GGUF") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(c) = std::env::var_os("SURGEON_CACHE") {
        candidates.push(PathBuf::from(c).join(NAME));
    }
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(h).join(".cache/surgeon").join(NAME));
    }
    candidates.push(PathBuf::from("/work/cache").join(NAME));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("{NAME} not found (looked at {candidates:?}): run scripts/fetch-smollm2.sh or set SURGEON_SMOLLM2_GGUF")
        })
}

#[test]
fn smollm2_solar_copies_are_bitwise() {
    let path = gguf_path();
    let plan = surgeon_formats::open_model(path.to_str().unwrap()).unwrap_or_else(|e| {
        panic!(
            "cannot open the real model through open_model (is GGUF import available in this build?): {e}"
        )
    });
    let n = plan.arch.num_layers();
    assert_eq!(n, 30, "SmolLM2-135M has 30 layers");
    let up = upscale_solar(&plan, 48).unwrap();
    let map: Vec<usize> = (0..24).chain(6..30).collect();

    let p_layer: u64 = layer_tensors(0, &plan.arch.layers[0], plan.arch.hidden_size)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(
        up.parameter_count(),
        plan.arch.parameter_count() + 18 * p_layer
    );

    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("smollm2-48");
    let opts = WriteOptions {
        shard_size: 300_000_000,
        ..Default::default()
    };
    write_model(&up, &out_dir, &opts).unwrap();
    let out = open_hf_dir(&out_dir).unwrap();
    assert_eq!(out.arch.num_layers(), 48);
    assert_eq!(out.tensors.len(), up.tensors.len());
    assert_eq!(out.parameter_count(), up.parameter_count());
    for (name, entry) in &out.tensors {
        let src = match split_layer_name(name) {
            Some((k, rest)) => format!("model.layers.{}.{rest}", map[k]),
            None => name.clone(),
        };
        let (file, off, len, dtype) = entry.source.stored_span().unwrap();
        let want = plan.get(&src).unwrap().materialize().unwrap();
        assert_eq!(dtype, want.dtype, "{name}");
        assert!(
            file.bytes()[off..off + len] == want.data[..],
            "{name} differs from {src}"
        );
    }
}
