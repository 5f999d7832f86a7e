//! Benchmarks on random-weight models of the configurations in `shared/reference.md` ("tiny" and "small"), built
//! on the fly with [`crate::model::init`], so the numbers can be compared with the PyTorch baseline measured there.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use crate::generate::{generate, Request, SamplingParams};
use crate::model::{init, load, LoadOptions, Pass};
use crate::text::Tokenizer;
use crate::Result;

/// Model sizes of `shared/reference.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// Llama 128 hidden, 2 layers, GQA 4/2 heads; CLIP 32 px, patch 8; vocab 1024 (0.7 M parameters).
    Tiny,
    /// Llama 512 hidden, 8 layers; CLIP 224 px, patch 14, 4 layers; vocab 32064 (62 M parameters).
    Small,
}

impl Size {
    /// The llava-hf `config.json` of this size.
    pub fn config(self) -> serde_json::Value {
        let (text, vision, vocab) = match self {
            Size::Tiny => ((128, 256, 2, 4, 2), (32, 8, 64, 256, 2, 4), 1024),
            Size::Small => ((512, 1376, 8, 8, 8), (224, 14, 256, 1024, 4, 4), 32064),
        };
        serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 4, "pad_token_id": 3, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": text.0, "intermediate_size": text.1,
                "num_hidden_layers": text.2, "num_attention_heads": text.3, "num_key_value_heads": text.4,
                "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
            "vision_config": {"model_type": "clip_vision_model", "image_size": vision.0, "patch_size": vision.1,
                "hidden_size": vision.2, "intermediate_size": vision.3, "num_hidden_layers": vision.4,
                "num_attention_heads": vision.5, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        })
    }

    /// Writes a random-weight model folder of this size (config, weights, a word-level tokenizer, and the
    /// image processor settings of its CLIP resolution).
    pub fn write_model(self, dir: &Path, seed: u64) -> Result<()> {
        let cfg = self.config();
        init::random_checkpoint(dir, &cfg, seed)?;
        let px = &cfg["vision_config"]["image_size"];
        let pre = serde_json::json!({"size": {"shortest_edge": px}, "crop_size": {"height": px, "width": px}});
        let pre_path = dir.join("preprocessor_config.json");
        std::fs::write(&pre_path, pre.to_string()).map_err(|e| crate::Error::io(&pre_path, e))?;
        let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(1024) as usize;
        let n_special = crate::text::tokenizer::WORD_LEVEL_SPECIALS.len();
        let words: Vec<String> = (n_special..vocab).map(|i| format!("w{i}")).collect();
        crate::text::tokenizer::write_word_level(dir, &words)
    }
}

/// Generation throughput at one batch size.
#[derive(Debug, Clone)]
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

/// Times prefill and decode for `batches`, `new_tokens` new tokens each, greedy (`temperature == 0`) or sampled.
/// Each figure is the best of `repeats` runs.
pub fn generate_throughput(dir: &Path, batches: &[usize], new_tokens: usize, temperature: f32, repeats: usize) -> Result<Vec<GenerateFigures>> {
    let model = load(dir, &LoadOptions::default())?;
    let mut tok = Tokenizer::from_dir(dir, &[])?;
    tok.eos.clear(); // random weights may pick EOS: always decode the full length
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
        let requests: Vec<Request> = (0..b).map(|_| Request { ids: ids.clone(), image: image.clone() }).collect();
        let time = |n: usize| -> Result<f64> {
            let params = SamplingParams { max_new_tokens: n, temperature, top_p: if temperature > 0.0 { 0.95 } else { 1.0 }, ..Default::default() };
            let mut best = f64::INFINITY;
            for _ in 0..repeats.max(1) {
                let start = Instant::now();
                generate(&model, &tok, &requests, &params, Pass::INFER)?;
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
/// [`Size::write_model`]): `answers` prompts with one answer of exactly `new_tokens` tokens each (EOS disabled,
/// temperature 0.2 as released), once per batch size, after a one-answer warm-up. Scratch files (an image, the
/// records) go into `scratch`.
pub fn bootstrap_throughput(dir: &Path, scratch: &Path, batches: &[usize], answers: usize, new_tokens: usize, decode: crate::bootstrap::DecodeMode) -> Result<Vec<BootstrapFigures>> {
    use crate::bootstrap::{run_weaken, Completion, Record, ResumableWriter, WeakenOptions};
    let mut vlm = crate::generate::Vlm::load(dir, &LoadOptions::default(), crate::text::Template::VicunaV1)?;
    vlm.tok.eos.clear(); // random weights may pick EOS: always decode the full length
    let image = scratch.join("bench.png");
    let pixels: Vec<u8> = (0..320u32 * 240 * 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    image::RgbImage::from_raw(320, 240, pixels).ok_or_else(|| crate::Error::invalid("bench image"))?.save(&image).map_err(|e| crate::Error::Image { path: image.clone(), msg: e.to_string() })?;
    let prompt: String = (0..20).map(|i| format!("w{} ", 10 + i)).collect();
    let records: Vec<Record> = (0..answers).map(|i| Record { id: format!("bench{i}"), prompt: prompt.trim().to_string(), image: Some("bench.png".into()), completions: vec![Completion::gt("w5 w6 w7")] }).collect();
    let out = scratch.join("bench-records.jsonl");
    let opts = WeakenOptions { images: scratch.to_path_buf(), decode, max_new_tokens: new_tokens, ..Default::default() };
    let mut figures = Vec::new();
    for (k, &batch) in std::iter::once(&1).chain(batches).enumerate() {
        let _ = std::fs::remove_file(&out);
        let (mut writer, _) = ResumableWriter::open(&out)?;
        let rows = if k == 0 { records[..1].to_vec() } else { records.clone() };
        let start = Instant::now();
        run_weaken(&vlm, rows, &WeakenOptions { batch_size: batch, ..opts.clone() }, &mut writer)?;
        let seconds = start.elapsed().as_secs_f64();
        if k > 0 {
            figures.push(BootstrapFigures { batch, answers, new_tokens, seconds, answers_per_s: answers as f64 / seconds, tokens_per_s: (answers * new_tokens) as f64 / seconds });
        }
    }
    let _ = std::fs::remove_file(&out);
    Ok(figures)
}

/// One DPO training-step measurement.
#[derive(Debug, Clone)]
pub struct TrainFigures {
    /// Rows per step (2 per pair) and the length of each row.
    pub rows: usize,
    pub length: usize,
    /// Median seconds per optimizer step over the timed steps.
    pub seconds: f64,
    pub steps: usize,
    pub tokens_per_s: f64,
}

/// Times `steps` DPO steps (after one warm-up step) on a random model of `size`: 4 pairs of BOS + image + 9
/// words of prompt and 9 words + EOS of answer, LoRA r 8 (alpha 16) on q/k/v/o, projector frozen, reference with
/// adapters off computed every step, AdamW, no feature cache (the tower runs every step, as in PyTorch).
/// `plain_backward` routes frozen weights through candle's plain matmul, whose backward also builds their
/// gradients, to measure what skipping them saves.
pub fn train_step(size: Size, steps: usize, plain_backward: bool) -> Result<TrainFigures> {
    use crate::train::{dpo, trainer::LoopConfig, DpoLoss, ModelSetup, ScheduleKind};
    let dir = std::env::temp_dir().join(format!("bpo-bench-train-{}-{size:?}", std::process::id()));
    let result = (|| {
        let model_dir = dir.join("model");
        size.write_model(&model_dir, 0)?;
        let side = size.config()["vision_config"]["image_size"].as_u64().unwrap_or(32) as u32;
        let pre = serde_json::json!({"crop_size": {"height": side, "width": side}, "size": {"shortest_edge": side}, "do_center_crop": true, "resample": 3});
        std::fs::write(model_dir.join("preprocessor_config.json"), pre.to_string()).map_err(|e| crate::Error::io(&model_dir, e))?;
        let words = |start: usize| (start..start + 9).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let mut rows = String::new();
        for p in 0..4 {
            let img = format!("img{p}.png");
            image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7 + p * 50) as u8, (y * 5) as u8, ((x + y) * 3) as u8])).save(dir.join(&img)).map_err(crate::Error::invalid)?;
            rows.push_str(&format!("{}\n", serde_json::json!({"id": p, "prompt": words(10 + p as usize), "image": img, "chosen": words(100 + p as usize), "rejected": words(200 + p as usize)})));
        }
        let data = dir.join("pairs.jsonl");
        std::fs::write(&data, rows).map_err(|e| crate::Error::io(&data, e))?;
        let cfg = dpo::DpoConfig {
            setup: ModelSetup {
                model: model_dir,
                template: crate::text::Template::Plain,
                prompt_style: crate::text::PromptStyle::Llava,
                aspect: crate::vision::AspectMode::Square,
                lora: Some(crate::model::lora::LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: ["q", "k", "v", "o"].map(String::from).to_vec() }),
                train_projector: false,
                train_vision: false,
                init_adapter: None,
                runtime: Default::default(),
            },
            data,
            images: Some(dir.clone()),
            max_words: None,
            max_length: 4096,
            loss: DpoLoss::default(),
            drifting_ref_projector: false,
            precompute_ref: false,
            feature_cache_mb: 0,
            optim: LoopConfig { lr: 1e-4, schedule: ScheduleKind::Constant, warmup_ratio: 0.0, epochs: steps + 1, batch_size: 4, ..Default::default() },
        };
        let mut rec = StepTimes(Vec::new());
        crate::model::ops::PLAIN_FROZEN_MATMUL.store(plain_backward, std::sync::atomic::Ordering::SeqCst);
        let run = dpo::train(&cfg, &dir.join("run"), false, None, &mut rec, &mut |_| {});
        crate::model::ops::PLAIN_FROZEN_MATMUL.store(false, std::sync::atomic::Ordering::SeqCst);
        run?;
        let mut timed: Vec<(f64, f64)> = rec.0.into_iter().skip(1).collect();
        timed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (seconds, tokens) = timed.get(timed.len() / 2).copied().unwrap_or((f64::NAN, 0.0));
        let length = 1 + size.image_positions() + 9 + 10;
        Ok(TrainFigures { rows: 8, length, seconds, steps: timed.len(), tokens_per_s: tokens / seconds })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Collects (seconds, tokens) per step.
struct StepTimes(Vec<(f64, f64)>);

impl crate::train::Hooks for StepTimes {
    fn on_step(&mut self, log: &crate::train::StepLog) -> bool {
        self.0.push((log.get("step_seconds").unwrap_or(f64::NAN), log.get("num_tokens").unwrap_or(0.0)));
        true
    }
}

impl Size {
    /// Image positions per image of this size (patch tokens, class token dropped).
    pub fn image_positions(self) -> usize {
        let v = &self.config()["vision_config"];
        let grid = v["image_size"].as_u64().unwrap_or(0) / v["patch_size"].as_u64().unwrap_or(1);
        (grid * grid) as usize
    }
}
