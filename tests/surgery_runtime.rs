//! Structural operators checked through the runtime on the real model (SmolLM2 from its GGUF).
mod common;

use common::*;
use surgeon_distill::model::Llama;
use surgeon_formats::Plan;

fn smollm2() -> Plan {
    surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"))
}

const PROMPT: [u32; 12] = [1, 504, 3458, 314, 260, 1345, 282, 4566, 28, 339, 416, 253];

#[test]
fn expanded_smollm2_logits_are_bitwise_equal_also_with_kv_cache() {
    let plan = smollm2();
    let expanded = surgeon_surgery::expand_even(&plan, 6).unwrap();
    assert_eq!(expanded.arch.num_layers(), 36);
    assert_eq!(expanded.arch.surgeon.new_layers.len(), 6);
    let dev = Default::default();
    let original = Llama::<B>::from_plan(&plan, &dev).unwrap();
    let grown = Llama::<B>::from_plan(&expanded, &dev).unwrap();
    let want = bits(original.forward(ids(&PROMPT)));
    assert_eq!(bits(grown.forward(ids(&PROMPT))), want, "full forward");

    // Incremental decoding: the prompt in two pieces through the KV cache.
    let mut cache_a = original.new_cache();
    let mut cache_b = grown.new_cache();
    for piece in [&PROMPT[..7], &PROMPT[7..]] {
        let a = bits(original.forward_cached(ids(piece), &mut cache_a));
        let b = bits(grown.forward_cached(ids(piece), &mut cache_b));
        assert_eq!(a, b, "cached forward");
    }
}

#[test]
fn solar_upscaled_smollm2_keeps_early_hidden_states() {
    // Layers 0..n-m of the up-scaled model are the original's, so the hidden state after them is too.
    let plan = smollm2();
    let up = surgeon_surgery::upscale_solar(&plan, 48).unwrap();
    assert_eq!(up.arch.num_layers(), 48);
    let dev = Default::default();
    let original = Llama::<B>::from_plan(&plan, &dev).unwrap();
    let upscaled = Llama::<B>::from_plan(&up, &dev).unwrap();
    let x = ids(&PROMPT);
    let a = original.layers_forward(original.embed(x.clone()), 0..24, None);
    let b = upscaled.layers_forward(upscaled.embed(x), 0..24, None);
    assert_eq!(bits(a), bits(b));
}
