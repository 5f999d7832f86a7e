//! `bpo bench ...`: throughput on random-weight models of the reference configurations (`shared/reference.md`),
//! built on the fly, so numbers can be compared across machines and with the PyTorch baseline.

use std::path::PathBuf;

use anyhow::Context;
use bpo::bench::Size;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    action: BenchAction,
}

#[derive(Subcommand)]
enum BenchAction {
    /// Bootstrapped answers per second: `bootstrap weaken` end to end (image loading, noise, prefill, decoding,
    /// writing records) with batching off (batch 1) and on.
    Bootstrap(BootstrapBench),
}

#[derive(Args)]
struct BootstrapBench {
    /// Model configuration, built with random weights in a temporary folder.
    #[arg(long, value_enum, default_value = "small")]
    size: Size,
    /// Time this model folder instead of a random-weight one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes to time (answers generated together).
    #[arg(long, num_args = 1.., default_values_t = [1, 8])]
    batch: Vec<usize>,
    /// Answers per timing (one per prompt).
    #[arg(long, default_value_t = 16)]
    answers: usize,
    /// New tokens per answer (EOS is disabled, so every answer has exactly this many).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Decoding mode; the contrast modes run a clean-image row beside each answer.
    #[arg(long, value_enum, default_value = "noisy")]
    decode: super::bootstrap::Decode,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.action {
        BenchAction::Bootstrap(a) => bootstrap(a),
    }
}

fn bootstrap(a: BootstrapBench) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("bpo-bench-bootstrap-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let dir = match &a.model {
            Some(dir) => dir.clone(),
            None => {
                let dir = scratch.join("model");
                a.size.write_model(&dir, 0)?;
                dir
            }
        };
        let decode = a.decode.mode(1.0, 1.0, 0.2);
        let figures = bpo::bench::bootstrap_throughput(&dir, &scratch, &a.batch, a.answers, a.new_tokens, decode)?;
        let what = a.model.as_ref().map_or(format!("{:?} (random weights)", a.size), |m| m.display().to_string());
        println!("bootstrap weaken on {what}, {} answers x {} new tokens, decode {decode:?}", a.answers, a.new_tokens);
        println!("{:>6} {:>10} {:>10} {:>10}", "batch", "seconds", "answers/s", "tokens/s");
        for f in figures {
            println!("{:>6} {:>10.2} {:>10.2} {:>10.1}", f.batch, f.seconds, f.answers_per_s, f.tokens_per_s);
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&scratch).ok();
    result
}
