//! Benchmarks on random-weight models: the configurations of `shared/reference.md` ("tiny" and "small"), so the
//! numbers can be compared with the PyTorch baseline measured there, and LLaVA-1.5 7B / 13B with their real shapes
//! for GPUs. Weights are drawn in memory on the target device ([`Size::random_vlm`]); nothing large touches disk.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::generate::{generate, EngineOptions, Request, SamplingParams};
use crate::model::Vlm;
use crate::model::{init, LoadOptions, Model, ModelConfig, Pass, Runtime};
use crate::text::Tokenizer;
use crate::Result;

/// Model shapes to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Size {
    /// Llama 128 hidden, 2 layers, GQA 4/2 heads; CLIP 32 px, patch 8; vocab 1024 (0.7 M parameters).
    Tiny,
    /// Llama 512 hidden, 8 layers; CLIP 224 px, patch 14, 4 layers; vocab 32064 (62 M parameters).
    Small,
    /// LLaVA-1.5-7B: Llama 4096 x 32 layers, 32 heads, MLP 11008; CLIP ViT-L/14-336 (24 layers x 1024); vocab 32064.
    #[cfg_attr(feature = "clap", value(name = "llava-7b"))]
    Llava7b,
    /// LLaVA-1.5-13B: Llama 5120 x 40 layers, 40 heads, MLP 13824; the same CLIP tower; vocab 32064.
    #[cfg_attr(feature = "clap", value(name = "llava-13b"))]
    Llava13b,
}

impl Size {
    /// The llava-hf `config.json` of this size.
    pub fn config(self) -> serde_json::Value {
        self.config_with_layers(None)
    }

    /// The llava-hf `config.json` of this size with the decoder cut to `layers` (None: the size's own depth; every
    /// width, the vision tower and the vocabulary stay). Lets 7B and 13B shapes run on a small machine: every op at
    /// the real widths, and per-layer costs separated from fixed ones by comparing two depths.
    pub fn config_with_layers(self, layers: Option<usize>) -> serde_json::Value {
        // text: (hidden, intermediate, layers, heads, kv heads); vision: (image, patch, hidden, intermediate, layers, heads)
        let (mut text, vision, vocab, context) = match self {
            Size::Tiny => ((128, 256, 2, 4, 2), (32, 8, 64, 256, 2, 4), 1024, 2048),
            Size::Small => ((512, 1376, 8, 8, 8), (224, 14, 256, 1024, 4, 4), 32064, 2048),
            Size::Llava7b => ((4096, 11008, 32, 32, 32), (336, 14, 1024, 4096, 24, 16), 32064, 4096),
            Size::Llava13b => ((5120, 13824, 40, 40, 40), (336, 14, 1024, 4096, 24, 16), 32064, 4096),
        };
        text.2 = layers.unwrap_or(text.2);
        serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 4, "pad_token_id": 3, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": text.0, "intermediate_size": text.1,
                "num_hidden_layers": text.2, "num_attention_heads": text.3, "num_key_value_heads": text.4,
                "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": context,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
            "vision_config": {"model_type": "clip_vision_model", "image_size": vision.0, "patch_size": vision.1,
                "hidden_size": vision.2, "intermediate_size": vision.3, "num_hidden_layers": vision.4,
                "num_attention_heads": vision.5, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        })
    }

    /// Writes the small files of a model folder of this size: config, a word-level tokenizer, and the image
    /// processor settings of its CLIP resolution (no weights).
    pub fn write_config(self, dir: &Path) -> Result<()> {
        self.write_config_with_layers(None, dir)
    }

    /// [`Size::write_config`] with the decoder cut to `layers` ([`Size::config_with_layers`]).
    pub fn write_config_with_layers(self, layers: Option<usize>, dir: &Path) -> Result<()> {
        let cfg = self.config_with_layers(layers);
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        crate::output::write_bytes(
            &cfg_path,
            serde_json::to_string_pretty(&cfg).map_err(crate::Error::invalid)?.as_bytes(),
        )?;
        let px = &cfg["vision_config"]["image_size"];
        let pre = serde_json::json!({"size": {"shortest_edge": px}, "crop_size": {"height": px, "width": px}});
        let pre_path = dir.join("preprocessor_config.json");
        crate::output::write_bytes(&pre_path, pre.to_string().as_bytes())?;
        let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(1024) as usize;
        let n_special = crate::text::tokenizer::WORD_LEVEL_SPECIALS.len();
        let words: Vec<String> = (n_special..vocab).map(|i| format!("w{i}")).collect();
        crate::text::tokenizer::write_word_level(dir, &words)
    }

    /// Writes a random-weight model folder of this size (weights included: meant for the small sizes).
    pub fn write_model(self, dir: &Path, seed: u64) -> Result<()> {
        init::random_checkpoint(dir, &self.config(), seed)?;
        self.write_config(dir)
    }

    /// A random-weight model of this size built in memory on `rt` (weights N(0, 0.02), norms 1, biases 0), with
    /// its tokenizer and image processor from the small files written into `dir`.
    pub fn random_vlm(self, rt: &Runtime, dir: &Path) -> Result<Vlm> {
        self.random_vlm_with_layers(None, rt, dir)
    }

    /// [`Size::random_vlm`] with the decoder cut to `layers` ([`Size::config_with_layers`]).
    pub fn random_vlm_with_layers(self, layers: Option<usize>, rt: &Runtime, dir: &Path) -> Result<Vlm> {
        self.write_config_with_layers(layers, dir)?;
        let config = ModelConfig::from_dir(dir)?;
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), rt.dtype, rt.device.clone());
        let model = crate::model::load::build(vb, &config, &LoadOptions::new(rt))?;
        Vlm::from_model(model, dir, crate::text::Template::VicunaV1)
    }

    /// Parameters of the language model's linear layers and head: what a token's forward pass multiplies by.
    pub fn llm_matmul_params(self) -> usize {
        self.llm_matmul_params_with_layers(None)
    }

    /// [`Size::llm_matmul_params`] with the decoder cut to `layers`.
    pub fn llm_matmul_params_with_layers(self, layers: Option<usize>) -> usize {
        let t = &self.config_with_layers(layers)["text_config"];
        let g = |k: &str| t[k].as_u64().unwrap_or(0) as usize;
        let (h, i, l, v) = (g("hidden_size"), g("intermediate_size"), g("num_hidden_layers"), g("vocab_size"));
        let kv = h / g("num_attention_heads") * g("num_key_value_heads");
        l * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    }
}

/// Random weights for [`Size::random_vlm`].
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let leaf = name.rsplit('.').nth(1).unwrap_or_default();
        let t = if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, dev)?
        } else if leaf.contains("norm") || leaf.contains("layrnorm") {
            Tensor::ones(shape, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

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
/// [`Size::write_model`]): `answers` prompts with one answer of exactly `new_tokens` tokens each (EOS disabled,
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

/// One DPO training-step measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainFigures {
    /// mDPO's objective (3 answer rows and 2 prompts per pair) instead of DPO's.
    pub mdpo: bool,
    /// Rows per step (2 per pair, 3 with mDPO) and the length of each row (BOS, image positions, prompt, answer, EOS).
    pub rows: usize,
    pub length: usize,
    /// Decoder layers of the model timed.
    pub layers: usize,
    pub gradient_checkpointing: bool,
    pub lora_dropout: f64,
    /// Median seconds per optimizer step over the timed steps.
    pub seconds: f64,
    pub steps: usize,
    /// Token positions per second, counted as TRL's `num_tokens` (both rows of a pair, each with its prompt).
    pub tokens_per_s: f64,
    pub pairs_per_s: f64,
    /// Model FLOPs per step: 6 x (language-model matmul parameters) x tokens (policy forward, its backward to the
    /// activations, the reference forward; attention scores, the vision tower, LoRA and recomputation not counted).
    pub model_flops: f64,
    /// `model_flops / seconds / peak`, when a peak was given.
    pub mfu: Option<f64>,
    /// Memory the model, its adapters and the optimizer took when they were set up (weights in the compute dtype,
    /// f32 masters, AdamW's moments), in bytes; None where it cannot be read ([`crate::memory::in_use`]).
    pub setup_bytes: Option<u64>,
    /// Peak memory over the warm-up and timed steps, against the memory in use once the model and the optimizer
    /// were set up.
    pub memory: crate::memory::MemoryFigures,
}

/// What [`train_step`] runs.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub size: Size,
    /// Decoder layers (None: the size's own depth).
    pub layers: Option<usize>,
    pub rt: Runtime,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    /// Preference pairs per step.
    pub pairs: usize,
    /// Words (one token each) of each prompt after BOS and the image positions, and of each answer before EOS.
    pub prompt_words: usize,
    pub answer_words: usize,
    /// LoRA settings, dropout included.
    pub lora: crate::model::lora::LoraConfig,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Route frozen weights through candle's plain matmul, whose backward also builds their gradients, to measure
    /// what skipping them saves.
    pub plain_backward: bool,
    /// The device's dense peak in TFLOP/s, for the model FLOP utilisation.
    pub peak_tflops: Option<f64>,
    /// Time mDPO's step (the image-side rows too, default settings) instead of DPO's.
    pub mdpo: bool,
}

/// Times DPO steps (mDPO's with `mdpo`) on a random model: `pairs` pairs of BOS + image + `prompt_words` words of prompt and
/// `answer_words` words + EOS of answer (chosen and rejected alike), LoRA on the language model, projector frozen,
/// reference with adapters off computed every step, AdamW, no feature cache (the tower runs every step, as in
/// PyTorch). Measures the peak memory of the steps as well.
pub fn train_step(b: &TrainBench) -> Result<TrainFigures> {
    use crate::data::PairOptions;
    use crate::train::data::{read_preference_file, tokenize_pairs};
    use crate::train::dpo::{Dpo, Reference};
    use crate::train::optim::{AdamW, AdamWConfig};
    use crate::train::setup::prepare_loaded;
    use crate::train::trainer::Objective;
    use crate::train::{DpoLoss, ModelSetup};
    let dir = std::env::temp_dir().join(format!("bpo-bench-train-{}-{:?}", std::process::id(), b.size));
    let result = (|| {
        let model_dir = dir.join("model");
        let before_setup = crate::memory::in_use(&b.rt.device);
        let vlm = b.size.random_vlm_with_layers(b.layers, &b.rt, &model_dir)?;
        let cfg = b.size.config_with_layers(b.layers);
        let side = cfg["vision_config"]["image_size"].as_u64().unwrap_or(32) as u32;
        let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(1024) as usize;
        let n_special = crate::text::tokenizer::WORD_LEVEL_SPECIALS.len();
        // Distinct words from the vocabulary, wrapping around in small vocabularies.
        let words = |start: usize, n: usize| {
            (start..start + n)
                .map(|i| format!("w{}", n_special + i % (vocab - n_special)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut rows = String::new();
        for p in 0..b.pairs {
            let img = format!("img{p}.png");
            let shade = (p * 50 % 256) as u32;
            image::RgbImage::from_fn(side, side, |x, y| {
                image::Rgb([(x * 7 + shade) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
            })
            .save(dir.join(&img))
            .map_err(crate::Error::invalid)?;
            let (prompt, chosen, rejected) =
                (words(10 + p, b.prompt_words), words(100 + p, b.answer_words), words(300 + p, b.answer_words));
            rows.push_str(&format!(
                "{}\n",
                serde_json::json!({"id": p, "prompt": prompt, "image": img, "chosen": chosen, "rejected": rejected})
            ));
        }
        let data = dir.join("pairs.jsonl");
        std::fs::write(&data, rows).map_err(|e| crate::Error::io(&data, e))?;
        let setup = ModelSetup {
            model: model_dir,
            template: crate::text::Template::Plain,
            prompt_style: crate::text::PromptStyle::Llava,
            aspect: crate::vision::AspectMode::Square,
            lora: Some(b.lora.clone()),
            train_projector: false,
            train_vision: false,
            init_adapter: None,
            gradient_checkpointing: b.gradient_checkpointing,
            runtime: b.rt.clone(),
        };
        let prepared = prepare_loaded(vlm, &setup, 0)?;
        let (pairs, _) = read_preference_file(&data, &PairOptions::default())?;
        let (examples, _) = tokenize_pairs(&prepared.vlm, &pairs, Some(&dir), 1 << 20)?;
        let length = examples.first().map_or(0, |e| e.prompt.len() + e.chosen.len());
        let reference = Reference::AdaptersOff { projector: prepared.start_projector };
        let mdpo = match b.mdpo {
            true => Some(crate::train::dpo::Mdpo::new(&Default::default(), &examples, 0, Some(&dir))?),
            false => None,
        };
        let mut dpo = Dpo::new(prepared.vlm, examples, reference, DpoLoss::default(), 0);
        dpo.mdpo = mdpo;
        dpo.gradient_checkpointing = b.gradient_checkpointing;
        let mut opt = AdamW::new(&prepared.trainable.vars(), AdamWConfig::default(), b.rt.kernels)?;
        let setup_bytes = before_setup.zip(crate::memory::in_use(&b.rt.device)).map(|(a, z)| z.saturating_sub(a));
        let batch: Vec<usize> = (0..b.pairs).collect();
        crate::train::trainer::keep_freed_memory(); // as the training loop does
        crate::model::ops::PLAIN_FROZEN_MATMUL.store(b.plain_backward, std::sync::atomic::Ordering::SeqCst);
        let probe = crate::memory::Probe::start(&b.rt.device);
        let mut timed = Vec::new();
        let run = (|| -> Result<usize> {
            let mut tokens = 0;
            for step in 0..=b.steps {
                let start = Instant::now();
                let metrics = dpo.micro_step(&batch, 1.0, step as u64, &mut opt)?;
                tokens = metrics.tokens;
                // As the training loop does: the update, then one read of the metrics and the norm, which waits for
                // the step to finish on the device.
                let norm = opt.step(1e-5, None, &[])?;
                let mut read = vec![metrics.values];
                if let crate::train::optim::GradNorm::Device(t) = norm {
                    read.push(t.reshape(1)?);
                }
                crate::model::runtime::read_back::<f32>(&Tensor::cat(&read, 0)?)?;
                if step > 0 {
                    timed.push(start.elapsed().as_secs_f64());
                }
            }
            Ok(tokens)
        })();
        let memory = probe.finish();
        crate::model::ops::PLAIN_FROZEN_MATMUL.store(false, std::sync::atomic::Ordering::SeqCst);
        let tokens = run?;
        timed.sort_by(f64::total_cmp);
        let seconds = timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN);
        let model_flops = 6.0 * b.size.llm_matmul_params_with_layers(b.layers) as f64 * tokens as f64;
        Ok(TrainFigures {
            mdpo: b.mdpo,
            rows: (2 + usize::from(b.mdpo)) * b.pairs,
            length,
            layers: cfg["text_config"]["num_hidden_layers"].as_u64().unwrap_or(0) as usize,
            gradient_checkpointing: b.gradient_checkpointing,
            // The f32 setting as written (0.05, not 0.0500000007).
            lora_dropout: b.lora.dropout.to_string().parse().unwrap_or(f64::NAN),
            seconds,
            steps: timed.len(),
            tokens_per_s: tokens as f64 / seconds,
            pairs_per_s: b.pairs as f64 / seconds,
            model_flops,
            mfu: b.peak_tflops.map(|p| model_flops / seconds / (p * 1e12)),
            setup_bytes,
            memory,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

impl Size {
    /// Image positions per image of this size (patch tokens, class token dropped).
    pub fn image_positions(self) -> usize {
        let v = &self.config()["vision_config"];
        let grid = v["image_size"].as_u64().unwrap_or(0) / v["patch_size"].as_u64().unwrap_or(1);
        (grid * grid) as usize
    }
}

/// One policy's run of the mixed workload ([`mixed_workload`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedFigures {
    /// `continuous` (the engine) or `static` (static batching replayed on it).
    pub policy: String,
    pub batch: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// New tokens per second, end to end (image encoding and prefill included).
    pub new_tok_s: f64,
    pub requests_per_s: f64,
    /// Time to first token from the start of the run (every request arrives at once, as in an offline bootstrap).
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    /// Row-steps spent on sequences that had already finished, of all decoding row-steps.
    pub wasted_share: f64,
    /// Sequences per decoding step, on average, over the batch size.
    pub occupancy: f64,
    pub engine: crate::generate::EngineStats,
    /// Peak memory of the run (resident set on the CPU, device memory on CUDA).
    pub memory: crate::memory::MemoryFigures,
}

/// Lengths of the mixed workload: one third yes/no answers of 1-3 new tokens after questions of 8-24 tokens, one
/// third short answers of 4-24 after questions of 8-24, one third descriptions of 32-`longest` after instructions
/// of 6-12; every prompt is BOS + the image positions + the question.
fn mixed_lengths(rng: &mut rand::rngs::StdRng, longest: usize) -> (usize, usize) {
    use rand::Rng;
    match rng.random_range(0..3) {
        0 => (rng.random_range(8..=24), rng.random_range(1..=3)),
        1 => (rng.random_range(8..=24), rng.random_range(4..=24)),
        _ => (rng.random_range(6..=12), rng.random_range(32.min(longest)..=longest)),
    }
}

/// Runs `requests` requests of the mixed workload drawn from `seed` (see `mixed_lengths`; descriptions up to
/// `longest` new tokens) through an engine of `batch` rows with `policy`, greedy, one random image shared by all.
/// Requests are made when the engine has room for them, as the commands do. `tok` must have EOS disabled, so that
/// every request generates exactly its length.
pub fn mixed_workload(
    model: &Model,
    tok: &Tokenizer,
    batch: usize,
    requests: usize,
    longest: usize,
    seed: u64,
    policy: crate::generate::Policy,
) -> Result<MixedFigures> {
    use crate::generate::{Engine, Feed, Finished, Policy};
    use rand::{Rng, SeedableRng};

    struct Mixed {
        rng: rand::rngs::StdRng,
        left: usize,
        next_id: usize,
        longest: usize,
        image: Option<Tensor>,
        head: Vec<u32>,
        vocab: u32,
        start: Instant,
        /// When each running request was handed to the engine (seconds since `start`).
        handed: std::collections::HashMap<usize, f64>,
        ttft: Vec<f64>,
        prompt_tokens: usize,
        new_tokens: usize,
    }
    impl Feed for Mixed {
        fn next(&mut self) -> Result<Option<(usize, Request)>> {
            if self.left == 0 {
                return Ok(None);
            }
            self.left -= 1;
            let (question, new) = mixed_lengths(&mut self.rng, self.longest);
            let mut ids = self.head.clone();
            ids.extend((0..question).map(|_| self.rng.random_range(10..self.vocab)));
            self.prompt_tokens += ids.len();
            let id = self.next_id;
            self.next_id += 1;
            self.handed.insert(id, self.start.elapsed().as_secs_f64());
            let params = SamplingParams { max_new_tokens: new, ..Default::default() };
            Ok(Some((id, Request { ids, image: self.image.clone(), params, seed: id as u64, contrast: None })))
        }
        fn done(&mut self, f: Finished) -> Result<()> {
            let handed = self.handed.remove(&f.id).unwrap_or_default();
            self.ttft.push(handed + f.first_token.as_secs_f64());
            self.new_tokens += f.completion.ids.len();
            Ok(())
        }
    }

    let image = match model.vision.as_ref().map(|v| v.cfg.vision.image_size) {
        Some(px) => Some(Tensor::randn(0f32, 1.0, (3, px, px), &model.rt.device)?),
        None => None,
    };
    let mut head = vec![1u32];
    head.extend(std::iter::repeat_n(model.image_token().unwrap_or(0), model.image_tokens()));
    let mut feed = Mixed {
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        left: requests,
        next_id: 0,
        longest,
        image,
        head,
        vocab: (model.llm.cfg.vocab_size as u32).clamp(11, 1000),
        start: Instant::now(),
        handed: Default::default(),
        ttft: Vec::with_capacity(requests),
        prompt_tokens: 0,
        new_tokens: 0,
    };
    let opts = EngineOptions { policy, ..EngineOptions::rows(batch, None) };
    let probe = crate::memory::Probe::start(&model.rt.device);
    let mut engine = Engine::new(model, tok, opts, Pass::INFER)?;
    feed.start = Instant::now();
    engine.run(&mut feed)?;
    let seconds = feed.start.elapsed().as_secs_f64();
    let memory = probe.finish();
    let stats = engine.stats().clone();
    let mut ttft = feed.ttft;
    ttft.sort_by(f64::total_cmp);
    let at = |q: f64| ttft.get(((ttft.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    Ok(MixedFigures {
        policy: if policy == Policy::Static { "static" } else { "continuous" }.to_string(),
        batch,
        requests,
        prompt_tokens: feed.prompt_tokens,
        new_tokens: feed.new_tokens,
        seconds,
        new_tok_s: feed.new_tokens as f64 / seconds,
        requests_per_s: requests as f64 / seconds,
        ttft_mean_s: ttft.iter().sum::<f64>() / ttft.len().max(1) as f64,
        ttft_p50_s: at(0.5),
        ttft_p90_s: at(0.9),
        wasted_share: stats.wasted_rows as f64 / stats.decode_rows.max(1) as f64,
        occupancy: stats.decode_rows as f64 / (stats.decode_steps.max(1) * batch) as f64,
        engine: stats,
        memory,
    })
}
