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
    /// Windows per forward pass (default: enough windows for about 4096 positions; fewer off the
    /// CPU, where the batch's logits are made whole). On the CPU backend the perplexity does not
    /// depend on it, to the bit.
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print one JSON object (`tokens`, `nll`, `ppl`, `tokens_per_s`).
    #[arg(long)]
    pub json: bool,
    /// Also write the logits of the first window's inputs (`[window, vocab]`, little-endian f32,
    /// row-major) to this file, for comparison with another runtime (scripts/gpu-check.sh).
    #[arg(long, value_name = "FILE")]
    pub logits_out: Option<PathBuf>,
}

struct Job<'a> {
    plan: &'a Plan,
    ids: &'a [u32],
    opts: EvalOptions,
    /// Token ids whose logits to return.
    logits_of: Option<&'a [u32]>,
}

impl BackendJob for Job<'_> {
    type Output = surgeon_distill::Result<(EvalReport, Option<Vec<f32>>)>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        use surgeon_distill::burn::tensor::{Int, Tensor, TensorData};
        let model = Llama::<B>::from_plan(self.plan, &device)?;
        let report = perplexity(&model, self.ids, &self.opts)?;
        let logits = self.logits_of.map(|ids| {
            let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            let n = ids.len();
            let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
            let v = model.forward(t).into_data().convert::<f32>();
            v.into_vec::<f32>().expect("f32 logits")
        });
        Ok((report, logits))
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
    if let Some(p) = a.logits_out.as_ref().filter(|p| p.exists()) {
        anyhow::bail!(
            "{} exists; remove it first (--logits-out never overwrites)",
            p.display()
        );
    }
    let backend = a.backend.backend;
    let first = &ids[..ids.len().min(a.window)];
    let (r, logits) = backend
        .run(Job {
            plan: &plan,
            ids: &ids,
            opts,
            logits_of: a.logits_out.as_ref().map(|_| first),
        })?
        .with_context(|| format!("evaluating {}", a.model))?;
    if let (Some(path), Some(v)) = (&a.logits_out, logits) {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "tokens": r.tokens, "nll": r.nll, "ppl": r.ppl, "tokens_per_s": r.tokens_per_s,
                "windows": r.windows, "seconds": r.seconds, "backend": backend.to_string(),
                "kv_cache_bytes_per_token": 2 * plan.arch.kv_cache_values_per_token(),
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
