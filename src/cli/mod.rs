//! Argument parsing and dispatch. Each subcommand lives in its own file and turns its arguments into one library call.

mod bench;
mod eval;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bpo", version, about = "Bootstrapped Preference Optimization: make multimodal LLMs look at the image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hallucination evaluation: score answers with POPE or CHAIR / Object HalBench, compare runs.
    Eval(eval::EvalArgs),
    /// Time pipeline stages on synthetic inputs.
    Bench(bench::BenchArgs),
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
