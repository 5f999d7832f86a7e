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
struct TrainBench {
    /// Model shapes: shared/reference.md's tiny and small, or LLaVA-1.5's 7B and 13B (random weights in memory).
    #[arg(long, visible_alias = "preset", value_enum, default_value = "tiny")]
    size: Size,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = super::range::at_least_one)]
    steps: usize,
    /// Preference pairs per step; several values are timed one after the other (a setting that fails, e.g. out
    /// of memory, is reported and the others still run).
    #[arg(long, num_args = 1.., default_values_t = [4], value_parser = super::range::at_least_one)]
    pairs: Vec<usize>,
    /// Decoder layers (default: the preset's own depth). LLaVA-7B/13B widths with a few layers run on a small
    /// machine; two depths separate the per-layer cost (time, activation memory) from the fixed one.
    #[arg(long, value_parser = super::range::at_least_one)]
    layers: Option<usize>,
    /// Words (one token each) of each prompt after BOS and the image positions. With llava-7b, 52 prompt and 100
    /// answer words make rows of 730 positions (576 of them the image).
    #[arg(long, default_value_t = 9, value_parser = super::range::at_least_one)]
    prompt_words: usize,
    /// Words of each answer (chosen and rejected alike), before its EOS.
    #[arg(long, default_value_t = 9, value_parser = super::range::at_least_one)]
    answer_words: usize,
    /// LoRA rank (alpha = 2 x rank).
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    lora_rank: usize,
    /// LoRA dropout; several values are timed one after the other (training's default is 0.05).
    #[arg(long, num_args = 1.., default_values_t = [0.0], value_parser = super::range::below_one::<f32>)]
    lora_dropout: Vec<f32>,
    /// Objectives timed one after the other: dpo, mdpo (one more prompt and chosen answer per pair, with the
    /// corrupted image; the tower encodes it every step too). With both, the ratio of their step times is printed.
    #[arg(long, num_args = 1.., value_enum, default_values = ["dpo"])]
    objective: Vec<super::train::Objective>,
    /// Gradient checkpointing off, on, or both (timed one after the other, for the ratio).
    #[arg(long, num_args = 1.., value_enum, default_values = ["off"])]
    gradient_checkpointing: Vec<Switch>,
    /// Run the device-generic ops path (what CUDA runs) even in f32 on the CPU, where the fused CPU kernels are
    /// the default.
    #[arg(long)]
    generic_ops: bool,
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

/// A setting timed off, on, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    Off,
    On,
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
    /// Decoder layers (default: each preset's own depth), for LLaVA-7B/13B widths on a small machine.
    #[arg(long, value_parser = super::range::at_least_one)]
    layers: Option<usize>,
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
    outln!("{} ({})", rt.describe(), host_load());
    if a.workload == Workload::Mixed {
        return bench_mixed(&a, &rt);
    }
    outln!(
        "{:<9} {:>5} {:>8} {:>6} {:>12} {:>12} {:>12} {:>8}",
        "size",
        "batch",
        "sampling",
        "prompt",
        "prefill t/s",
        "decode t/s",
        "e2e new t/s",
        "mbu"
    );
    let (mut rows, mut memory) = (Vec::new(), Vec::new());
    for &size in &a.size {
        let name = size_name(size);
        if let Some(out) = &a.write_config {
            bpo::output::create_dir(out)?;
            bpo::output::write_bytes(
                &out.join(format!("{name}.json")),
                serde_json::to_string_pretty(&size.config_with_layers(a.layers))?.as_bytes(),
            )?;
        }
        let dir = scratch_dir()?;
        let before_load = bpo::memory::in_use(&rt.device);
        let mut vlm = size.random_vlm_with_layers(a.layers, &rt, &dir)?;
        let weights = before_load.zip(bpo::memory::in_use(&rt.device)).map(|(b, z)| z.saturating_sub(b));
        vlm.tok.eos.clear(); // random weights may pick EOS: always decode the full length
                             // Decoding one token reads every language-model weight once.
        let weight_bytes = size.llm_matmul_params_with_layers(a.layers) as f64 * rt.dtype.size_in_bytes() as f64;
        let probe = bpo::memory::Probe::start(&rt.device);
        let modes: &[(&str, f32)] =
            if a.greedy_only { &[("greedy", 0.0)] } else { &[("greedy", 0.0), ("sample", 1.0)] };
        for &(sampling, temperature) in modes {
            for f in
                bpo::bench::generate_throughput(&vlm.model, &vlm.tok, &a.batch, a.new_tokens, temperature, a.repeats)?
            {
                let mbu = a.peak_gbs.map(|p| f.decode_tok_s / f.batch as f64 * weight_bytes / (p * 1e9));
                let shown = mbu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m));
                outln!(
                    "{name:<9} {:>5} {sampling:>8} {:>6} {:>12.1} {:>12.1} {:>12.1} {shown:>8}",
                    f.batch,
                    f.prompt_tokens,
                    f.prefill_tok_s,
                    f.decode_tok_s,
                    f.end_to_end_tok_s
                );
                rows.push(serde_json::json!({"size": name, "sampling": sampling, "figures": f, "decode_bandwidth_utilisation": mbu}));
            }
        }
        let m = probe.finish();
        let heap = m.heap_peak_growth_bytes.map_or(String::new(), |h| format!(", heap peak growth {:.2} GiB", gib(h)));
        let w = weights.map_or(String::new(), |w| format!(", weights {:.2} GiB", gib(w)));
        outln!(
            "{name:<9} memory ({}): peak {:.2} GiB, growth over the loaded model {:.2} GiB{heap}{w}",
            m.device,
            gib(m.peak_bytes),
            gib(m.peak_growth_bytes)
        );
        memory.push(serde_json::json!({"size": name, "weight_bytes": weights, "memory": m}));
        std::fs::remove_dir_all(&dir).ok();
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"runtime": rt.describe(), "host_load": host_load(), "rows": rows, "memory": memory}),
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
    outln!(
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
        let mut vlm = size.random_vlm_with_layers(a.layers, rt, &dir)?;
        vlm.tok.eos.clear(); // random weights may pick EOS: every request generates its full length
        for &batch in &a.batch {
            let mut by_policy = Vec::new();
            for &policy in policies {
                let f = bpo::bench::mixed_workload(&vlm.model, &vlm.tok, batch, a.requests, a.longest, a.seed, policy)?;
                outln!(
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
                outln!(
                    "{:<7} {:<10} memory: peak {:.1} MiB, {:.1} MiB over the {:.1} MiB before the run",
                    "",
                    "",
                    mib(f.memory.peak_bytes),
                    mib(f.memory.peak_growth_bytes),
                    mib(f.memory.baseline_bytes)
                );
                by_policy.push(f.new_tok_s);
                rows.push(serde_json::json!({"size": name, "figures": f}));
            }
            if let [stat, cont] = by_policy[..] {
                outln!("{name:<7} continuous / static at batch {batch}: {:.2}x new tokens/s", cont / stat);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"runtime": rt.describe(), "host_load": host_load(), "workload": "mixed", "seed": a.seed,
            "longest": a.longest, "rows": rows}),
    )
}

/// Bytes in MiB.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
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

/// Writes a benchmark's `--json` report, if one was asked for.
fn write_json(path: Option<&std::path::Path>, value: &serde_json::Value) -> anyhow::Result<()> {
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

fn bench_train(a: TrainBench) -> anyhow::Result<()> {
    if let Some(path) = &a.write_config {
        let cfg = a.size.config_with_layers(a.layers);
        bpo::output::write_bytes(path, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        return Ok(());
    }
    let rt = a.runtime.runtime()?;
    let rt = if a.generic_ops { bpo::model::Runtime::generic(rt.device, rt.dtype) } else { rt };
    let ops = if rt.kernels == bpo::model::Kernels::Fused { "fused CPU kernels" } else { "device-generic ops" };
    outln!("{}, {ops} ({})", rt.describe(), host_load());
    let plain_modes: &[bool] = if a.compare_plain_backward { &[false, true] } else { &[false] };
    let mut rows = Vec::new();
    let mut failed = 0;
    let variants = a.pairs.iter().flat_map(|&p| plain_modes.iter().map(move |&plain| (p, plain)));
    let objectives = a.objective.iter().flat_map(|&o| variants.clone().map(move |v| (o, v)));
    let mut seconds: Vec<(super::train::Objective, f64)> = Vec::new();
    for (objective, (pairs, plain)) in objectives {
        for &checkpointing in &a.gradient_checkpointing {
            for &dropout in &a.lora_dropout {
                let bench = bpo::bench::TrainBench {
                    size: a.size,
                    layers: a.layers,
                    rt: rt.clone(),
                    steps: a.steps,
                    pairs,
                    prompt_words: a.prompt_words,
                    answer_words: a.answer_words,
                    lora: bpo::model::lora::LoraConfig {
                        rank: a.lora_rank,
                        alpha: 2.0 * a.lora_rank as f64,
                        dropout,
                        targets: a.targets.clone(),
                    },
                    gradient_checkpointing: checkpointing == Switch::On,
                    plain_backward: plain,
                    peak_tflops: a.peak_tflops,
                    mdpo: objective == super::train::Objective::Mdpo,
                };
                match bpo::bench::train_step(&bench) {
                    Ok(f) => {
                        print_train_row(&a, &f, plain);
                        seconds.push((objective, f.seconds));
                        rows.push(serde_json::json!({"plain_backward": plain, "figures": f}));
                    }
                    Err(e) => {
                        failed += 1;
                        let what = format!("{pairs} pairs, checkpointing {checkpointing:?}, dropout {dropout}");
                        errln!("{} ({what}): failed: {e}", size_name(a.size));
                        rows.push(serde_json::json!({"plain_backward": plain, "pairs": pairs, "gradient_checkpointing": checkpointing == Switch::On, "lora_dropout": dropout, "error": e.to_string()}));
                    }
                }
            }
        }
    }
    let total = |o| seconds.iter().filter(|s| s.0 == o).map(|s| s.1).sum::<f64>();
    let (dpo, mdpo) = (total(super::train::Objective::Dpo), total(super::train::Objective::Mdpo));
    if dpo > 0.0 && mdpo > 0.0 {
        outln!("mdpo / dpo step time: {:.2}x (same settings, timed back to back; {})", mdpo / dpo, host_load());
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({"size": size_name(a.size), "runtime": rt.describe(), "host_load": host_load(), "lora_rank": a.lora_rank, "targets": a.targets, "rows": rows}),
    )?;
    if failed > 0 {
        anyhow::bail!("{failed} of {} settings failed (above)", rows.len());
    }
    Ok(())
}

/// One line of `bench train`: the step's shape and settings, then time and memory.
fn print_train_row(a: &TrainBench, f: &bpo::bench::TrainFigures, plain: bool) {
    let backward = if plain { ", plain candle backward (frozen-weight gradients computed)" } else { "" };
    let ckpt = if f.gradient_checkpointing { "on" } else { "off" };
    let mfu = f.mfu.map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m));
    let m = &f.memory;
    let heap = m.heap_peak_growth_bytes.map_or(String::new(), |h| format!(", heap peak growth {:.2} GiB", gib(h)));
    let setup = f.setup_bytes.map_or(String::new(), |b| format!(", model + optimizer {:.2} GiB", gib(b)));
    let objective = if f.mdpo { "mdpo, " } else { "" };
    outln!(
        "{objective}{} x {} layers: {} rows x {} positions, LoRA r {} on {} (dropout {}), checkpointing {ckpt}{backward}: \
         {:.3} s/step (median of {}), {:.0} tokens/s, {:.2} pairs/s{mfu}; memory ({}) peak {:.2} GiB, \
         growth {:.2} GiB{heap}{setup}",
        size_name(a.size),
        f.layers,
        f.rows,
        f.length,
        a.lora_rank,
        a.targets.join(","),
        f.lora_dropout,
        f.seconds,
        f.steps,
        f.tokens_per_s,
        f.pairs_per_s,
        m.device,
        gib(m.peak_bytes),
        gib(m.peak_growth_bytes),
    );
}

fn gib(bytes: u64) -> f64 {
    bpo::memory::gib(bytes)
}
