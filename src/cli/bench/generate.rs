//! `bpo bench generate`: prefill and decode throughput, fixed or bootstrapping's mixed workload.

use std::path::PathBuf;

use bpo::bench::Size;
use clap::Args;

use super::{gib, host_load, mib, scratch_dir, size_name, write_json};
use crate::cli::RuntimeArgs;

#[derive(Args)]
pub(super) struct GenerateBench {
    /// Model shapes: shared/reference.md's tiny and small, or LLaVA-1.5's 7B and 13B (random weights in memory).
    #[arg(long, visible_alias = "preset", value_enum, num_args = 1.., default_values = ["tiny", "small"])]
    size: Vec<Size>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Batch sizes (rows generated together).
    #[arg(long, num_args = 1.., default_values_t = [1, 8], value_parser = crate::cli::range::at_least_one)]
    batch: Vec<usize>,
    /// Decoder layers (default: each preset's own depth), for LLaVA-7B/13B widths on a small machine.
    #[arg(long, value_parser = crate::cli::range::at_least_one)]
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
    #[arg(long, default_value_t = 64, value_parser = crate::cli::range::at_least_one)]
    new_tokens: usize,
    #[arg(long, default_value_t = 3, value_parser = crate::cli::range::at_least_one)]
    repeats: usize,
    /// Also write each size's config.json here (for scripts/bench_torch.py).
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
    /// fixed: one prompt, --new-tokens each, per batch size; mixed: bootstrapping's mix (see above).
    #[arg(long, value_enum, default_value = "fixed")]
    workload: Workload,
    /// Mixed workload: requests per run, at least 1.
    #[arg(long, default_value_t = 96, value_parser = crate::cli::range::at_least_one)]
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
pub(super) enum Workload {
    Fixed,
    Mixed,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum PolicyArg {
    Both,
    Continuous,
    Static,
}

pub(super) fn bench_generate(a: GenerateBench) -> anyhow::Result<()> {
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
pub(super) fn bench_mixed(a: &GenerateBench, rt: &bpo::model::Runtime) -> anyhow::Result<()> {
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
