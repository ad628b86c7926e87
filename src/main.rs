//! The `surgeon` command line: a thin layer over the library crates.
use clap::{Parser, Subcommand};

mod commands;

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
    /// Write a synthetic checkpoint with random weights (tests, benchmarks).
    Synth(commands::synth::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::ExtendVocab(a) => commands::extend_vocab::run(a),
        Command::Synth(a) => commands::synth::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
