//! The `surgeon` command line: a thin layer over the library crates.
use clap::{Parser, Subcommand};

mod commands;
mod pipeline;

#[derive(Parser)]
#[command(
    name = "surgeon",
    version,
    about = "Surgery on pretrained language models: reshape a checkpoint, then heal it by training.",
    long_about = "Surgery on pretrained language models: reshape a checkpoint, then heal it by training.\n\n\
MODEL arguments accept a Hugging Face model directory, a .gguf file, or a Hub id org/name[@revision]."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model: shapes, parameter counts, dtypes.
    Inspect(commands::inspect::Args),
    /// Rewrite a model as Hugging Face safetensors (change dtype, re-shard).
    Convert(commands::convert::Args),
    /// Add tokens (a list, or BPE merges learned on a corpus) and resize the embeddings.
    ExtendVocab(commands::extend_vocab::Args),
    /// Import a llama.cpp GGUF file as a Hugging Face model.
    ImportGguf(commands::import_gguf::Args),
    /// Export a model as a llama.cpp GGUF file (f32, f16, bf16, q8_0, q4_0, q4_1).
    ExportGguf(commands::export_gguf::Args),
    /// Write a synthetic checkpoint with random weights (tests, benchmarks).
    Synth(commands::synth::Args),
    /// Depth up-scaling (SOLAR): stack layer ranges of the model, e.g. 32 -> 48 layers.
    Upscale(commands::upscale::Args),
    /// Block expansion (LLaMA Pro): insert identity copies of blocks for new-block training.
    Expand(commands::expand::Args),
    /// Remove decoder layers.
    DropLayers(commands::drop_layers::Args),
    /// Perplexity of a model on a text file (windowed next-token prediction).
    Eval(commands::eval::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(commands::generate::Args),
    /// Make a mixture of experts: upcycle the MLP into E copies, or split its neurons into E experts.
    Moe(commands::moe::Args),
    /// Heal a model by training: LM loss and/or distillation, only the tensors you choose.
    Heal(commands::heal::Args),
    /// Run a YAML recipe of steps (surgery, healing, evaluation), skipping finished ones.
    Run(commands::run::Args),
}

fn main() {
    let cli = Cli::parse();
    // Writers remove their unfinished output on SIGINT/SIGTERM and exit 130. `heal` installs its
    // own (checkpoint first); `run` leaves signals to its steps, which share its process group.
    let writes = !matches!(
        cli.command,
        Command::Heal(_)
            | Command::Run(_)
            | Command::Inspect(_)
            | Command::Eval(_)
            | Command::Generate(_)
    );
    if writes {
        if let Err(e) = surgeon_formats::output::install_signal_handlers(None) {
            eprintln!("error: installing the signal handler: {e}");
            std::process::exit(1);
        }
    }
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::ExtendVocab(a) => commands::extend_vocab::run(a),
        Command::ImportGguf(a) => commands::import_gguf::run(a),
        Command::ExportGguf(a) => commands::export_gguf::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Upscale(a) => commands::upscale::run(a),
        Command::Expand(a) => commands::expand::run(a),
        Command::DropLayers(a) => commands::drop_layers::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Moe(a) => commands::moe::run(a),
        Command::Heal(a) => commands::heal::run(a),
        Command::Run(a) => commands::run::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
