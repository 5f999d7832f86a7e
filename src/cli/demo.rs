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
    /// Repeat the whole pipeline with seeds seed, seed+1, ... and report mean and standard deviation; at least 1.
    #[arg(long, default_value_t = 1, value_parser = super::range::at_least_one)]
    seeds: usize,
    /// Seeds run side by side, each on one CPU thread unless --threads says otherwise (one seed alone took 310 s on
    /// one thread and 345 s on two of a 2-core machine: docs/demo.md). Default: one per CPU thread, at most --seeds.
    /// The results do not depend on it.
    #[arg(long, value_parser = super::range::at_least_one)]
    jobs: Option<usize>,
    /// A tiny world and model that run in seconds (for tests; the numbers mean nothing).
    #[arg(long)]
    quick: bool,
    /// JSON file overriding settings of the recipe (any subset, nested as --print-recipe shows them), e.g.
    /// {"dpo": {"epochs": 2}, "world": {"corpus": {"partner_rate": 0.9}}}.
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// Only the paper's five rows: leaves out the two after BPO, "BPO, round 2" (bootstrap again from BPO's
    /// merged model, DPO again on it as policy and reference, as `bpo loop` does) and "BPO + image-side preference"
    /// (the BPO run with mDPO's terms, as `bpo train --objective mdpo`), about 40 s of a seed's 6 minutes on 2 cores
    /// (docs/demo.md). The other rows are the same with or without them.
    #[arg(long)]
    paper_only: bool,
    /// Print the recipe (every setting of every stage, after --quick and --recipe) as JSON and exit.
    #[arg(long)]
    print_recipe: bool,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

/// `threads_given`: the global --threads was set (otherwise each of the --jobs computes on one CPU thread: at the
/// demo's size a second thread per seed did not make it faster, docs/demo.md).
pub fn run(args: Args, threads_given: bool) -> anyhow::Result<()> {
    let mut recipe = if args.quick { Recipe::quick() } else { Recipe::standard() };
    if let Some(path) = &args.recipe {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let overrides: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        recipe = recipe.with_overrides(&overrides).with_context(|| format!("{}", path.display()))?;
    }
    if args.paper_only {
        recipe.past_the_paper = None;
    }
    if args.print_recipe {
        outln!("{}", serde_json::to_string_pretty(&recipe)?);
        return Ok(());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.jobs.unwrap_or(cores).min(args.seeds);
    if !threads_given {
        bpo::model::set_cpu_threads(Some(1));
    }
    let opts =
        DemoOptions { out: args.out.clone(), seed: args.seed, seeds: args.seeds, jobs, recipe, progress: !args.quiet };
    let summary = bpo::demo::run(&opts).with_context(|| format!("bpo demo in {}", args.out.display()))?;
    outln!("{}", summary.table);
    outln!("report: {}", summary.report.display());
    Ok(())
}
