//! One LoRA-DPO (or mDPO) training step, timed, with its memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use super::Size;
use crate::model::Runtime;
use crate::Result;

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
    use crate::train::{DpoLoss, ModelSetup};
    let dir = std::env::temp_dir().join(format!("bpo-bench-train-{}-{:?}", std::process::id(), b.size));
    let result = (|| {
        let model_dir = dir.join("model");
        let before_setup = crate::memory::in_use(&b.rt.device);
        let vlm = b.size.random_vlm_with_layers(b.layers, &b.rt, &model_dir)?;
        let cfg = b.size.config_with_layers(b.layers);
        let data = write_pairs(&dir, b, &cfg)?;
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
        let run = time_steps(&mut dpo, &mut opt, &batch, b.steps);
        let memory = probe.finish();
        crate::model::ops::PLAIN_FROZEN_MATMUL.store(false, std::sync::atomic::Ordering::SeqCst);
        let (tokens, mut timed) = run?;
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

/// Writes `b.pairs` preference pairs into `dir` (`pairs.jsonl` and one image each), sized by the model config
/// `cfg`: distinct words of the vocabulary (wrapping around in small ones), chosen and rejected alike in length.
fn write_pairs(dir: &Path, b: &TrainBench, cfg: &serde_json::Value) -> Result<PathBuf> {
    let side = cfg["vision_config"]["image_size"].as_u64().unwrap_or(32) as u32;
    let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(1024) as usize;
    let n_special = crate::text::tokenizer::WORD_LEVEL_SPECIALS.len();
    // Distinct words from the vocabulary, wrapping around in small vocabularies.
    let words = |start: usize, n: usize| {
        (start..start + n).map(|i| format!("w{}", n_special + i % (vocab - n_special))).collect::<Vec<_>>().join(" ")
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
    Ok(data)
}

/// Runs one warm-up and `steps` timed optimizer steps on `batch`: (tokens per step, seconds of each timed step).
fn time_steps(
    dpo: &mut crate::train::dpo::Dpo,
    opt: &mut crate::train::optim::AdamW,
    batch: &[usize],
    steps: usize,
) -> Result<(usize, Vec<f64>)> {
    use crate::train::trainer::Objective;
    let (mut tokens, mut timed) = (0, Vec::with_capacity(steps));
    for step in 0..=steps {
        let start = Instant::now();
        let metrics = dpo.micro_step(batch, 1.0, step as u64, opt)?;
        tokens = metrics.tokens;
        // As the training loop does: the update, then one read of the metrics and the norm, which waits for the
        // step to finish on the device.
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
    Ok((tokens, timed))
}
