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
struct TrainBench {
    /// Model shapes: shared/reference.md's tiny and small, or LLaVA-1.5's 7B and 13B (random weights in memory).
    #[arg(long, visible_alias = "preset", value_enum, default_value = "tiny")]
    size: Size,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = super::range::at_least_one)]
    steps: usize,
    /// Preference pairs per step.
    #[arg(long, default_value_t = 4, value_parser = super::range::at_least_one)]
    pairs: usize,
    /// LoRA rank (alpha = 2 x rank).
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    lora_rank: usize,
    /// Projections that get adapters.
    #[arg(long, num_args = 1.., default_values = ["q", "k", "v", "o"])]
    targets: Vec<String>,
    /// The device's dense peak in TFLOP/s in the compute dtype (H100/H200 SXM bf16: 989), for the MFU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also time the plain candle backward, which computes (and drops) gradients for every frozen weight.
    #[arg(long)]
    compare_plain_backward: bool,
    /// Only write the model's config.json here (for scripts/bench_torch_train.py) and exit.
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct GenerateBench {
    /// Model shapes: shared/reference.md's tiny and small, or LLaVA-1.5's 7B and 13B (random weights in memory).
    #[arg(long, visible_alias = "preset", value_enum, num_args = 1.., default_values = ["tiny", "small"])]
    size: Vec<Size>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Batch sizes (rows generated together).
    #[arg(long, num_args = 1.., default_values_t = [1, 8], value_parser = super::range::at_least_one)]
    batch: Vec<usize>,
    /// Greedy only (skip the sampled runs).
    #[arg(long)]
    greedy_only: bool,
    /// The device's memory bandwidth in GB/s (H200: 4800, H100 SXM: 3350), for the decode's bandwidth use.
    #[arg(long)]
    peak_gbs: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 64, value_parser = super::range::at_least_one)]
    new_tokens: usize,
    #[arg(long, default_value_t = 3, value_parser = super::range::at_least_one)]
    repeats: usize,
    /// Also write each size's config.json here (for scripts/bench_torch.py).
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
    /// fixed: one prompt, --new-tokens each, per batch size; mixed: bootstrapping's mix (see above).
    #[arg(long, value_enum, default_value = "fixed")]
    workload: Workload,
    /// Mixed workload: requests per run, at least 1.
    #[arg(long, default_value_t = 96, value_parser = super::range::at_least_one)]
    requests: usize,
    /// Mixed workload: most new tokens of a description, at least 32.
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(32..))]
    longest: usize,
    /// Mixed workload: the batching to time (both: static, then continuous, back to back).
    #[arg(long, value_enum, default_value = "both")]
    policy: PolicyArg,
    /// Mixed workload: seed of the request mix.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Fixed,
    Mixed,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PolicyArg {
    Both,
    Continuous,
    Static,
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
    let rt = a.runtime.runtime()?;
    println!("{} ({})", rt.describe(), host_load());
    if a.workload == Workload::Mixed {
        return bench_mixed(&a, &rt);
    }
    println!(
        "{:<9} {:>5} {:>8} {:>6} {:>12} {:>12} {:>12} {:>8}",
        "size", "batch", "sampling", "prompt", "prefill t/s", "decode t/s", "e2e new t/s", "mbu"
    );
    let mut rows = Vec::new();
    for &size in &a.size {
        let name = size_name(size);
        if let Some(out) = &a.write_config {
            bpo::output::create_dir(out)?;
            bpo::output::write_bytes(
                &out.join(format!("{name}.json")),
                serde_json::to_string_pretty(&size.config())?.as_bytes(),
            )?;
        }
        let dir = scratch_dir()?;
        let mut vlm = size.random_vlm(&rt, &dir)?;
        vlm.tok.eos.clear(); // random weights may pick EOS: always decode the full length
                             // Decoding one token reads every language-model weight once.
        let weight_bytes = size.llm_matmul_params() as f64 * rt.dtype.size_in_bytes() as f64;
        let modes: &[(&str, f32)] =
            if a.greedy_only { &[("greedy", 0.0)] } else { &[("greedy", 0.0), ("sample", 1.0)] };
        for &(sampling, temperature) in modes {
            for f in
                bpo::bench::generate_throughput(&vlm.model, &vlm.tok, &a.batch, a.new_tokens, temperature, a.repeats)?
            {
                let mbu = a.peak_gbs.map(|p| f.decode_tok_s / f.batch as f64 * weight_bytes / (p * 1e9));
                let shown = mbu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m));
                println!(
                    "{name:<9} {:>5} {sampling:>8} {:>6} {:>12.1} {:>12.1} {:>12.1} {shown:>8}",
                    f.batch, f.prompt_tokens, f.prefill_tok_s, f.decode_tok_s, f.end_to_end_tok_s
                );
                rows.push(serde_json::json!({"size": name, "sampling": sampling, "figures": f, "decode_bandwidth_utilisation": mbu}));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"runtime": rt.describe(), "host_load": host_load(), "rows": rows}),
    )
}

/// `bench generate --workload mixed`: each size and batch size through the chosen policies, back to back.
fn bench_mixed(a: &GenerateBench, rt: &bpo::model::Runtime) -> anyhow::Result<()> {
    use bpo::generate::Policy;
    let policies: &[Policy] = match a.policy {
        PolicyArg::Both => &[Policy::Static, Policy::Continuous],
        PolicyArg::Continuous => &[Policy::Continuous],
        PolicyArg::Static => &[Policy::Static],
    };
    println!(
        "{:<7} {:<10} {:>5} {:>8} {:>8} {:>9} {:>7} {:>22} {:>7} {:>9}",
        "size",
        "batching",
        "batch",
        "requests",
        "seconds",
        "new tok/s",
        "req/s",
        "ttft mean/p50/p90 (s)",
        "wasted",
        "occupancy"
    );
    let mut rows = Vec::new();
    for &size in &a.size {
        let name = size_name(size);
        let dir = scratch_dir()?;
        let mut vlm = size.random_vlm(rt, &dir)?;
        vlm.tok.eos.clear(); // random weights may pick EOS: every request generates its full length
        for &batch in &a.batch {
            let mut by_policy = Vec::new();
            for &policy in policies {
                let f = bpo::bench::mixed_workload(&vlm.model, &vlm.tok, batch, a.requests, a.longest, a.seed, policy)?;
                println!(
                    "{name:<7} {:<10} {:>5} {:>8} {:>8.2} {:>9.1} {:>7.2} {:>8.2}/{:>6.2}/{:>6.2} {:>6.1}% {:>8.1}%",
                    f.policy,
                    f.batch,
                    f.requests,
                    f.seconds,
                    f.new_tok_s,
                    f.requests_per_s,
                    f.ttft_mean_s,
                    f.ttft_p50_s,
                    f.ttft_p90_s,
                    100.0 * f.wasted_share,
                    100.0 * f.occupancy
                );
                by_policy.push(f.new_tok_s);
                rows.push(serde_json::json!({"size": name, "figures": f}));
            }
            if let [stat, cont] = by_policy[..] {
                println!("{name:<7} continuous / static at batch {batch}: {:.2}x new tokens/s", cont / stat);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    let peak = bpo::bench::peak_rss_bytes();
    if let Some(p) = peak {
        println!("peak resident memory of this process: {:.1} MiB", p as f64 / (1 << 20) as f64);
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"runtime": rt.describe(), "host_load": host_load(), "workload": "mixed", "seed": a.seed,
            "longest": a.longest, "peak_rss_bytes": peak, "rows": rows}),
    )
}

/// The CLI spelling of a size.
fn size_name(size: Size) -> String {
    use clap::ValueEnum;
    size.to_possible_value().map_or_else(|| format!("{size:?}"), |v| v.get_name().to_string())
}

/// The 1-minute load average, for the record of a timing on a shared machine.
fn host_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into());
    format!("load {load} on {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()))
}

fn write_json(path: Option<&std::path::Path>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        bpo::output::write_bytes(p, serde_json::to_string_pretty(value)?.as_bytes())?;
    }
    Ok(())
}

fn parity(a: ParityBench) -> anyhow::Result<()> {
    let rt = a.runtime.runtime()?;
    let checks = bpo::device_check::run(&a.fixtures, &rt.device)
        .with_context(|| format!("parity checks with the fixtures in {}", a.fixtures.display()))?;
    for c in &checks {
        println!("{} {:<80} {:>12.3e} (limit {:.0e})", if c.pass { "ok  " } else { "FAIL" }, c.name, c.value, c.limit);
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    write_json(a.json.as_deref(), &serde_json::json!({"device": rt.describe(), "checks": checks, "failed": failed}))?;
    if failed > 0 {
        anyhow::bail!("{failed} of {} parity checks failed on {}", checks.len(), rt.describe());
    }
    println!("{} parity checks passed on {}", checks.len(), rt.describe());
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
        bpo::output::write_bytes(path, serde_json::to_string_pretty(&a.size.config())?.as_bytes())?;
        return Ok(());
    }
    let rt = a.runtime.runtime()?;
    println!("{} ({})", rt.describe(), host_load());
    let lora = bpo::model::lora::LoraConfig {
        rank: a.lora_rank,
        alpha: 2.0 * a.lora_rank as f64,
        dropout: 0.0,
        targets: a.targets.clone(),
    };
    let modes: &[bool] = if a.compare_plain_backward { &[false, true] } else { &[false] };
    let mut rows = Vec::new();
    for &plain in modes {
        let bench = bpo::bench::TrainBench {
            size: a.size,
            rt: rt.clone(),
            steps: a.steps,
            pairs: a.pairs,
            lora: lora.clone(),
            plain_backward: plain,
            peak_tflops: a.peak_tflops,
        };
        let f = bpo::bench::train_step(&bench)?;
        let backward = if plain {
            "plain candle backward (frozen-weight gradients computed)"
        } else {
            "frozen weights skipped in backward"
        };
        let mfu = f.mfu.map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m));
        println!("{}: {} rows x {} positions, LoRA r {} on {}, {backward}: {:.3} s/step (median of {}), {:.0} tokens/s, {:.2} pairs/s{mfu}", size_name(a.size), f.rows, f.length, a.lora_rank, a.targets.join(","), f.seconds, f.steps, f.tokens_per_s, f.pairs_per_s);
        rows.push(serde_json::json!({"plain_backward": plain, "figures": f}));
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"size": size_name(a.size), "runtime": rt.describe(), "host_load": host_load(), "lora_rank": a.lora_rank, "targets": a.targets, "rows": rows}),
    )
}
