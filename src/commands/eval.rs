//! `surgeon eval`: perplexity of a model on a text file.
use super::common::BackendArgs;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use surgeon_distill::backend::BackendJob;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::eval::{perplexity, read_text, EvalOptions, EvalReport};
use surgeon_distill::{text, Llama};
use surgeon_formats::Plan;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Text to score: plain text, or .jsonl with a `text` field per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Predicted tokens per window (windows of window+1 tokens, no overlap).
    #[arg(long, default_value_t = EvalOptions::default().window)]
    pub window: usize,
    /// Score only the first N tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = EvalOptions::default().batch_size)]
    pub batch_size: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print one JSON object (`tokens`, `nll`, `ppl`, `tokens_per_s`).
    #[arg(long)]
    pub json: bool,
}

struct Job<'a> {
    plan: &'a Plan,
    ids: &'a [u32],
    opts: EvalOptions,
}

impl BackendJob for Job<'_> {
    type Output = surgeon_distill::Result<EvalReport>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = Llama::<B>::from_plan(self.plan, &device)?;
        perplexity(&model, self.ids, &self.opts)
    }
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let plan = surgeon_formats::open_model(&a.model)?;
    let tok = text::load_tokenizer(&plan)?;
    let data = read_text(&a.data)?;
    let ids = text::encode(&tok, &data)?;
    let opts = EvalOptions {
        window: a.window,
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        progress: !a.json,
    };
    let backend = a.backend.backend;
    let r = backend
        .run(Job {
            plan: &plan,
            ids: &ids,
            opts,
        })?
        .with_context(|| format!("evaluating {}", a.model))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "tokens": r.tokens, "nll": r.nll, "ppl": r.ppl, "tokens_per_s": r.tokens_per_s,
                "windows": r.windows, "seconds": r.seconds, "backend": backend.to_string(),
            })
        );
    } else {
        println!("tokens scored  {}", r.tokens);
        println!("windows        {} x {} tokens", r.windows, a.window);
        println!("mean NLL       {:.4} nats", r.nll);
        println!("perplexity     {:.4}", r.ppl);
        println!(
            "tokens/s       {:.1} ({} backend, {:.1} s)",
            r.tokens_per_s, backend, r.seconds
        );
        eprintln!("total time     {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}
