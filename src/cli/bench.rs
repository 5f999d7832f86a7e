//! `bpo bench ...`: speed measurements on random-weight models of the reference sizes (see `bpo::bench`).

use bpo::bench::Size;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Seconds per DPO step and tokens/s: 4 pairs (8 rows), LoRA r 8 on q/k/v/o, reference = adapters off
    /// computed every step, AdamW. Prints the median over the timed steps (the first step is a warm-up).
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model size (shared/reference.md).
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Also time the plain candle backward, which computes (and drops) gradients for every frozen weight.
    #[arg(long)]
    compare_plain_backward: bool,
    /// Only write the model's config.json here (for scripts/bench_torch_train.py) and exit.
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Train(a) => train(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.write_config {
        std::fs::write(path, serde_json::to_string_pretty(&a.size.config())?)?;
        return Ok(());
    }
    let modes: &[bool] = if a.compare_plain_backward { &[false, true] } else { &[false] };
    for &plain in modes {
        let f = bpo::bench::train_step(a.size, a.steps, plain)?;
        let backward = if plain { "plain candle backward (frozen-weight gradients computed)" } else { "frozen weights skipped in backward" };
        println!("{:?}: {} rows x {} positions, {backward}: {:.3} s/step (median of {}), {:.0} tokens/s", a.size, f.rows, f.length, f.seconds, f.steps, f.tokens_per_s);
    }
    Ok(())
}
