//! DPO on preference pairs (`bpo train`): the policy is the model with trainable LoRA adapters (and projector),
//! the reference the same weights with adapters off and a frozen copy of the starting projector, or log-probs
//! computed once before training.
//!
//! Per micro-batch of B pairs: each distinct image goes through the frozen tower once (cached), the projector
//! once, each prompt through the language model once, and the chosen and rejected answers continue from it
//! ([`super::batch`]). The policy forward builds the graph; the reference forward tracks nothing (adapters off,
//! frozen weights, detached features), so it runs the fused inference kernels.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::batch::PairBatch;
use super::checkpoint::REF_LOGPS;
use super::data::{read_preference_file, tokenize_pairs, DataReport, PairExample};
use super::features::FeatureCache;
use super::loss::{dpo_loss, DpoLoss, PairLogps};
use super::optim::AdamW;
use super::setup::{prepare_model, prepare_run_dir, record_template, ModelSetup};
use super::trainer::{train_loop, Hooks, LoopConfig, LoopSummary, Metrics, Objective};
use crate::data::PairOptions;
use crate::model::checkpoint::{backward, Tape};
use crate::model::linear::DropoutSeed;
use crate::model::llava::Projector;
use crate::model::Vlm;
use crate::model::{Model, Pass};
use crate::progress::Events;
use crate::{bail, Error, Result};

/// Where reference log-probs come from.
pub enum Reference {
    /// The policy's weights with adapters off. `projector`: the frozen starting projector; None = the live
    /// (training) projector, detached, which is what BPO's released code did (its reference drifts).
    AdaptersOff { projector: Option<Projector> },
    /// A separate frozen model (full fine-tuning).
    Frozen(Box<Model>),
    /// The policy as it is before the first step (a starting adapter); only usable through [`Dpo::precompute_reference`].
    StartingPolicy,
    /// Computed before training: (chosen, rejected) per example.
    Precomputed(Vec<(f32, f32)>),
}

/// The DPO objective over a set of tokenised pairs.
pub struct Dpo {
    pub vlm: Vlm,
    pub examples: Vec<PairExample>,
    pub reference: Reference,
    pub loss: DpoLoss,
    pub features: FeatureCache,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    dropout: Option<Arc<DropoutSeed>>,
}

impl Dpo {
    pub fn new(mut vlm: Vlm, examples: Vec<PairExample>, reference: Reference, loss: DpoLoss, cache_mb: usize) -> Self {
        let dropout = vlm.model.llm.dropout_seed();
        Dpo {
            vlm,
            examples,
            reference,
            loss,
            features: FeatureCache::new(cache_mb),
            gradient_checkpointing: false,
            dropout,
        }
    }

    fn batch(&mut self, batch: &[usize]) -> Result<PairBatch> {
        let exs: Vec<&PairExample> = batch.iter().map(|&i| &self.examples[i]).collect();
        PairBatch::new(&self.vlm, &exs, &mut self.features)
    }

    /// Reference (chosen, rejected) log-prob sums of `batch`.
    fn reference_logps(&self, batch: &[usize], pb: &PairBatch) -> Result<(Tensor, Tensor)> {
        let b = batch.len();
        let sums = match &self.reference {
            Reference::AdaptersOff { projector } => {
                pb.logps(&self.vlm.model, projector.as_ref(), true, Pass::BASE, None)?.0
            }
            Reference::Frozen(model) => pb.logps(model, None, true, Pass::BASE, None)?.0,
            Reference::StartingPolicy => bail!("the starting-policy reference must be precomputed"),
            Reference::Precomputed(v) => {
                let (c, r): (Vec<f32>, Vec<f32>) = batch.iter().map(|&i| v[i]).unzip();
                return Ok((
                    Tensor::from_vec(c, b, &self.vlm.model.rt.device)?,
                    Tensor::from_vec(r, b, &self.vlm.model.rt.device)?,
                ));
            }
        };
        let sums = sums.detach();
        Ok((sums.narrow(0, 0, b)?, sums.narrow(0, b, b)?))
    }

    /// Policy and reference log-probs of `batch` laid out as `pb`; `train` builds the graph with dropout on, and
    /// `tape` checkpoints the policy's decoder layers.
    fn forward<'a>(
        &'a self,
        batch: &[usize],
        pb: &PairBatch,
        train: bool,
        tape: Option<&mut Tape<'a>>,
    ) -> Result<PairLogps> {
        let (sums, counts) = pb.logps(&self.vlm.model, None, false, Pass { adapters: true, train }, tape)?;
        let (ref_chosen, ref_rejected) = self.reference_logps(batch, pb)?;
        let b = batch.len();
        let lp = PairLogps {
            chosen: sums.narrow(0, 0, b)?,
            rejected: sums.narrow(0, b, b)?,
            ref_chosen,
            ref_rejected,
            chosen_tokens: counts.narrow(0, 0, b)?,
            rejected_tokens: counts.narrow(0, b, b)?,
        };
        Ok(lp)
    }

    /// Loss and metrics of `batch` without training (dropout off, no gradients kept).
    pub fn evaluate(&mut self, batch: &[usize]) -> Result<Metrics> {
        let pb = self.batch(batch)?;
        let lp = self.forward(batch, &pb, false, None)?;
        metrics(&lp, &dpo_loss(&lp, &self.loss)?, batch.len(), pb.tokens)
    }

    /// Computes the reference log-probs of every example now (`batch_size` pairs per pass) and switches to them;
    /// reports the stage `reference log-probs` (one unit a pair).
    pub fn precompute_reference(&mut self, batch_size: usize, events: &dyn Events) -> Result<Vec<(f32, f32)>> {
        let mut out = Vec::with_capacity(self.examples.len());
        let all: Vec<usize> = (0..self.examples.len()).collect();
        events.stage("reference log-probs", Some(all.len() as u64));
        for chunk in all.chunks(batch_size.max(1)) {
            let pb = self.batch(chunk)?;
            let (c, r) = match &self.reference {
                Reference::StartingPolicy => {
                    let sums = pb.logps(&self.vlm.model, None, true, Pass::INFER, None)?.0;
                    (sums.narrow(0, 0, chunk.len())?, sums.narrow(0, chunk.len(), chunk.len())?)
                }
                _ => self.reference_logps(chunk, &pb)?,
            };
            out.extend(c.to_vec1::<f32>()?.into_iter().zip(r.to_vec1::<f32>()?));
            events.advance(chunk.len() as u64);
        }
        events.end_stage();
        self.reference = Reference::Precomputed(out.clone());
        Ok(out)
    }
}

/// TRL's metric names for one batch, computed where the model runs (the trainer reads them back once a step).
fn metrics(lp: &PairLogps, out: &super::loss::DpoOutput, examples: usize, tokens: usize) -> Result<Metrics> {
    let margins = (&out.chosen_rewards - &out.rejected_rewards)?;
    let accuracy = out.chosen_rewards.gt(&out.rejected_rewards)?.to_dtype(candle_core::DType::F32)?;
    let m = |t: &Tensor| t.detach().mean_all();
    Metrics::new(
        &[
            ("loss", &out.loss),
            ("rewards/chosen", &m(&out.chosen_rewards)?),
            ("rewards/rejected", &m(&out.rejected_rewards)?),
            ("rewards/accuracies", &m(&accuracy)?),
            ("rewards/margins", &m(&margins)?),
            ("logps/chosen", &m(&lp.chosen)?),
            ("logps/rejected", &m(&lp.rejected)?),
        ],
        examples,
        tokens,
    )
}

impl Objective for Dpo {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn micro_step(&mut self, batch: &[usize], weight: f64, seed: u64, opt: &mut AdamW) -> Result<Metrics> {
        if let Some(d) = &self.dropout {
            d.reseed(seed);
        }
        let pb = self.batch(batch)?;
        let mut tape = self.gradient_checkpointing.then(Tape::new);
        let lp = self.forward(batch, &pb, true, tape.as_mut())?;
        let out = dpo_loss(&lp, &self.loss)?;
        backward(&out.loss, tape, &mut |grads| opt.accumulate(grads, weight))?;
        metrics(&lp, &out, batch.len(), pb.tokens)
    }
}

/// The resolved options of `bpo train` (saved as the run's `train_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    #[serde(flatten)]
    pub setup: ModelSetup,
    /// BPO records or a pair file.
    pub data: PathBuf,
    pub images: Option<PathBuf>,
    /// Records: drop those with a response longer than this many words.
    pub max_words: Option<usize>,
    /// Positions per sequence, image positions included.
    pub max_length: usize,
    pub loss: DpoLoss,
    /// Reference with the live projector (BPO's released behaviour) instead of a frozen copy.
    pub drifting_ref_projector: bool,
    pub precompute_ref: bool,
    pub feature_cache_mb: usize,
    pub optim: LoopConfig,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub data: DataReport,
    pub summary: LoopSummary,
    /// Images run through the vision tower (the rest came from the feature cache).
    pub images_encoded: usize,
}

fn describe_missing(report: &DataReport, events: &dyn Events) {
    for (id, path) in report.missing_images.iter().take(10) {
        events.message(&format!("skipped {id}: image {} not found", path.display()));
    }
    if report.missing_images.len() > 10 {
        events.message(&format!("... and {} more pairs with a missing image", report.missing_images.len() - 10));
    }
}

/// `bpo train`: DPO in `cfg.optim`'s loop, writing the run folder `out`. `stop` (set by a signal) and `hooks` may
/// end the run early; the data report, the reference pass and the training steps go to `events`.
pub fn train(
    cfg: &DpoConfig,
    out: &Path,
    resume: bool,
    stop: Option<&AtomicBool>,
    hooks: &mut dyn Hooks,
    events: &dyn Events,
) -> Result<TrainReport> {
    // Settings first: a bad one leaves nothing behind.
    cfg.optim.validate()?;
    cfg.setup.lora.as_ref().map_or(Ok(()), crate::model::lora::LoraConfig::validate)?;
    cfg.loss.validate()?;
    let _lock = prepare_run_dir(out, &serde_json::to_value(cfg).map_err(Error::invalid)?, resume)?;
    if cfg.setup.train_vision {
        crate::bail!("training the vision tower is for `bpo sft`: DPO's batches reuse cached, frozen tower features");
    }
    let prepared = prepare_model(&cfg.setup, cfg.optim.seed)?;
    record_template(out, &prepared.vlm)?;
    let (pairs, stats) = read_preference_file(&cfg.data, &PairOptions { max_words: cfg.max_words })?;
    let (examples, mut report) = tokenize_pairs(&prepared.vlm, &pairs, cfg.images.as_deref(), cfg.max_length)?;
    report.pairs = stats;
    describe_missing(&report, events);
    if let Some(stats) = &report.pairs {
        events.message(&format!("{stats}"));
    }
    events.message(&format!("pairs: {report}"));
    let reference = if cfg.setup.init_adapter.is_some() {
        Reference::StartingPolicy
    } else if cfg.setup.lora.is_none() {
        Reference::Frozen(Box::new(crate::model::load(
            &cfg.setup.model,
            &crate::model::LoadOptions::new(&cfg.setup.runtime),
        )?))
    } else {
        Reference::AdaptersOff { projector: if cfg.drifting_ref_projector { None } else { prepared.start_projector } }
    };
    let needs_precompute = cfg.precompute_ref || matches!(reference, Reference::StartingPolicy);
    let mut dpo = Dpo::new(prepared.vlm, examples, reference, cfg.loss, cfg.feature_cache_mb);
    dpo.gradient_checkpointing = cfg.setup.gradient_checkpointing;
    if needs_precompute {
        reference_cache(&mut dpo, &out.join(REF_LOGPS), cfg.optim.batch_size, events)?;
    }
    let summary = train_loop(&mut dpo, &prepared.trainable, &cfg.optim, out, resume, stop, hooks, events)?;
    if !report.missing_images.is_empty() {
        events.message(&format!(
            "{} pairs were skipped because their image is missing (listed at the start)",
            report.missing_images.len()
        ));
    }
    Ok(TrainReport { data: report, summary, images_encoded: dpo.features.encoded })
}

/// Loads the run's precomputed reference log-probs, or computes and saves them.
fn reference_cache(dpo: &mut Dpo, path: &Path, batch_size: usize, events: &dyn Events) -> Result<()> {
    if path.exists() {
        #[derive(serde::Deserialize)]
        struct Row {
            id: serde_json::Value,
            chosen: f32,
            rejected: f32,
        }
        // A malformed row (a missing or non-numeric log-prob) is an error naming its line, never a NaN.
        let rows: Vec<Row> = crate::jsonl::read(path)?;
        let same = rows.len() == dpo.examples.len() && rows.iter().zip(&dpo.examples).all(|(r, e)| r.id == json!(e.id));
        if !same {
            return Err(Error::parse(
                path,
                None,
                "reference log-probs belong to other data: delete the file to recompute them",
            ));
        }
        let v = rows.iter().map(|r| (r.chosen, r.rejected)).collect();
        dpo.reference = Reference::Precomputed(v);
        return Ok(());
    }
    events.message(&format!("computing reference log-probs for {} pairs", dpo.examples.len()));
    let v = dpo.precompute_reference(batch_size, events)?;
    let rows: Vec<serde_json::Value> =
        dpo.examples.iter().zip(&v).map(|(e, (c, r))| json!({"id": e.id, "chosen": c, "rejected": r})).collect();
    crate::jsonl::write(path, &rows)
}

/// Default budget of the feature cache, in MiB.
pub const DEFAULT_FEATURE_CACHE_MB: usize = 2048;
