//! The `surgeon` command line: a thin layer over the library crates.
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

mod commands;
mod malloc;
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
    /// Regroup attention heads: grouped-query (--to gqa --kv-heads G) or multi-head (--to mha).
    ConvertAttention(commands::convert_attention::Args),
    /// CLOVER: value-output pairs in their singular basis per KV head, optionally pruned.
    Clover(commands::clover::Args),
    /// Remove decoder layers.
    DropLayers(commands::drop_layers::Args),
    /// Perplexity of a model on a text file (windowed next-token prediction).
    Eval(commands::eval::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(commands::generate::Args),
    /// Make a mixture of experts: upcycle the MLP into E copies, or split its neurons into E experts.
    Moe(commands::moe::Args),
    /// Minitron activation importance of neurons, heads, hidden channels and layers (scores.json).
    Importance(commands::importance::Args),
    /// Extract a sub-network keeping the most important neurons, heads and channels.
    Prune(commands::prune::Args),
    /// Search sub-networks under a parameter budget (block library, NSGA-II, exact DP baseline).
    Search(commands::search::Args),
    /// Heal a model by training: LM loss and/or distillation, only the tensors you choose.
    Heal(commands::heal::Args),
    /// Run a YAML recipe of steps (surgery, healing, evaluation), skipping finished ones.
    Run(commands::run::Args),
}

fn main() -> ExitCode {
    malloc::tune_for_tensors();
    let matches = Cli::command().get_matches();
    // Only an error message needs the subcommand's flags (see `with_flag_names`).
    let subcommand = matches.subcommand_name().map(str::to_string);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
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
            return ExitCode::FAILURE;
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
        Command::ConvertAttention(a) => commands::convert_attention::run(a),
        Command::Clover(a) => commands::clover::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Moe(a) => commands::moe::run(a),
        Command::Importance(a) => commands::importance::run(a),
        Command::Prune(a) => commands::prune::run(a),
        Command::Search(a) => commands::search::run(a),
        Command::Heal(a) => commands::heal::run(a),
        Command::Run(a) => commands::run::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<commands::common::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            let flags = subcommand_flags(subcommand.as_deref());
            eprintln!("error: {}", with_flag_names(&format!("{e:#}"), &flags));
            ExitCode::FAILURE
        }
    }
}

/// The long flags of subcommand `name`, without their dashes.
fn subcommand_flags(name: Option<&str>) -> Vec<String> {
    let cmd = Cli::command();
    let Some(sub) = name.and_then(|n| cmd.find_subcommand(n)) else {
        return vec![];
    };
    sub.get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// Library messages name configuration fields in backticks (`top_k`); on the command line each
/// field that is a flag of this command reads as the flag (--top-k).
fn with_flag_names(message: &str, flags: &[String]) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('`') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else { break };
        let word = &after[..close];
        let flag = word.replace('_', "-");
        out.push_str(&rest[..open]);
        if flags.contains(&flag) {
            out.push_str("--");
            out.push_str(&flag);
        } else {
            out.push_str(&rest[open..open + close + 2]);
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_are_flags_become_flags() {
        let flags = subcommand_flags(Some("moe"));
        assert!(flags.contains(&"top-k".to_string()), "{flags:?}");
        assert_eq!(
            with_flag_names(
                "`top_k` must be between 1 and `experts` = 4 (got 5)",
                &flags
            ),
            "--top-k must be between 1 and --experts = 4 (got 5)"
        );
        // Tensor names, values and unknown words keep their backticks; an odd backtick stays.
        assert_eq!(
            with_flag_names("`model.norm.weight` and `zeros` in `x", &flags),
            "`model.norm.weight` and `zeros` in `x"
        );
        assert!(subcommand_flags(Some("no-such-command")).is_empty());
    }
}
