//! `bpo merge`: an adapter folded into its base model.

use std::path::PathBuf;

use anyhow::Context;

/// Options of the subcommand (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub struct Args {
    /// Base model folder the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// Adapter: a `bpo train` / `bpo sft` run folder or a PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output model folder (must not exist or be empty; a link to a folder is followed; neither --model nor
    /// --adapter).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    bpo::output::check_dir(&a.out, &[&a.model, &a.adapter])?;
    let r = bpo::train::merge(&a.model, &a.adapter, &a.out)
        .with_context(|| format!("merging {} into {}", a.adapter.display(), a.model.display()))?;
    errln!(
        "merged {} adapted linears{} into {}",
        r.linears,
        if r.projector { " and the projector" } else { "" },
        a.out.display()
    );
    Ok(())
}
