//! `bpo bench train`: seconds per DPO (or mDPO) step, throughput and memory.

use std::path::PathBuf;

use bpo::bench::Size;
use clap::Args;

use super::{gib, host_load, size_name, write_json};
use crate::cli::train::Objective;
use crate::cli::RuntimeArgs;

#[derive(Args)]
pub(super) struct TrainBench {
    /// Model shapes: shared/reference.md's tiny and small, or LLaVA-1.5's 7B and 13B (random weights in memory).
    #[arg(long, visible_alias = "preset", value_enum, default_value = "tiny")]
    size: Size,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = crate::cli::range::at_least_one)]
    steps: usize,
    /// Preference pairs per step; several values are timed one after the other (a setting that fails, e.g. out
    /// of memory, is reported and the others still run).
    #[arg(long, num_args = 1.., default_values_t = [4], value_parser = crate::cli::range::at_least_one)]
    pairs: Vec<usize>,
    /// Decoder layers (default: the preset's own depth). LLaVA-7B/13B widths with a few layers run on a small
    /// machine; two depths separate the per-layer cost (time, activation memory) from the fixed one.
    #[arg(long, value_parser = crate::cli::range::at_least_one)]
    layers: Option<usize>,
    /// Words (one token each) of each prompt after BOS and the image positions. With llava-7b, 52 prompt and 100
    /// answer words make rows of 730 positions (576 of them the image).
    #[arg(long, default_value_t = 9, value_parser = crate::cli::range::at_least_one)]
    prompt_words: usize,
    /// Words of each answer (chosen and rejected alike), before its EOS.
    #[arg(long, default_value_t = 9, value_parser = crate::cli::range::at_least_one)]
    answer_words: usize,
    /// LoRA rank (alpha = 2 x rank).
    #[arg(long, default_value_t = 8, value_parser = crate::cli::range::at_least_one)]
    lora_rank: usize,
    /// LoRA dropout; several values are timed one after the other (training's default is 0.05).
    #[arg(long, num_args = 1.., default_values_t = [0.0], value_parser = crate::cli::range::below_one::<f32>)]
    lora_dropout: Vec<f32>,
    /// Objectives timed one after the other: dpo, mdpo (one more prompt and chosen answer per pair, with the
    /// corrupted image; the tower encodes it every step too). With both, the ratio of their step times is printed.
    #[arg(long, num_args = 1.., value_enum, default_values = ["dpo"])]
    objective: Vec<Objective>,
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
pub(super) enum Switch {
    Off,
    On,
}

pub(super) fn bench_train(a: TrainBench) -> anyhow::Result<()> {
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
    let mut seconds: Vec<(Objective, f64)> = Vec::new();
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
                    mdpo: objective == Objective::Mdpo,
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
    let (dpo, mdpo) = (total(Objective::Dpo), total(Objective::Mdpo));
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
pub(super) fn print_train_row(a: &TrainBench, f: &bpo::bench::TrainFigures, plain: bool) {
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
