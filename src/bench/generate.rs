//! Generation and bootstrapping throughput on a fixed workload.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use crate::generate::{generate, EngineOptions, Request, SamplingParams};
use crate::model::{LoadOptions, Model, Pass, Runtime, Vlm};
use crate::text::Tokenizer;
use crate::Result;

/// Generation throughput at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateFigures {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prompt tokens per second in the prefill (image encoding included).
    pub prefill_tok_s: f64,
    /// New tokens per second in the KV-cache decode loop (all rows together).
    pub decode_tok_s: f64,
    /// New tokens per second of the whole call, prefill included (what `model.generate` timings report).
    pub end_to_end_tok_s: f64,
}

/// Times prefill and decode of `model` for `batches`, `new_tokens` new tokens each, greedy (`temperature == 0`)
/// or sampled, on prompts of BOS + image positions + 20 text tokens. Each figure is the best of `repeats` runs.
/// `tok` should have EOS disabled so that every run decodes the full length.
pub fn generate_throughput(
    model: &Model,
    tok: &Tokenizer,
    batches: &[usize],
    new_tokens: usize,
    temperature: f32,
    repeats: usize,
) -> Result<Vec<GenerateFigures>> {
    let vision = model.vision.as_ref().map(|v| v.cfg.vision.clone());
    let image = match &vision {
        Some(v) => Some(Tensor::randn(0f32, 1.0, (3, v.image_size, v.image_size), &model.rt.device)?),
        None => None,
    };
    let text: Vec<u32> = (0..20).map(|i| 10 + i as u32).collect();
    let mut ids = vec![1u32];
    ids.extend(std::iter::repeat_n(model.image_token().unwrap_or(0), model.image_tokens()));
    ids.extend(&text);
    let mut out = Vec::new();
    for &b in batches {
        // Each call ends by reading the chosen ids back, which waits for the device.
        let time = |n: usize| -> Result<f64> {
            let params = SamplingParams {
                max_new_tokens: n,
                temperature,
                top_p: if temperature > 0.0 { 0.95 } else { 1.0 },
                ..Default::default()
            };
            let requests: Vec<Request> = (0..b)
                .map(|i| Request {
                    ids: ids.clone(),
                    image: image.clone(),
                    params: params.clone(),
                    seed: i as u64,
                    ..Default::default()
                })
                .collect();
            let mut best = f64::INFINITY;
            for _ in 0..repeats.max(1) {
                let start = Instant::now();
                generate(model, tok, requests.clone(), &EngineOptions::rows(b, None), Pass::INFER)?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let prefill = time(1)?;
        let full = time(new_tokens)?;
        let decode = (full - prefill).max(1e-9);
        out.push(GenerateFigures {
            batch: b,
            prompt_tokens: ids.len(),
            new_tokens,
            prefill_tok_s: (b * ids.len()) as f64 / prefill,
            decode_tok_s: (b * (new_tokens - 1)) as f64 / decode,
            end_to_end_tok_s: (b * new_tokens) as f64 / full,
        });
    }
    Ok(out)
}

/// Throughput of image weakening (`bpo bootstrap weaken`) at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootstrapFigures {
    /// Answers generated together.
    pub batch: usize,
    pub answers: usize,
    /// New tokens per answer.
    pub new_tokens: usize,
    pub seconds: f64,
    /// Bootstrapped answers per second, end to end (image loading, noise, prefill, decoding, writing records).
    pub answers_per_s: f64,
    /// New tokens per second.
    pub tokens_per_s: f64,
}

/// Times [`run_weaken`](crate::bootstrap::run_weaken) on the model folder `dir` (e.g. written by
/// [`super::Size::write_model`]): `answers` prompts with one answer of exactly `new_tokens` tokens each (EOS disabled,
/// temperature 0.2 as released), once per batch size, after a one-answer warm-up. Scratch files (an image, the
/// records) go into `scratch`.
pub fn bootstrap_throughput(
    dir: &Path,
    rt: &Runtime,
    scratch: &Path,
    batches: &[usize],
    answers: usize,
    new_tokens: usize,
    decode: crate::bootstrap::DecodeMode,
) -> Result<Vec<BootstrapFigures>> {
    use crate::bootstrap::{run_weaken, WeakenOptions};
    use crate::data::{Completion, Record, ResumableWriter};
    use crate::progress::Silent;
    let mut vlm = Vlm::load(dir, &LoadOptions::new(rt), crate::text::Template::VicunaV1)?;
    vlm.tok.eos.clear(); // random weights may pick EOS: always decode the full length
    let image = scratch.join("bench.png");
    let pixels: Vec<u8> = (0..320u32 * 240 * 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    image::RgbImage::from_raw(320, 240, pixels)
        .ok_or_else(|| crate::Error::invalid("bench image"))?
        .save(&image)
        .map_err(|e| crate::Error::Image { path: image.clone(), msg: e.to_string() })?;
    let prompt: String = (0..20).map(|i| format!("w{} ", 10 + i)).collect();
    let records: Vec<Record> = (0..answers)
        .map(|i| Record {
            id: format!("bench{i}"),
            prompt: prompt.trim().to_string(),
            image: Some("bench.png".into()),
            completions: vec![Completion::gt("w5 w6 w7")],
        })
        .collect();
    let out = scratch.join("bench-records.jsonl");
    let opts =
        WeakenOptions { images: scratch.to_path_buf(), decode, max_new_tokens: new_tokens, ..Default::default() };
    let mut figures = Vec::new();
    for (k, &batch) in std::iter::once(&1).chain(batches).enumerate() {
        let _ = std::fs::remove_file(&out);
        let (mut writer, _) = ResumableWriter::open(&out)?;
        let rows = if k == 0 { records[..1].to_vec() } else { records.clone() };
        let start = Instant::now();
        run_weaken(&vlm, rows, &WeakenOptions { batch_size: batch, ..opts.clone() }, &mut writer, &Silent)?;
        let seconds = start.elapsed().as_secs_f64();
        if k > 0 {
            figures.push(BootstrapFigures {
                batch,
                answers,
                new_tokens,
                seconds,
                answers_per_s: answers as f64 / seconds,
                tokens_per_s: (answers * new_tokens) as f64 / seconds,
            });
        }
    }
    let _ = std::fs::remove_file(&out);
    Ok(figures)
}
