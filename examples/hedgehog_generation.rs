//! Generation with Hedgehog/LoLCATs linear attention against softmax attention, in the same run:
//! the memory a generation step keeps (KV cache, or window plus linear-attention state) and the
//! decoding speed after a context of 512, 2k and 8k tokens, with ratios.
//!
//! ```sh
//! cargo run --release --example hedgehog_generation -- [MODEL] [WINDOW] [NEW_TOKENS] [CONTEXTS]
//! ```
//! MODEL defaults to SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh), WINDOW to 64, NEW_TOKENS
//! to 16, CONTEXTS to `512,2048,8160` (8k minus room for the new tokens). Every layer is converted
//! with LoLCATs' initialisation (speed and memory do not depend on trained values). The context is
//! prefilled in pieces of 512 tokens; the timed part is NEW_TOKENS single-token steps.
use anyhow::Result;
use std::time::Instant;
use surgeon_distill::burn;
use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
use surgeon_distill::model::Llama;

type B = burn::backend::Flex;

fn ids(v: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [1, v.len()]),
        &Default::default(),
    )
}

/// (bytes the cache holds after the context, decode tokens per second).
fn run(model: &Llama<B>, context: usize, new: usize) -> (usize, f64) {
    let vocab = model.vocab_size() as i64;
    let toks: Vec<i64> = (0..(context + new) as i64)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut cache = model.new_cache();
    for piece in toks[..context].chunks(512) {
        let _ = model.forward_cached(ids(piece), &mut cache).into_data();
    }
    let bytes = 4 * cache.numel();
    let t0 = Instant::now();
    for i in context..context + new {
        let _ = model
            .forward_cached(ids(&toks[i..i + 1]), &mut cache)
            .into_data();
    }
    (bytes, new as f64 / t0.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.first() {
        Some(m) => m.clone(),
        None => surgeon_formats::gguf::smollm2_gguf_path()
            .map_err(anyhow::Error::msg)?
            .display()
            .to_string(),
    };
    let window: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let new: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let contexts: Vec<usize> = match args.get(3) {
        Some(c) => c.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
        None => vec![512, 2048, 8160],
    };
    let plan = surgeon_formats::open_model(&path)?;
    let opts = surgeon_convert::HedgehogOptions {
        window,
        ..Default::default()
    };
    let converted = surgeon_convert::to_hedgehog(&plan, &opts)?;
    let dev = Default::default();
    let soft = Llama::<B>::from_plan(&plan, &dev)?;
    let lin = Llama::<B>::from_plan(&converted, &dev)?;
    println!("{path}: every layer hedgehog, feature_dim 64, window {window}; {new} new tokens");
    println!(
        "context | cache softmax | cache hedgehog | ratio | tok/s softmax | tok/s hedgehog | ratio"
    );
    for &c in &contexts {
        let (sb, st) = run(&soft, c, new);
        let (lb, lt) = run(&lin, c, new);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "{c} | {:.2} MiB | {:.2} MiB | {:.3} | {st:.1} | {lt:.1} | {:.2}",
            mib(sb),
            mib(lb),
            lb as f64 / sb as f64,
            lt / st
        );
    }
    Ok(())
}
