//! `surgeon export-gguf`: write a model as a llama.cpp GGUF file (see `surgeon_formats::gguf::writer`).
use anyhow::Result;
use std::path::PathBuf;
use surgeon_formats::gguf::{export_gguf, ExportOptions, ExportType};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// Output file (.gguf). Written to a temporary sibling, renamed at the end.
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the weight matrices: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k,
    /// or the mixes q4_k_m, q5_k_m (norms stay f32).
    #[arg(id = "type", long = "type", default_value = "f16", value_name = "TYPE")]
    pub ty: ExportType,
    /// llama.cpp pre-tokenizer name (tokenizer.ggml.pre), e.g. smollm, llama-bpe, qwen2, gpt2;
    /// detected from tokenizer.json when omitted.
    #[arg(long)]
    pub pre: Option<String>,
    /// general.name (default: the model's file or directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing output file (never an input).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let name = a.name.or_else(|| {
        std::path::Path::new(&a.model)
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
    });
    let opts = ExportOptions {
        ty: a.ty,
        force: a.force,
        pre: a.pre,
        name,
        progress: true,
    };
    let r = export_gguf(&plan, &a.out, &opts)?;
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote {} ({} tensors: {}; {:.1} MB; pre-tokenizer {})",
        r.path.display(),
        r.tensors,
        types.join(", "),
        r.bytes as f64 / 1e6,
        r.pre.as_deref().unwrap_or("-")
    );
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    Ok(())
}
