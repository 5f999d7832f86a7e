//! `bpo bench ...`: throughput benchmarks on random-weight models of `shared/reference.md`'s sizes.

use bpo::bench::Size;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Prefill and decode tokens/s at batch 1 and 8 (greedy and sampled), as `model.generate` is timed in
    /// shared/reference.md: a prompt of BOS + image positions + 20 text tokens, 64 new tokens, best of 3.
    Generate {
        #[arg(long, value_enum, default_values = ["tiny", "small"])]
        size: Vec<Size>,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also write each size's config.json here (for scripts/bench_torch.py).
        #[arg(long)]
        write_config: Option<std::path::PathBuf>,
    },
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.what {
        What::Generate { size, new_tokens, repeats, write_config } => generate(&size, new_tokens, repeats, write_config),
    }
}

fn generate(sizes: &[Size], new_tokens: usize, repeats: usize, write_config: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    println!("{:<6} {:>5} {:>8} {:>6} {:>12} {:>12} {:>12}", "size", "batch", "sampling", "prompt", "prefill t/s", "decode t/s", "e2e new t/s");
    for &size in sizes {
        let dir = tempfile_dir()?;
        size.write_model(&dir, 0)?;
        if let Some(out) = &write_config {
            std::fs::create_dir_all(out)?;
            std::fs::write(out.join(format!("{size:?}.json").to_lowercase()), serde_json::to_string_pretty(&size.config())?)?;
        }
        for (name, temperature) in [("greedy", 0.0), ("sample", 1.0)] {
            for f in bpo::bench::generate_throughput(&dir, &[1, 8], new_tokens, temperature, repeats)? {
                println!("{:<6} {:>5} {:>8} {:>6} {:>12.1} {:>12.1} {:>12.1}", format!("{size:?}").to_lowercase(), f.batch, name, f.prompt_tokens, f.prefill_tok_s, f.decode_tok_s, f.end_to_end_tok_s);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}

/// A fresh folder under the system temp dir for a benchmark model.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("bpo-bench-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
