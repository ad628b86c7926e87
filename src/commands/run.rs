//! `surgeon run RECIPE.yaml`: run a recipe of surgery / healing / evaluation steps.
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Runs the steps of a YAML recipe in order; finished, unchanged steps are skipped.
#[derive(clap::Args)]
pub struct Args {
    /// The recipe (see examples/recipes/).
    pub recipe: PathBuf,
    /// Print every step's command and plan; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rerun this step and every later one, even if up to date.
    #[arg(long)]
    pub from: Option<String>,
    /// Override a recipe variable: --set name=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Working directory for step outputs (default: the recipe's `workdir:`, else work/<recipe name>).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let mut sets = vec![];
    for s in &a.set {
        let Some((k, v)) = s.split_once('=') else {
            bail!("--set {s}: expected KEY=VALUE");
        };
        sets.push((k.trim().to_string(), v.to_string()));
    }
    let recipe = crate::pipeline::recipe::load(&a.recipe, &sets, a.workdir.as_deref())?;
    crate::pipeline::run(
        &recipe,
        &crate::pipeline::RunOptions {
            dry_run: a.dry_run,
            from: a.from,
            exe: None,
        },
    )?;
    Ok(())
}
