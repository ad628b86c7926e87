//! `surgeon extend-vocab`: add tokens (a list, or BPE merges learned from a corpus), resize the
//! embeddings and lm_head, initialise the new rows.
use super::common::{command_line, OutputArgs};
use anyhow::{bail, Result};
use std::path::PathBuf;
use surgeon_surgery::vocab::{self, Init, VocabOptions};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum InitArg {
    /// Mean of all old rows (HF mean_resizing).
    Mean,
    /// Mean of the old rows of the token's encoding under the old tokenizer.
    ZipTie,
    /// Normal with the old rows' mean and standard deviation.
    Random,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, .gguf file or Hub id.
    pub model: String,
    /// File with one new token per line (tokens that already exist are reported and skipped).
    #[arg(long, conflicts_with_all = ["train_corpus", "add"])]
    pub tokens: Option<PathBuf>,
    /// Text files to learn new BPE merges on (extending the existing merges).
    #[arg(long, num_args = 1.., requires = "add")]
    pub train_corpus: Vec<PathBuf>,
    /// Number of new tokens to learn from --train-corpus.
    #[arg(long)]
    pub add: Option<usize>,
    /// A pair must occur at least this often in the corpus to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Initialisation of the new embedding (and lm_head) rows.
    #[arg(long, value_enum, default_value = "zip-tie")]
    pub init: InitArg,
    /// Seed for --init random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pad the vocabulary to a multiple of M rows (extra rows: mean init, no token).
    #[arg(long, value_name = "M")]
    pub pad_to_multiple: Option<usize>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(a: Args) -> Result<()> {
    let plan = surgeon_formats::open_model(&a.model)?;
    let opts = VocabOptions {
        init: match a.init {
            InitArg::Mean => Init::Mean,
            InitArg::ZipTie => Init::ZipTie,
            InitArg::Random => Init::Random { seed: a.seed },
        },
        pad_to_multiple: a.pad_to_multiple,
        min_frequency: a.min_frequency,
    };
    let (new, report) = if let Some(f) = &a.tokens {
        let tokens = vocab::read_token_file(f)?;
        vocab::extend_with_tokens(&plan, &tokens, &opts)?
    } else if !a.train_corpus.is_empty() {
        let n = a.add.unwrap_or(0);
        let corpus = vocab::read_corpus(&a.train_corpus)?;
        vocab::extend_with_corpus(&plan, &corpus, n, &opts)?
    } else {
        bail!("give --tokens FILE, or --train-corpus FILE... with --add N");
    };
    for (t, why) in &report.skipped {
        eprintln!("skipped {t:?}: {why}");
    }
    let k = report.tokens.len();
    eprintln!(
        "added {k} token{} (ids {}..{}){}, vocab {} -> {}{}",
        if k == 1 { "" } else { "s" },
        report.old_vocab,
        report.old_vocab + k,
        if report.merges_added > 0 {
            format!(" with {} new merges", report.merges_added)
        } else {
            String::new()
        },
        report.old_vocab,
        report.new_vocab,
        if report.padding_rows > 0 {
            format!(" ({} padding rows)", report.padding_rows)
        } else {
            String::new()
        }
    );
    for t in report.tokens.iter().take(10) {
        eprintln!("  {} {:?} <- {:?}", t.id, t.text, t.old_ids);
    }
    if k > 10 {
        eprintln!("  ...");
    }
    a.output.finish(new, command_line())
}
