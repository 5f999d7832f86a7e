//! Argument parsing and dispatch. Each subcommand lives in its own file and turns its arguments into one library call.

use clap::{Parser, Subcommand};

mod bootstrap;
mod pairs;

#[derive(Parser)]
#[command(name = "bpo", version, about = "Bootstrapped Preference Optimization: make multimodal LLMs look at the image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make negatives for BPO records (error injection; image weakening comes with the model).
    Bootstrap(bootstrap::BootstrapArgs),
    /// Turn BPO records into preference pairs (bpo, TRL or LLaMA-Factory layout).
    ///
    /// Every two completions of a record with different scores give a pair, the higher score chosen (ground
    /// truth over negatives); ties are skipped. Records with a response longer than --max-words words are
    /// dropped. Prints what was kept and dropped, by reason.
    Pairs(pairs::PairsArgs),
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bootstrap(args) => bootstrap::run(args),
        Command::Pairs(args) => pairs::run(args),
    }
}
