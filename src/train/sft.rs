//! Supervised training (`bpo sft`): cross-entropy on the assistant turns of LLaVA conversations, with LoRA or
//! full fine-tuning, through the same loop as DPO. The loss is the mean negative log-likelihood per target token
//! of the batch, as transformers computes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::data::{read_conversations, tokenize_conversations, SftExample};
use super::dpo::TrainReport;
use super::features::{distinct_images, FeatureCache};
use super::optim::AdamW;
use super::setup::{prepare_model, prepare_run_dir, record_template, ModelSetup};
use super::trainer::{train_loop, Hooks, LoopConfig, Metrics, Objective};
use crate::model::checkpoint::{backward, Tape};
use crate::model::linear::DropoutSeed;
use crate::model::Vlm;
use crate::model::{Inputs, Pass};
use crate::progress::Events;
use crate::score::{collate, response_logprobs};
use crate::{Error, Result};

pub struct Sft {
    pub vlm: Vlm,
    pub examples: Vec<SftExample>,
    pub features: FeatureCache,
    /// Recompute each decoder layer (and the vision tower's, when it trains) in the backward pass.
    pub gradient_checkpointing: bool,
    dropout: Option<Arc<DropoutSeed>>,
}

impl Sft {
    /// `vision_trains`: the tower's weights train, so its features are computed with their graph every step.
    pub fn new(mut vlm: Vlm, examples: Vec<SftExample>, cache_mb: usize, vision_trains: bool) -> Self {
        let dropout = vlm.model.llm.dropout_seed();
        let features = if vision_trains { FeatureCache::live() } else { FeatureCache::new(cache_mb) };
        Sft { vlm, examples, features, gradient_checkpointing: false, dropout }
    }

    /// Mean NLL per target token of `batch` (a scalar with graph when `train`), token count, target count. With
    /// `tape`, the layers are checkpointed.
    pub fn loss<'a>(
        &'a mut self,
        batch: &[usize],
        train: bool,
        mut tape: Option<&mut Tape<'a>>,
    ) -> Result<(Tensor, usize, f64)> {
        let exs: Vec<&SftExample> = batch.iter().map(|&i| &self.examples[i]).collect();
        let (distinct, index) = distinct_images(exs.iter().filter_map(|e| e.image.as_deref()));
        let device = self.vlm.model.rt.device.clone();
        let rows: Vec<(&[u32], &[bool])> = exs.iter().map(|e| (&e.ids[..], &e.target[..])).collect();
        let rows = collate(&rows, self.vlm.tok.pad, &device)?;
        let pass = Pass { adapters: true, train };
        let embeds = if distinct.is_empty() {
            None
        } else {
            let feats = self.features.features_checkpointed(&self.vlm, &distinct, tape.as_deref_mut())?;
            let n = index.len();
            Some(self.vlm.model.project(&feats, pass)?.index_select(&Tensor::from_vec(index, n, &device)?, 0)?)
        };
        let inputs = Inputs { ids: &rows.ids, mask: &rows.mask, images: None };
        let hidden = self.vlm.model.train_hidden(&inputs, &rows.host_ids, embeds.as_ref(), pass, tape)?;
        let (sums, _) = response_logprobs(&self.vlm.model.llm, &hidden, &rows.host_labels, pass)?;
        let targets = rows.targets() as f64;
        let loss = (sums.sum_all()?.neg()? / targets.max(1.0))?;
        Ok((loss, rows.tokens, targets))
    }
}

impl Objective for Sft {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn micro_step(&mut self, batch: &[usize], weight: f64, seed: u64, opt: &mut AdamW) -> Result<Metrics> {
        if let Some(d) = &self.dropout {
            d.reseed(seed);
        }
        let mut tape = self.gradient_checkpointing.then(Tape::new);
        let (loss, tokens, _) = self.loss(batch, true, tape.as_mut())?;
        backward(&loss, tape, &mut |grads| opt.accumulate(grads, weight))?;
        Metrics::new(&[("loss", &loss)], batch.len(), tokens)
    }
}

/// The resolved options of `bpo sft` (saved as the run's `train_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    #[serde(flatten)]
    pub setup: ModelSetup,
    /// LLaVA instruct JSON (array) or JSONL of conversations.
    pub data: PathBuf,
    pub images: Option<PathBuf>,
    pub max_length: usize,
    pub feature_cache_mb: usize,
    pub optim: LoopConfig,
}

/// `bpo sft`: supervised training, writing the run folder `out` (an adapter, or with full fine-tuning a model
/// folder that `--model` accepts). `stop` and `hooks` may end the run early; the data report and the training
/// steps go to `events`.
pub fn train(
    cfg: &SftConfig,
    out: &Path,
    resume: bool,
    stop: Option<&AtomicBool>,
    hooks: &mut dyn Hooks,
    events: &dyn Events,
) -> Result<TrainReport> {
    let _lock = prepare_run_dir(out, &serde_json::to_value(cfg).map_err(Error::invalid)?, resume)?;
    let prepared = prepare_model(&cfg.setup, cfg.optim.seed)?;
    record_template(out, &prepared.vlm)?;
    let samples = read_conversations(&cfg.data)?;
    let (examples, report) = tokenize_conversations(&prepared.vlm, &samples, cfg.images.as_deref(), cfg.max_length)?;
    for (id, path) in report.missing_images.iter().take(10) {
        events.message(&format!("skipped {id}: image {} not found", path.display()));
    }
    events.message(&format!("conversations: {report}"));
    let mut sft = Sft::new(prepared.vlm, examples, cfg.feature_cache_mb, cfg.setup.train_vision);
    sft.gradient_checkpointing = cfg.setup.gradient_checkpointing;
    let summary = train_loop(&mut sft, &prepared.trainable, &cfg.optim, out, resume, stop, hooks, events)?;
    if !report.missing_images.is_empty() {
        events.message(&format!(
            "{} conversations were skipped because their image is missing",
            report.missing_images.len()
        ));
    }
    Ok(TrainReport { data: report, summary, images_encoded: sft.features.encoded })
}
