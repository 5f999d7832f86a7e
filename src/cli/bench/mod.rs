//! `bpo bench ...`: timings of the pipeline's stages on synthetic inputs (benchmarks live here, never in
//! tests). Each stage adds an action.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use std::path::PathBuf;

use anyhow::Context;
use bpo::bench::Size;
use bpo::eval::chair::Chair;
use bpo::eval::{pope, synth};

use super::RuntimeArgs;

mod generate;
mod train;

use generate::{bench_generate, GenerateBench};
use train::{bench_train, TrainBench};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    action: BenchAction,
}

#[derive(Subcommand)]
enum BenchAction {
    /// Time POPE and CHAIR scoring on answers and captions synthesised in memory (no files, no model).
    Eval(EvalBench),
    /// Prefill and decode tokens/s (greedy and sampled) on random-weight models, timed as `model.generate` is in
    /// shared/reference.md: BOS + image positions + 20 text tokens, 64 new tokens, best of 3. --peak-gbs adds the
    /// decode's memory-bandwidth utilisation.
    ///
    /// --workload mixed instead runs bootstrapping's mix (a third yes/no answers of 1-3 tokens, a third short
    /// answers of 4-24, a third descriptions of 32 to --longest, each after an image and a question) through the
    /// engine's continuous batching and through static batching of the same batch size, back to back: new
    /// tokens/s, requests/s, time to first token, the share of row-steps wasted on finished rows, peak memory.
    Generate(GenerateBench),
    /// Seconds per DPO step, tokens/s and pairs/s: 4 pairs (8 rows), LoRA r 8 on q/k/v/o by default (the paper:
    /// --lora-rank 64 --targets q k v o gate up down), reference = adapters off computed every step, AdamW. Prints
    /// the median over the timed steps (the first step is a warm-up); --peak-tflops adds the model FLOP utilisation.
    Train(TrainBench),
    /// The GPU check without a Rust toolchain: transformers parity fixtures (f32 and bf16) on --device, and one
    /// LoRA-DPO step there against the same step on the CPU. Prints each check; exits non-zero if one fails.
    Parity(ParityBench),
    /// Bootstrapped answers per second: `bootstrap weaken` end to end (image loading, noise, prefill, decoding,
    /// writing records) with batching off (batch 1) and on.
    Bootstrap(BootstrapBench),
    /// `bpo serve` under load: a server in this process on 127.0.0.1 and N concurrent clients (streaming chat
    /// requests, greedy), against one client at a time: requests/s, tokens/s, p50/p99 latency and time to first
    /// token. --load instead sends a long mixed load with malformed requests and reports failures and memory.
    Serve(super::serve_bench::ServeBench),
}

#[derive(Args)]
struct BootstrapBench {
    /// Model configuration, built with random weights in a temporary folder.
    #[arg(long, value_enum, default_value = "small")]
    size: Size,
    /// Time this model folder instead of a random-weight one.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Batch sizes to time (answers generated together).
    #[arg(long, num_args = 1.., default_values_t = [1, 8], value_parser = super::range::at_least_one)]
    batch: Vec<usize>,
    /// Answers per timing (one per prompt).
    #[arg(long, default_value_t = 16, value_parser = super::range::at_least_one)]
    answers: usize,
    /// New tokens per answer (EOS is disabled, so every answer has exactly this many).
    #[arg(long, default_value_t = 32, value_parser = super::range::at_least_one)]
    new_tokens: usize,
    /// Decoding mode; the contrast modes run a clean-image row beside each answer.
    #[arg(long, value_enum, default_value = "noisy")]
    decode: super::bootstrap::Decode,
}

#[derive(Args)]
struct ParityBench {
    /// The parity fixtures: the repository's tests/fixtures.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Also write the checks as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct EvalBench {
    /// POPE answers to score (the full POPE COCO set is 9,000; 30k is a generous upper bound).
    #[arg(long, default_value_t = 30_000, value_parser = super::range::at_least_one)]
    pope: usize,
    /// Captions to score with CHAIR (CHAIR on COCO commonly uses 500 to 5,000).
    #[arg(long, default_value_t = 5_000, value_parser = super::range::at_least_one)]
    captions: usize,
    /// Words per synthetic caption (LLaVA-1.5 detailed descriptions run about 100).
    #[arg(long, default_value_t = 100, value_parser = super::range::at_least_one)]
    words: usize,
    /// Timed repetitions of each step; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = super::range::at_least_one)]
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
        BenchAction::Parity(a) => parity(a),
        BenchAction::Serve(a) => super::serve_bench::run(a),
    }
}

fn bench_eval(args: EvalBench) -> anyhow::Result<()> {
    let repeats = args.repeats.max(1);
    let (questions, answers) = synth::pope(args.pope, args.seed);
    let t = median(repeats, || pope::score(&questions, &answers, pope::Pairing::ById).map(|_| ()))?;
    outln!("POPE   score {:>6} answers (by id)      {:>9.2} ms", answers.len(), ms(t));

    let t = median(repeats, || Chair::builtin().map(|_| ()))?;
    outln!("CHAIR  build word tables                 {:>9.2} ms", ms(t));
    let chair = Chair::builtin()?;
    let (captions, truth) = synth::captions(args.captions, args.words, args.seed);
    let t = median(repeats, || chair.score(&captions, &truth).map(|_| ()))?;
    let words: usize = captions.iter().map(|c| c.text.split(' ').count()).sum();
    outln!("CHAIR  score {:>6} captions ({} words) {:>9.2} ms", captions.len(), words, ms(t));
    let build = if cfg!(debug_assertions) { "debug assertions on" } else { "release" };
    outln!("(median of {repeats} runs; {build})");
    Ok(())
}

/// Median wall time of `repeats` calls of `f`.
pub(super) fn median(repeats: usize, mut f: impl FnMut() -> bpo::Result<()>) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bytes in MiB.
pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The CLI spelling of a size.
pub(super) fn size_name(size: Size) -> String {
    use clap::ValueEnum;
    size.to_possible_value().map_or_else(|| format!("{size:?}"), |v| v.get_name().to_string())
}

/// The 1-minute load average, for the record of a timing on a shared machine.
pub(super) fn host_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into());
    format!("load {load} on {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()))
}

/// Writes a benchmark's `--json` report, if one was asked for.
pub(super) fn write_json(path: Option<&std::path::Path>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        bpo::output::write_json(p, value)?;
    }
    Ok(())
}

fn parity(a: ParityBench) -> anyhow::Result<()> {
    let rt = a.runtime.runtime()?;
    let checks = bpo::device_check::run(&a.fixtures, &rt.device)
        .with_context(|| format!("parity checks with the fixtures in {}", a.fixtures.display()))?;
    for c in &checks {
        outln!("{} {:<80} {:>12.3e} (limit {:.0e})", if c.pass { "ok  " } else { "FAIL" }, c.name, c.value, c.limit);
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    write_json(a.json.as_deref(), &serde_json::json!({"device": rt.describe(), "checks": checks, "failed": failed}))?;
    if failed > 0 {
        anyhow::bail!("{failed} of {} parity checks failed on {}", checks.len(), rt.describe());
    }
    outln!("{} parity checks passed on {}", checks.len(), rt.describe());
    Ok(())
}

/// A fresh folder under the system temp dir for a benchmark model.
pub(super) fn scratch_dir() -> anyhow::Result<std::path::PathBuf> {
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
        let figures = bpo::bench::bootstrap_throughput(
            &dir,
            &a.runtime.runtime()?,
            &scratch,
            &a.batch,
            a.answers,
            a.new_tokens,
            decode,
        )?;
        let what = a.model.as_ref().map_or(format!("{:?} (random weights)", a.size), |m| m.display().to_string());
        outln!("bootstrap weaken on {what}, {} answers x {} new tokens, decode {decode:?}", a.answers, a.new_tokens);
        outln!("{:>6} {:>10} {:>10} {:>10}", "batch", "seconds", "answers/s", "tokens/s");
        for f in figures {
            outln!("{:>6} {:>10.2} {:>10.2} {:>10.1}", f.batch, f.seconds, f.answers_per_s, f.tokens_per_s);
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&scratch).ok();
    result
}

pub(super) fn gib(bytes: u64) -> f64 {
    bpo::memory::gib(bytes)
}
