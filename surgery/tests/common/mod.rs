//! Helpers shared by the surgery tests: small synthetic checkpoints on disk and byte comparisons.
#![allow(dead_code)]
use std::path::Path;
use surgeon_formats::arch::{layer_tensors, split_layer_name, Mlp, MoeRouting};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{open_hf_dir, write_model, DType, Plan, Source, TensorEntry, WriteOptions};

/// A small Llama with `layers` layers whose plans stay readable in snapshots.
pub fn small_spec(layers: usize) -> SyntheticSpec {
    SyntheticSpec {
        hidden_size: 16,
        num_layers: layers,
        num_heads: 2,
        num_kv_heads: 1,
        intermediate_size: 32,
        vocab_size: 32,
        dtype: DType::BF16,
        ..SyntheticSpec::tiny()
    }
}

/// Writes `spec` into `dir` and opens it again, so tensors are `Stored` in a real file.
pub fn written(spec: &SyntheticSpec, dir: &Path) -> Plan {
    spec.write(dir, None).unwrap();
    open_hf_dir(dir).unwrap()
}

/// Turns every layer of `plan` into a Mixtral-style MoE layer with `experts` random experts.
pub fn moe_plan(mut plan: Plan, experts: usize) -> Plan {
    let h = plan.arch.hidden_size;
    let dtype = plan.dominant_dtype();
    for i in 0..plan.arch.num_layers() {
        plan.tensors
            .retain(|name, _| split_layer_name(name).is_none_or(|(j, _)| j != i));
        plan.arch.layers[i].mlp = Mlp::Moe {
            num_experts: experts,
            top_k: 2,
            intermediate_size: 8,
            routing: MoeRouting::Mixtral,
        };
        for (k, (name, shape)) in layer_tensors(i, &plan.arch.layers[i], h)
            .into_iter()
            .enumerate()
        {
            let mut e = TensorEntry::new(Source::Random {
                shape,
                seed: (i * 1000 + k) as u64,
                mean: 0.0,
                std: 0.02,
            });
            e.dtype = dtype;
            plan.tensors.insert(name, e);
        }
    }
    plan.validate().unwrap();
    plan
}

/// Writes `plan` to `dir` and reopens it.
pub fn roundtrip(plan: &Plan, dir: &Path) -> Plan {
    let opts = WriteOptions {
        force: true,
        shard_size: 40_000, // several shards even for the small models
        ..Default::default()
    };
    write_model(plan, dir, &opts).unwrap();
    open_hf_dir(dir).unwrap()
}

/// The bytes a plan entry writes (its source evaluated and cast to its dtype).
pub fn bytes_of(plan: &Plan, name: &str) -> Vec<u8> {
    plan.get(name).unwrap().materialize().unwrap().data
}

/// The bytes of a tensor as stored in a written model (must be a passthrough `Stored` source).
pub fn stored_bytes(plan: &Plan, name: &str) -> Vec<u8> {
    let e = plan.get(name).unwrap();
    let (file, off, len, _) = e
        .source
        .stored_span()
        .unwrap_or_else(|| panic!("{name} is not stored in a file"));
    file.bytes()[off..off + len].to_vec()
}
