//! `bpo demo`: the whole BPO pipeline on the embedded synthetic world, ending in a table and report.html.

use std::path::PathBuf;

use anyhow::Context;
use bpo::demo::{DemoOptions, Recipe};

/// Arguments of `bpo demo` (its help text is on `Command::Demo`).
#[derive(clap::Args)]
pub struct Args {
    /// Output folder: the world, models, bootstrap files, runs, evaluations and report/report.html. A second run
    /// with the same folder and recipe reuses the trained SFT model.
    #[arg(long, default_value = "bpo-demo")]
    out: PathBuf,
    /// Seed of the first run (world, weights, sampling).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repeat the whole pipeline with seeds seed, seed+1, ... and report mean and standard deviation.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// A tiny world and model that run in seconds (for tests; the numbers mean nothing).
    #[arg(long)]
    quick: bool,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = if args.quick { Recipe::quick() } else { Recipe::standard() };
    let opts = DemoOptions { out: args.out.clone(), seed: args.seed, seeds: args.seeds, recipe, progress: !args.quiet };
    let summary = bpo::demo::run(&opts).with_context(|| format!("bpo demo in {}", args.out.display()))?;
    println!("{}", summary.table);
    println!("report: {}", summary.report.display());
    Ok(())
}
