//! Depth up-scaling of the real model, SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers) to 48 layers:
//! written with `write_model`, reopened, every tensor compared bytewise with its source.
//!
//! The GGUF comes from `scripts/fetch-smollm2.sh`; the test fails, saying so, when it is missing.
use surgeon_formats::arch::{layer_tensors, split_layer_name};
use surgeon_formats::{open_hf_dir, write_model, WriteOptions};
use surgeon_surgery::upscale_solar;

#[test]
fn smollm2_solar_copies_are_bitwise() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
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
