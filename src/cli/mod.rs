//! Argument parsing and dispatch. Each subcommand lives in its own file and turns its arguments into one library call.

use clap::{Parser, Subcommand};

mod distort;

#[derive(Parser)]
#[command(name = "bpo", version, about = "Bootstrapped Preference Optimization: make multimodal LLMs look at the image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write what the model sees of a diffusion-noised image (BPO's image weakening) as a PNG.
    ///
    /// The image is preprocessed as for LLaVA-1.5, noised by forward diffusion on the normalised pixel tensor
    /// (VCD's schedule, T = 1000: step 0 is almost clean, BPO's release uses 900, VCD and POVID 500), then
    /// de-normalised for viewing. Use it to judge how much an image-weakened negative still shows.
    Distort(distort::Args),
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Distort(args) => distort::run(args),
    }
}
