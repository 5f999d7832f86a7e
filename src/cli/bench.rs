//! `bpo bench ...`: timings of the pipeline's stages on synthetic inputs (benchmarks live here, never in
//! tests). Each stage adds an action.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use std::path::PathBuf;

use anyhow::Context;
use bpo::bench::Size;
use bpo::eval::chair::Chair;
use bpo::eval::{pope, synth};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    action: BenchAction,
}

#[derive(Subcommand)]
enum BenchAction {
    /// Time POPE and CHAIR scoring on answers and captions synthesised in memory (no files, no model).
    Eval(EvalBench),
    /// Prefill and decode tokens/s at batch 1 and 8 (greedy and sampled) on random-weight models of
    /// shared/reference.md's sizes, timed as `model.generate` is there: BOS + image positions + 20 text tokens,
    /// 64 new tokens, best of 3.
    Generate(GenerateBench),
    /// Seconds per DPO step and tokens/s: 4 pairs (8 rows), LoRA r 8 on q/k/v/o, reference = adapters off
    /// computed every step, AdamW. Prints the median over the timed steps (the first step is a warm-up).
    Train(TrainBench),
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

#[derive(Args)]
struct TrainBench {
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

#[derive(Args)]
struct GenerateBench {
    #[arg(long, value_enum, default_values = ["tiny", "small"])]
    size: Vec<Size>,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write each size's config.json here (for scripts/bench_torch.py).
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct EvalBench {
    /// POPE answers to score (the full POPE COCO set is 9,000; 30k is a generous upper bound).
    #[arg(long, default_value_t = 30_000)]
    pope: usize,
    /// Captions to score with CHAIR (CHAIR on COCO commonly uses 500 to 5,000).
    #[arg(long, default_value_t = 5_000)]
    captions: usize,
    /// Words per synthetic caption (LLaVA-1.5 detailed descriptions run about 100).
    #[arg(long, default_value_t = 100)]
    words: usize,
    /// Timed repetitions of each step; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.action {
        BenchAction::Eval(a) => bench_eval(a),
        BenchAction::Generate(a) => bench_generate(a),
        BenchAction::Train(a) => bench_train(a),
        BenchAction::Bootstrap(a) => bootstrap(a),
    }
}

fn bench_eval(args: EvalBench) -> anyhow::Result<()> {
    let repeats = args.repeats.max(1);
    let (questions, answers) = synth::pope(args.pope, args.seed);
    let t = median(repeats, || pope::score(&questions, &answers, pope::Pairing::ById).map(|_| ()))?;
    println!("POPE   score {:>6} answers (by id)      {:>9.2} ms", answers.len(), ms(t));

    let t = median(repeats, || Chair::builtin().map(|_| ()))?;
    println!("CHAIR  build word tables                 {:>9.2} ms", ms(t));
    let chair = Chair::builtin()?;
    let (captions, truth) = synth::captions(args.captions, args.words, args.seed);
    let t = median(repeats, || chair.score(&captions, &truth).map(|_| ()))?;
    let words: usize = captions.iter().map(|c| c.text.split(' ').count()).sum();
    println!("CHAIR  score {:>6} captions ({} words) {:>9.2} ms", captions.len(), words, ms(t));
    let build = if cfg!(debug_assertions) { "debug assertions on" } else { "release" };
    println!("(median of {repeats} runs; {build})");
    Ok(())
}

/// Median wall time of `repeats` calls of `f`.
fn median(repeats: usize, mut f: impl FnMut() -> bpo::Result<()>) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_generate(a: GenerateBench) -> anyhow::Result<()> {
    println!("{:<6} {:>5} {:>8} {:>6} {:>12} {:>12} {:>12}", "size", "batch", "sampling", "prompt", "prefill t/s", "decode t/s", "e2e new t/s");
    for &size in &a.size {
        let dir = scratch_dir()?;
        size.write_model(&dir, 0)?;
        let name = format!("{size:?}").to_lowercase();
        if let Some(out) = &a.write_config {
            std::fs::create_dir_all(out)?;
            std::fs::write(out.join(format!("{name}.json")), serde_json::to_string_pretty(&size.config())?)?;
        }
        for (sampling, temperature) in [("greedy", 0.0), ("sample", 1.0)] {
            for f in bpo::bench::generate_throughput(&dir, &[1, 8], a.new_tokens, temperature, a.repeats)? {
                println!("{name:<6} {:>5} {sampling:>8} {:>6} {:>12.1} {:>12.1} {:>12.1}", f.batch, f.prompt_tokens, f.prefill_tok_s, f.decode_tok_s, f.end_to_end_tok_s);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}

/// A fresh folder under the system temp dir for a benchmark model.
fn scratch_dir() -> anyhow::Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let dir = std::env::temp_dir().join(format!("bpo-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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

fn bench_train(a: TrainBench) -> anyhow::Result<()> {
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
