//! The demo's training stages, through the project's trainer ([`crate::train`], the code behind `bpo sft` and
//! `bpo train`): supervised fine-tuning on LLaVA conversation JSON (the language model on the plain-text corpus,
//! then vision tower, projector and language model on the grounded data), and
//! LoRA runs on the bootstrapped pairs: DPO (the BPO rows) or supervised training on the chosen answers (the
//! control). Every run leaves the trainer's run folder (`train_config.json`, `metrics.jsonl`, weights); LoRA
//! runs are also merged into a model folder (`bpo merge`) for evaluation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::lora::LoraConfig;
use crate::model::Runtime;
use crate::progress::{Events, Silent};
use crate::text::{PromptStyle, Template};
use crate::train::dpo::{DpoConfig, MdpoConfig};
use crate::train::sft::SftConfig;
use crate::train::trainer::LoopConfig;
use crate::train::{DpoLoss, LossKind, ModelSetup, ScheduleKind};
use crate::vision::AspectMode;
use crate::Result;

/// Supervised fine-tuning settings (full fine-tuning of the language model, and of the projector for images).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftSettings {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Plain text (the `plain` template: BOS, then the reply): language-model pre-training on the corpus.
    /// Otherwise llava-hf's chat template.
    pub plain_text: bool,
    /// Train the vision tower too (`bpo sft --full --train-vision`): the demo's tower starts from random weights.
    #[serde(default)]
    pub train_vision: bool,
}

/// Settings of the LoRA runs on bootstrapped pairs (every projection of the language model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefSettings {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub beta: f64,
    pub rank: usize,
    pub alpha: f64,
    /// Weight of the NLL of the chosen answers added to the DPO loss (RPO); counteracts "say less".
    pub sft_weight: f64,
    /// Train the projector too (BPO's default); off keeps the rows comparable with the control.
    pub train_projector: bool,
    /// mDPO's image-side pair and anchor on top of DPO (`bpo train --objective mdpo`); none: plain DPO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdpo: Option<MdpoConfig>,
}

impl PrefSettings {
    fn lora(&self) -> LoraConfig {
        LoraConfig { rank: self.rank, alpha: self.alpha, dropout: 0.0, ..LoraConfig::default() }
    }
}

/// What a demo run computes with, besides its settings: the seed (weights, data order) and the runtime (candle on
/// the CPU; [`Runtime::generic`] for the generic ops path, which rounds differently from the fused kernels).
#[derive(Debug, Clone)]
pub struct RunEnv {
    pub seed: u64,
    pub runtime: Runtime,
}

/// The demo's sequences are short: 9 image positions and a few dozen words.
const MAX_LENGTH: usize = 256;
const FEATURE_CACHE_MB: usize = 512;

fn optim(epochs: usize, batch: usize, lr: f64, seed: u64) -> LoopConfig {
    LoopConfig {
        lr,
        schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.03,
        weight_decay: 0.0,
        epochs,
        batch_size: batch,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        save_steps: None,
        seed,
    }
}

fn setup(
    model: &Path,
    template: Template,
    lora: Option<LoraConfig>,
    train_projector: bool,
    env: &RunEnv,
) -> ModelSetup {
    ModelSetup {
        model: model.to_path_buf(),
        template,
        prompt_style: PromptStyle::Llava,
        aspect: AspectMode::Pad,
        lora,
        train_projector,
        train_vision: false,
        init_adapter: None,
        gradient_checkpointing: false,
        runtime: env.runtime.clone(),
    }
}

/// A fresh run folder: the trainer refuses to overwrite a run without `--resume`.
fn fresh(out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    }
    Ok(())
}

/// `bpo sft` with full fine-tuning: trains `model_in` on LLaVA conversation JSON and writes the model folder `out`
/// (with `metrics.jsonl`). The run reports to `events`.
pub fn sft(
    model_in: &Path,
    data: &Path,
    images: &Path,
    out: &Path,
    s: &SftSettings,
    env: &RunEnv,
    events: &dyn Events,
) -> Result<()> {
    fresh(out)?;
    let template = if s.plain_text { Template::Plain } else { Template::LlavaHf };
    let setup = ModelSetup {
        train_vision: s.train_vision && !s.plain_text,
        ..setup(model_in, template, None, !s.plain_text, env)
    };
    let cfg = SftConfig {
        setup,
        data: data.to_path_buf(),
        images: Some(images.to_path_buf()),
        max_length: MAX_LENGTH,
        feature_cache_mb: FEATURE_CACHE_MB,
        optim: optim(s.epochs, s.batch, s.lr, env.seed),
    };
    crate::train::sft::train(&cfg, out, false, None, &mut Silent, events)?;
    Ok(())
}

/// Copies the vision tower of the model folder `from` into the model folder `into` (same config, one
/// `model.safetensors` each, as the demo writes them), leaving the rest of `into` as it was: how a perception stage
/// hands its tower on.
pub fn keep_vision_tower(from: &Path, into: &Path) -> Result<()> {
    use crate::model::load::{save_safetensors, VISION_PREFIX};
    let load = |dir: &Path| {
        let path = dir.join("model.safetensors");
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .map_err(|e| crate::Error::Checkpoint { path, msg: e.to_string() })
    };
    let (tower, base) = (load(from)?, load(into)?);
    let mut tensors = Vec::with_capacity(base.len());
    for (name, t) in base {
        let t = match name.starts_with(VISION_PREFIX) {
            true => tower.get(&name).cloned().ok_or_else(|| crate::Error::Checkpoint {
                path: from.join("model.safetensors"),
                msg: format!("no tensor {name}"),
            })?,
            false => t,
        };
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_safetensors(&into.join("model.safetensors"), &tensors)
}

/// `bpo train` (DPO with LoRA; mDPO when [`PrefSettings::mdpo`]) on a pair file, then `bpo merge`: the adapter run is `out/adapter`, the merged model
/// `out/model`. Returns the adapter folder.
pub fn dpo(
    model_in: &Path,
    pairs: &Path,
    images: &Path,
    out: &Path,
    s: &PrefSettings,
    env: &RunEnv,
    events: &dyn Events,
) -> Result<PathBuf> {
    fresh(out)?;
    let adapter = out.join("adapter");
    let loss = DpoLoss { kind: LossKind::Sigmoid, beta: s.beta, label_smoothing: 0.0, sft_weight: s.sft_weight };
    let cfg = DpoConfig {
        setup: setup(model_in, Template::LlavaHf, Some(s.lora()), s.train_projector, env),
        data: pairs.to_path_buf(),
        images: Some(images.to_path_buf()),
        max_words: None,
        max_length: MAX_LENGTH,
        loss,
        mdpo: s.mdpo,
        drifting_ref_projector: false,
        precompute_ref: true,
        feature_cache_mb: FEATURE_CACHE_MB,
        optim: optim(s.epochs, s.batch, s.lr, env.seed),
    };
    crate::train::dpo::train(&cfg, &adapter, false, None, &mut Silent, events)?;
    crate::train::merge(model_in, &adapter, &out.join("model"))?;
    Ok(adapter)
}

/// `bpo sft` with the same LoRA settings on the chosen answers (LLaVA JSON), then `bpo merge`: the paper's
/// control. Layout as [`dpo`].
pub fn sft_on_chosen(
    model_in: &Path,
    chosen: &Path,
    images: &Path,
    out: &Path,
    s: &PrefSettings,
    env: &RunEnv,
    events: &dyn Events,
) -> Result<PathBuf> {
    fresh(out)?;
    let adapter = out.join("adapter");
    let cfg = SftConfig {
        setup: setup(model_in, Template::LlavaHf, Some(s.lora()), s.train_projector, env),
        data: chosen.to_path_buf(),
        images: Some(images.to_path_buf()),
        max_length: MAX_LENGTH,
        feature_cache_mb: FEATURE_CACHE_MB,
        optim: optim(s.epochs, s.batch, s.lr, env.seed),
    };
    crate::train::sft::train(&cfg, &adapter, false, None, &mut Silent, events)?;
    crate::train::merge(model_in, &adapter, &out.join("model"))?;
    Ok(adapter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::model::{init_model, ModelSpec};

    #[test]
    fn only_the_vision_tower_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let words = crate::demo::data::tokenizer_words();
        init_model(&a, &ModelSpec::quick(), &words, 1).unwrap();
        init_model(&b, &ModelSpec::quick(), &words, 2).unwrap();
        let load = |dir: &Path| {
            candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
        };
        let (tower, old) = (load(&a), load(&b));
        keep_vision_tower(&a, &b).unwrap();
        let new = load(&b);
        assert_eq!(new.len(), old.len());
        let same = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap() == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let mut towers = 0;
        for (name, t) in &new {
            let from_tower = name.starts_with(crate::model::load::VISION_PREFIX);
            assert!(same(t, if from_tower { &tower[name] } else { &old[name] }), "{name}");
            towers += usize::from(from_tower);
        }
        assert!(towers > 4, "{towers} tower tensors");
        let projector = "multi_modal_projector.linear_1.weight";
        assert!(!same(&tower[projector], &new[projector]), "the projector is not the tower's");
    }
}
