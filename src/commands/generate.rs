//! `surgeon generate`: stream a model's continuation of a prompt.
use super::common::BackendArgs;
use anyhow::{Context, Result};
use std::io::Write;
use surgeon_distill::backend::BackendJob;
use surgeon_distill::burn::tensor::backend::Backend;
use surgeon_distill::generate::{generate, GenerateOptions, GenerateReport, TextStream};
use surgeon_distill::text::{self, ChatTemplate, Message};
use surgeon_distill::Llama;
use surgeon_formats::Plan;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = GenerateOptions::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = GenerateOptions::default().temperature)]
    pub temperature: f32,
    #[arg(long, default_value_t = GenerateOptions::default().top_p)]
    pub top_p: f32,
    #[arg(long, default_value_t = GenerateOptions::default().seed)]
    pub seed: u64,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print speed statistics to stderr at the end.
    #[arg(long)]
    pub stats: bool,
}

struct Job<'a> {
    plan: &'a Plan,
    tok: &'a text::Tokenizer,
    prompt: &'a [u32],
    opts: GenerateOptions,
}

impl BackendJob for Job<'_> {
    type Output = surgeon_distill::Result<GenerateReport>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = Llama::<B>::from_plan(self.plan, &device)?;
        let mut stream = TextStream::new(self.tok, true);
        let mut out = std::io::stdout().lock();
        let report = generate(&model, self.prompt, &self.opts, &mut |id| {
            let piece = stream.push(id);
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            true
        });
        let _ = writeln!(out);
        Ok(report)
    }
}

pub fn run(a: Args) -> Result<()> {
    GenerateOptions {
        temperature: a.temperature,
        top_p: a.top_p,
        ..Default::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let plan = surgeon_formats::open_model(&a.model)?;
    let tok = text::load_tokenizer(&plan)?;
    let prompt_text = if a.chat {
        ChatTemplate::from_plan(&plan)?.render(&[Message::user(&a.prompt)], true)?
    } else {
        a.prompt.clone()
    };
    let mut prompt = text::encode(&tok, &prompt_text)?;
    if prompt.is_empty() {
        prompt = plan.arch.bos_token_id.into_iter().collect();
        anyhow::ensure!(
            !prompt.is_empty(),
            "the prompt is empty and the model has no BOS token"
        );
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_tokens: text::stop_tokens(&plan, &tok),
    };
    let r = a
        .backend
        .backend
        .run(Job {
            plan: &plan,
            tok: &tok,
            prompt: &prompt,
            opts,
        })?
        .with_context(|| format!("generating with {}", a.model))?;
    if a.stats {
        eprintln!(
            "prompt {} tokens in {:.2} s; {} new tokens, {:.1} tokens/s{}",
            r.prompt_tokens,
            r.prefill_s,
            r.tokens.len(),
            r.tokens_per_s,
            if r.stopped { " (stopped at EOS)" } else { "" }
        );
    }
    Ok(())
}
