//! SOLAR depth up-scaling and a short distillation heal, with the library crates directly
//! (no CLI): open a model, up-scale it in memory, heal it against the original, write it.
//!
//! ```sh
//! cargo run --release --example upscale_and_heal -- [MODEL] [TEXT] [STEPS] [OUT]
//! ```
//! MODEL defaults to `$SURGEON_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf` (scripts/fetch-smollm2.sh),
//! TEXT to Python's `pydoc_data/topics.py`, STEPS to 10, OUT to `work/upscale_and_heal`.
use anyhow::{Context, Result};
use std::path::PathBuf;
use surgeon_distill::heal::{heal, Budget, DataSpec, HealConfig, LossKind};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = match args.first() {
        Some(m) => m.clone(),
        // $SURGEON_CACHE (default ~/.cache/surgeon), where scripts/fetch-smollm2.sh puts it; the error
        // says how to fetch it.
        None => surgeon_formats::gguf::smollm2_gguf_path()
            .map_err(anyhow::Error::msg)?
            .display()
            .to_string(),
    };
    let text = match args.get(1) {
        Some(t) => PathBuf::from(t),
        None => {
            let o = std::process::Command::new("python3")
                .args(["-c", "import pydoc_data.topics as t; print(t.__file__)"])
                .output()
                .context("python3 locates the demo text; or pass TEXT")?;
            PathBuf::from(String::from_utf8(o.stdout)?.trim())
        }
    };
    let steps: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let out = PathBuf::from(
        args.get(3)
            .map(String::as_str)
            .unwrap_or("work/upscale_and_heal"),
    );

    // 1. Open (GGUF is dequantised lazily) and up-scale: n -> n + n/5 layers (30 -> 36).
    let original = surgeon_formats::open_model(&model)?;
    let n = original.arch.num_layers();
    let s = (n + n / 5) & !1;
    let upscaled = surgeon_surgery::upscale_solar(&original, s)?;
    println!(
        "{model}: {n} -> {s} layers, {} -> {} parameters",
        surgeon_formats::plan::group_digits(original.parameter_count()),
        surgeon_formats::plan::group_digits(upscaled.parameter_count())
    );

    // 2. Heal by distillation from the original (the last 5% of the text is held out).
    let cfg = HealConfig {
        data: DataSpec::Files(vec![text]),
        out: out.clone(),
        loss: LossKind::Kd,
        temperature: 2.0,
        budget: Budget::Steps(steps),
        seq_len: 128,
        batch: 2,
        lr: 1e-4,
        warmup: 2,
        force: true,
        command: "examples/upscale_and_heal.rs".into(),
        ..Default::default()
    };
    let r = heal(&cfg, upscaled, Some(original))?;
    let p = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or("-".into());
    println!(
        "healed {} steps ({} tokens, {:.0} tokens/s): held-out perplexity {} -> {}; wrote {}",
        r.steps,
        r.tokens,
        r.tokens_per_second,
        p(r.eval_ppl_before),
        p(r.eval_ppl_after),
        out.display()
    );
    Ok(())
}
