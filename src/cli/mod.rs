//! Argument parsing and dispatch. Each subcommand lives in its own file and turns its arguments into one library call.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bpo", version, about = "Bootstrapped Preference Optimization: make multimodal LLMs look at the image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {}
}
