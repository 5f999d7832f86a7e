//! `bpo bench parity`: what a GPU session checks without a Rust toolchain. The transformers parity fixtures
//! (`tests/fixtures`, made by `scripts/make_fixtures.py`) on a device in f32 and bf16, and one LoRA-DPO step on the
//! device against the same step on the CPU. The integration tests pin the same paths down on the CPU
//! (`tests/runtime.rs`); this confirms them where CUDA runs them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::generate::{generate, EngineOptions, Request, SamplingParams};
use crate::model::{load, Inputs, LoadOptions, Model, Pass, Runtime};
use crate::text::{PromptStyle, Template, Tokenizer};
use crate::train::trainer::{Hooks, LoopConfig, StepLog};
use crate::train::{dpo, DpoLoss, ModelSetup, ScheduleKind};
use crate::{Error, Result};

/// One comparison: `value` must not exceed `limit`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
}

impl Check {
    fn new(name: &str, value: f64, limit: f64) -> Self {
        Check { name: name.to_string(), value, limit, pass: value <= limit }
    }
}

fn reference(fixtures: &Path, name: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixtures.join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Checkpoint { path, msg: e.to_string() })
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    r.get(key).ok_or_else(|| Error::invalid(format!("parity fixture has no {key}")))
}

fn u32s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

/// Largest |logits - want| over the positions where `mask` is 1, and the largest |want| there.
fn logit_error(model: &Model, r: &HashMap<String, Tensor>, images: Option<&Tensor>) -> Result<(f64, f64)> {
    let (ids, mask) = (u32s(get(r, "input_ids")?)?, u32s(get(r, "attention_mask")?)?);
    let logits = model
        .forward(&Inputs { ids: &ids, mask: &mask, images }, None, Pass::INFER)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let want = get(r, "logits")?;
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let d = (logits - want)?.abs()?.broadcast_mul(&m)?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.broadcast_mul(&m)?.max_all()?.to_scalar::<f32>()?;
    Ok((d as f64, scale as f64))
}

/// Tokens where greedy decoding differs from transformers' continuation `want_key` of `prompt_key` (rows stripped
/// of their padding by `mask_key`, if given).
fn greedy_mismatches(
    model: &Model,
    dir: &Path,
    r: &HashMap<String, Tensor>,
    prompt_key: &str,
    mask_key: Option<&str>,
    want_key: &str,
    images: Option<&Tensor>,
) -> Result<f64> {
    let rows: Vec<Vec<u32>> = u32s(get(r, prompt_key)?)?.to_vec2()?;
    let masks: Option<Vec<Vec<u32>>> = match mask_key {
        Some(k) => Some(u32s(get(r, k)?)?.to_vec2()?),
        None => None,
    };
    let want: Vec<Vec<u32>> = u32s(get(r, want_key)?)?.to_vec2()?;
    let params = SamplingParams { max_new_tokens: want.first().map_or(1, Vec::len), ..Default::default() };
    let mut requests = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let ids = match &masks {
            Some(m) => row.iter().zip(&m[i]).filter(|(_, &k)| k == 1).map(|(&id, _)| id).collect(),
            None => row.clone(),
        };
        let image = match images {
            Some(im) => Some(im.i(i)?),
            None => None,
        };
        requests.push(Request { ids, image, params: params.clone(), ..Default::default() });
    }
    let mut tok = Tokenizer::from_dir(dir, &[])?;
    tok.eos.clear(); // the fixtures were made with min_new_tokens = max_new_tokens
    let got = generate(model, &tok, requests, &EngineOptions::default(), Pass::INFER)?;
    Ok(got
        .iter()
        .zip(&want)
        .map(|(g, w)| g.ids.iter().zip(w).filter(|(a, b)| a != b).count() + w.len().abs_diff(g.ids.len()))
        .sum::<usize>() as f64)
}

/// Collects every step's log.
#[derive(Default)]
struct Logs(Vec<StepLog>);

impl Hooks for Logs {
    fn on_step(&mut self, log: &StepLog) -> bool {
        self.0.push(log.clone());
        true
    }
}

/// Tensors by name, as f32 values.
type Weights = Vec<(String, Vec<f32>)>;

/// The DPO run of the TRL parity fixture (`scripts/make_dpo_fixtures.py`): `tests/fixtures/dpo`'s pairs on
/// llava-tiny from its starting adapter, LoRA r 4 on every projection, the projector trained, one step of 4 pairs
/// at learning rate 1e-3.
pub fn trl_parity_config(fixtures: &Path, rt: Runtime) -> dpo::DpoConfig {
    let lora = crate::model::lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec(),
    };
    dpo::DpoConfig {
        setup: ModelSetup {
            model: fixtures.join("llava-tiny"),
            template: Template::LlavaHf,
            prompt_style: PromptStyle::Trl,
            aspect: crate::vision::AspectMode::Square,
            lora: Some(lora),
            train_projector: true,
            train_vision: false,
            init_adapter: Some(fixtures.join("dpo/init-adapter")),
            gradient_checkpointing: false,
            runtime: rt,
        },
        data: fixtures.join("dpo/pairs.jsonl"),
        images: Some(fixtures.join("images")),
        max_words: None,
        max_length: 2048,
        loss: DpoLoss::default(),
        mdpo: None,
        drifting_ref_projector: false,
        precompute_ref: false,
        feature_cache_mb: 64,
        optim: LoopConfig {
            lr: 1e-3,
            schedule: ScheduleKind::Constant,
            warmup_ratio: 0.0,
            weight_decay: 0.01,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            save_steps: None,
            seed: 0,
        },
    }
}

/// One step of [`trl_parity_config`] at learning rate 1e-4 on `rt` (AdamW's first update, lr g / (|g| + eps),
/// turns rounding differences in gradients near eps into differences up to lr: 1e-4 keeps them under 1e-5): its
/// log and the adapter and projector it wrote.
fn dpo_step(fixtures: &Path, rt: &Runtime, out: &Path) -> Result<(StepLog, Weights)> {
    let mut cfg = trl_parity_config(fixtures, rt.clone());
    cfg.optim.lr = 1e-4;
    let mut logs = Logs::default();
    dpo::train(&cfg, out, false, None, &mut logs, &crate::progress::Silent)?;
    let log = logs.0.pop().ok_or_else(|| Error::invalid("the DPO step logged nothing"))?;
    let mut weights = Vec::new();
    for file in ["adapter_model.safetensors", "projector.safetensors"] {
        let path = out.join(file);
        let mut t: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::Checkpoint { path, msg: e.to_string() })?
            .into_iter()
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        for (n, t) in t {
            weights.push((n, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?));
        }
    }
    Ok((log, weights))
}

fn max_weight_diff(a: &Weights, b: &Weights) -> f64 {
    a.iter().zip(b).flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64)).fold(0.0, f64::max)
}

/// Runs every check on `rt_device` (with `kernels` chosen as a user's run would: generic off the CPU).
pub fn run(fixtures: &Path, device: &Device) -> Result<Vec<Check>> {
    let f32_rt = Runtime::new(device.clone(), DType::F32);
    let bf16_rt = Runtime::new(device.clone(), DType::BF16);
    let mut out = Vec::new();
    let llava_dir = fixtures.join("llava-tiny");
    let r = reference(fixtures, "llava-tiny-ref.safetensors")?;
    let px = get(&r, "pixel_values")?;
    let llava = load(&llava_dir, &LoadOptions::new(&f32_rt))?;
    out.push(Check::new("llava f32 logits: max |bpo - transformers|", logit_error(&llava, &r, Some(px))?.0, 1e-4));
    let single = px.i(0..1)?;
    out.push(Check::new(
        "llava f32 greedy: tokens unlike transformers",
        greedy_mismatches(&llava, &llava_dir, &r, "greedy_prompt_ids", None, "greedy_ids", Some(&single))?,
        0.0,
    ));
    out.push(Check::new(
        "llava f32 batched greedy with padding: tokens unlike transformers",
        greedy_mismatches(
            &llava,
            &llava_dir,
            &r,
            "greedy_batch_prompt_ids",
            Some("greedy_batch_attention_mask"),
            "greedy_batch_ids",
            Some(px),
        )?,
        0.0,
    ));
    let llava_bf16 = load(&llava_dir, &LoadOptions::new(&bf16_rt))?;
    let (d, scale) = logit_error(&llava_bf16, &r, Some(px))?;
    out.push(Check::new("llava bf16 logits: max |bpo - transformers| / largest logit", d / scale.max(1.0), 0.05));

    let llama_dir = fixtures.join("llama-tiny");
    let r = reference(fixtures, "llama-tiny-ref.safetensors")?;
    let llama = load(&llama_dir, &LoadOptions::new(&f32_rt))?;
    out.push(Check::new(
        "llama (llama3 rope, tied head) f32 logits: max |bpo - transformers|",
        logit_error(&llama, &r, None)?.0,
        1e-4,
    ));
    out.push(Check::new(
        "llama f32 greedy: tokens unlike transformers",
        greedy_mismatches(&llama, &llama_dir, &r, "greedy_prompt_ids", None, "greedy_ids", None)?,
        0.0,
    ));

    let scratch = std::env::temp_dir().join(format!("bpo-parity-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let (cpu_log, cpu_w) = dpo_step(fixtures, &Runtime::default(), &scratch.join("cpu"))?;
        let (dev_log, dev_w) = dpo_step(fixtures, &f32_rt, &scratch.join("device-f32"))?;
        let key = |l: &StepLog, k: &str| l.get(k).unwrap_or(f64::NAN);
        let rel = |k: &str| (key(&dev_log, k) - key(&cpu_log, k)).abs() / (1.0 + key(&cpu_log, k).abs());
        out.push(Check::new("DPO step f32: |loss - CPU loss| / (1 + |CPU loss|)", rel("loss"), 1e-5));
        out.push(Check::new("DPO step f32: relative grad_norm difference from the CPU", rel("grad_norm"), 1e-5));
        out.push(Check::new("DPO step f32: max |updated weight - CPU's|", max_weight_diff(&dev_w, &cpu_w), 1e-5));
        let (bf16_log, _) = dpo_step(fixtures, &bf16_rt, &scratch.join("device-bf16"))?;
        let d = (key(&bf16_log, "loss") - key(&cpu_log, "loss")).abs();
        out.push(Check::new(
            "DPO step bf16: |loss - CPU f32 loss|",
            if d.is_finite() { d } else { f64::INFINITY },
            0.02,
        ));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(out)
}
