//! Generation with DeepSeek-V3 latent attention (a model converted by `convert-attention --to mla`)
//! against the original softmax attention, in the same run: the bytes the cache holds after the
//! context and the decoding speed, with ratios.
//!
//! ```sh
//! cargo run --example mla_generation -- ORIGINAL CONVERTED [NEW_TOKENS] [CONTEXTS]
//! ```
//! NEW_TOKENS defaults to 16, CONTEXTS to `2048`. The context is prefilled in pieces of 512
//! tokens; the timed part is NEW_TOKENS single-token steps. The runtime keeps f32, so cache bytes
//! are 4 per number (the README's bytes per token are at 16 bits).
use anyhow::{Context, Result};
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
    let (Some(original), Some(converted)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: mla_generation ORIGINAL CONVERTED [NEW_TOKENS] [CONTEXTS]");
    };
    let new: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let contexts: Vec<usize> = match args.get(3) {
        Some(c) => c.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
        None => vec![2048],
    };
    let dev = Default::default();
    let load = |p: &str| -> Result<Llama<B>> {
        let plan = surgeon_formats::open_model(p).with_context(|| p.to_string())?;
        Ok(Llama::<B>::from_plan(&plan, &dev)?)
    };
    let (soft, mla) = (load(original)?, load(converted)?);
    println!("{original} vs {converted}; {new} new tokens");
    println!("context | cache original | cache mla | ratio | tok/s original | tok/s mla | ratio");
    for &c in &contexts {
        let (sb, st) = run(&soft, c, new);
        let (lb, lt) = run(&mla, c, new);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "{c} | {:.2} MiB | {:.2} MiB | {:.3} | {st:.2} | {lt:.2} | {:.2}",
            mib(sb),
            mib(lb),
            lb as f64 / sb as f64,
            lt / st
        );
    }
    Ok(())
}
