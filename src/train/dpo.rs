//! DPO on preference pairs (`bpo train`): the policy is the model with trainable LoRA adapters (and projector),
//! the reference the same weights with adapters off and a frozen copy of the starting projector, or log-probs
//! computed once before training.
//!
//! Per micro-batch of B pairs: each distinct image goes through the frozen tower once (cached), the projector
//! once, each prompt through the language model once, and the chosen and rejected answers continue from it
//! ([`super::batch`]). The policy forward builds the graph; the reference forward tracks nothing (adapters off,
//! frozen weights, detached features), so it runs the fused inference kernels.
//!
//! With mDPO ([`MdpoConfig`]) each prompt runs a second time with its image corrupted by diffusion noise (as
//! `bpo distort` makes it), and the chosen answer continues from it, in the same forward pass
//! ([`PairBatch::with_corrupted`]); [`mdpo_loss`] adds the conditional and anchor terms.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::batch::PairBatch;
use super::checkpoint::REF_LOGPS;
use super::data::{read_preference_file, tokenize_pairs, DataReport, PairExample};
use super::features::{FeatureCache, Noise};
use super::loss::{dpo_loss, mdpo_loss, CorruptedLogps, DpoLoss, MdpoLoss, PairLogps};
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
    /// Computed before training, per example: the sums of its rows in batch order (chosen, rejected, and with mDPO
    /// the chosen answer given the corrupted image).
    Precomputed(Vec<Vec<f32>>),
}

/// mDPO's settings (`bpo train --objective mdpo`), recorded in `train_config.json` as `mdpo`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MdpoConfig {
    #[serde(flatten)]
    pub loss: MdpoLoss,
    /// Diffusion step of the corrupted image, 0..1000 (`bpo distort --noise-step`).
    pub noise_step: usize,
}

impl Default for MdpoConfig {
    /// The released trainer's weights (1, 1, delta 0); the noise of BPO's image weakening (step 900).
    fn default() -> Self {
        MdpoConfig { loss: MdpoLoss::default(), noise_step: 900 }
    }
}

/// mDPO on a set of examples: its loss weights and each example's corrupted image.
pub struct Mdpo {
    pub loss: MdpoLoss,
    /// Per example: the noise of its corrupted image.
    pub noise: Vec<Noise>,
}

impl Mdpo {
    /// The corrupted image of every example: noise at `cfg.noise_step` seeded by (`seed`, the image's path below
    /// `images`), so every pair of a record (and every record of an image) sees one corrupted image, the same in a
    /// resumed run. Every example needs an image.
    pub fn new(cfg: &MdpoConfig, examples: &[PairExample], seed: u64, images: Option<&Path>) -> Result<Self> {
        crate::vision::NoiseSchedule::default().sqrt_abar(cfg.noise_step)?;
        let noise = examples
            .iter()
            .map(|e| match &e.image {
                Some(path) => {
                    let name = images.and_then(|root| path.strip_prefix(root).ok()).unwrap_or(path);
                    let key = ["mdpo-corrupted-image", &seed.to_string(), &name.to_string_lossy()];
                    Ok(Noise { step: cfg.noise_step, seed: crate::hash::stable_hash(&key) })
                }
                None => bail!("--objective mdpo needs an image in every pair; pair {} has none", e.id),
            })
            .collect::<Result<_>>()?;
        Ok(Mdpo { loss: cfg.loss, noise })
    }
}

/// The DPO objective over a set of tokenised pairs.
pub struct Dpo {
    pub vlm: Vlm,
    pub examples: Vec<PairExample>,
    pub reference: Reference,
    pub loss: DpoLoss,
    pub features: FeatureCache,
    /// mDPO's image-side pair and anchor (None: plain DPO).
    pub mdpo: Option<Mdpo>,
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
            mdpo: None,
            gradient_checkpointing: false,
            dropout,
        }
    }

    fn batch(&mut self, batch: &[usize]) -> Result<PairBatch> {
        let exs: Vec<&PairExample> = batch.iter().map(|&i| &self.examples[i]).collect();
        let pb = PairBatch::new(&self.vlm, &exs, &mut self.features)?;
        match &self.mdpo {
            Some(m) => {
                let noise: Vec<Noise> = batch.iter().map(|&i| m.noise[i]).collect();
                pb.with_corrupted(&self.vlm, &exs, &noise, &mut self.features)
            }
            None => Ok(pb),
        }
    }

    /// Reference log-prob sums of `batch` laid out as `pb`: chosen, rejected, and with mDPO the chosen answers given
    /// the corrupted images, each (B,).
    fn reference_logps(&self, batch: &[usize], pb: &PairBatch) -> Result<Vec<Tensor>> {
        let sums = match &self.reference {
            Reference::AdaptersOff { projector } => {
                pb.logps(&self.vlm.model, projector.as_ref(), true, Pass::BASE, None)?.0
            }
            Reference::Frozen(model) => pb.logps(model, None, true, Pass::BASE, None)?.0,
            Reference::StartingPolicy => bail!("the starting-policy reference must be precomputed"),
            Reference::Precomputed(v) => {
                let parts = 2 + usize::from(pb.corrupted);
                if let Some(&i) = batch.iter().find(|&&i| v[i].len() != parts) {
                    bail!(
                        "the precomputed reference of pair {} has {} log-probs, not {parts}",
                        self.examples[i].id,
                        v[i].len()
                    );
                }
                let device = &self.vlm.model.rt.device;
                return (0..parts)
                    .map(|k| Ok(Tensor::from_vec(batch.iter().map(|&i| v[i][k]).collect(), batch.len(), device)?))
                    .collect();
            }
        };
        split_rows(&sums.detach(), batch.len())
    }

    /// Policy and reference log-probs of `batch` laid out as `pb` (and of its image-side rows, with mDPO); `train`
    /// builds the graph with dropout on, and `tape` checkpoints the policy's decoder layers.
    fn forward<'a>(
        &'a self,
        batch: &[usize],
        pb: &PairBatch,
        train: bool,
        tape: Option<&mut Tape<'a>>,
    ) -> Result<(PairLogps, Option<CorruptedLogps>)> {
        let (sums, counts) = pb.logps(&self.vlm.model, None, false, Pass { adapters: true, train }, tape)?;
        let mut reference = self.reference_logps(batch, pb)?.into_iter();
        let (b, mut policy) = (batch.len(), split_rows(&sums, batch.len())?.into_iter());
        let next = |it: &mut std::vec::IntoIter<Tensor>| it.next().ok_or_else(|| Error::invalid("missing log-probs"));
        let lp = PairLogps {
            chosen: next(&mut policy)?,
            rejected: next(&mut policy)?,
            ref_chosen: next(&mut reference)?,
            ref_rejected: next(&mut reference)?,
            chosen_tokens: counts.narrow(0, 0, b)?,
            rejected_tokens: counts.narrow(0, b, b)?,
        };
        let side = match pb.corrupted {
            true => Some(CorruptedLogps { chosen: next(&mut policy)?, ref_chosen: next(&mut reference)? }),
            false => None,
        };
        Ok((lp, side))
    }

    /// The loss (with its graph) and the metrics of a batch.
    fn loss(&self, lp: &PairLogps, side: Option<&CorruptedLogps>, pb: &PairBatch) -> Result<(Tensor, Metrics)> {
        let (b, tokens) = (pb.pairs, pb.tokens);
        match (side, &self.mdpo) {
            (Some(side), Some(m)) => {
                let out = mdpo_loss(lp, side, &self.loss, &m.loss)?;
                Ok((out.loss.clone(), mdpo_metrics(lp, side, &out, b, tokens)?))
            }
            _ => {
                let out = dpo_loss(lp, &self.loss)?;
                Ok((out.loss.clone(), to_metrics(&dpo_metrics(lp, &out)?, b, tokens)?))
            }
        }
    }

    /// Loss and metrics of `batch` without training (dropout off, no gradients kept).
    pub fn evaluate(&mut self, batch: &[usize]) -> Result<Metrics> {
        let pb = self.batch(batch)?;
        let (lp, side) = self.forward(batch, &pb, false, None)?;
        Ok(self.loss(&lp, side.as_ref(), &pb)?.1)
    }

    /// The loss of `batch` with its graph, dropout off: for checking gradients.
    pub fn loss_with_graph(&mut self, batch: &[usize]) -> Result<Tensor> {
        let pb = self.batch(batch)?;
        let (lp, side) = self.forward(batch, &pb, false, None)?;
        Ok(self.loss(&lp, side.as_ref(), &pb)?.0)
    }

    /// Computes the reference log-probs of every example now (`batch_size` pairs per pass) and switches to them;
    /// reports the stage `reference log-probs` (one unit a pair).
    pub fn precompute_reference(&mut self, batch_size: usize, events: &dyn Events) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(self.examples.len());
        let all: Vec<usize> = (0..self.examples.len()).collect();
        events.stage("reference log-probs", Some(all.len() as u64));
        for chunk in all.chunks(batch_size.max(1)) {
            let pb = self.batch(chunk)?;
            let parts = match &self.reference {
                Reference::StartingPolicy => {
                    let sums = pb.logps(&self.vlm.model, None, true, Pass::INFER, None)?.0;
                    split_rows(&sums, chunk.len())?
                }
                _ => self.reference_logps(chunk, &pb)?,
            };
            let parts = parts.iter().map(|t| t.to_vec1::<f32>()).collect::<candle_core::Result<Vec<_>>>()?;
            out.extend((0..chunk.len()).map(|i| parts.iter().map(|p| p[i]).collect::<Vec<f32>>()));
            events.advance(chunk.len() as u64);
        }
        events.end_stage();
        self.reference = Reference::Precomputed(out.clone());
        Ok(out)
    }
}

/// Sums over a batch's answer rows, (k B,), split into its k groups of B.
fn split_rows(sums: &Tensor, b: usize) -> Result<Vec<Tensor>> {
    (0..sums.dim(0)? / b.max(1)).map(|k| Ok(sums.narrow(0, k * b, b)?)).collect()
}

/// TRL's metric names and values for one batch, computed where the model runs (the trainer reads them back once a
/// step).
fn dpo_metrics(lp: &PairLogps, out: &super::loss::DpoOutput) -> Result<Vec<(&'static str, Tensor)>> {
    let margins = (&out.chosen_rewards - &out.rejected_rewards)?;
    let accuracy = out.chosen_rewards.gt(&out.rejected_rewards)?.to_dtype(candle_core::DType::F32)?;
    let m = |t: &Tensor| t.detach().mean_all();
    Ok(vec![
        ("loss", out.loss.clone()),
        ("rewards/chosen", m(&out.chosen_rewards)?),
        ("rewards/rejected", m(&out.rejected_rewards)?),
        ("rewards/accuracies", m(&accuracy)?),
        ("rewards/margins", m(&margins)?),
        ("logps/chosen", m(&lp.chosen)?),
        ("logps/rejected", m(&lp.rejected)?),
    ])
}

/// The metrics of an mDPO batch: DPO's (TRL's names) with `loss` the mDPO total, each term unweighted
/// (`loss/dpo`, `loss/conditional`, `loss/anchor`), and the image-side pair under the released mDPO trainer's names
/// (`imageless`: the chosen answer given the corrupted image).
pub fn mdpo_metrics(
    lp: &PairLogps,
    side: &CorruptedLogps,
    out: &super::loss::MdpoOutput,
    examples: usize,
    tokens: usize,
) -> Result<Metrics> {
    let mut named = dpo_metrics(lp, &out.dpo)?;
    named[0].1 = out.loss.clone();
    let (chosen, corrupted) = (&out.dpo.chosen_rewards, &out.corrupted_rewards);
    let m = |t: &Tensor| t.detach().mean_all();
    named.extend([
        ("loss/dpo", out.dpo.loss.clone()),
        ("loss/conditional", out.conditional.clone()),
        ("loss/anchor", out.anchor.clone()),
        ("rewards/imageless_chosen", m(corrupted)?),
        ("rewards/imageless_accuracies", m(&chosen.gt(corrupted)?.to_dtype(candle_core::DType::F32)?)?),
        ("rewards/imageless_margins", m(&(chosen - corrupted)?)?),
        ("logps/imageless_chosen", m(&side.chosen)?),
    ]);
    to_metrics(&named, examples, tokens)
}

fn to_metrics(named: &[(&'static str, Tensor)], examples: usize, tokens: usize) -> Result<Metrics> {
    let refs: Vec<(&'static str, &Tensor)> = named.iter().map(|(n, t)| (*n, t)).collect();
    Metrics::new(&refs, examples, tokens)
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
        let (lp, side) = self.forward(batch, &pb, true, tape.as_mut())?;
        let (loss, metrics) = self.loss(&lp, side.as_ref(), &pb)?;
        backward(&loss, tape, &mut |grads| opt.accumulate(grads, weight))?;
        Ok(metrics)
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
    /// mDPO's image-side pair and anchor on top of the DPO loss (`--objective mdpo`); None = plain DPO (and no
    /// `mdpo` key in `train_config.json`, so runs made before it resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdpo: Option<MdpoConfig>,
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
    if let Some(m) = &cfg.mdpo {
        m.loss.validate()?;
        crate::vision::NoiseSchedule::default().sqrt_abar(m.noise_step)?;
    }
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
    let mdpo = cfg.mdpo.as_ref().map(|m| Mdpo::new(m, &examples, cfg.optim.seed, cfg.images.as_deref())).transpose()?;
    let mut dpo = Dpo::new(prepared.vlm, examples, reference, cfg.loss, cfg.feature_cache_mb);
    dpo.mdpo = mdpo;
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

/// Loads the run's precomputed reference log-probs, or computes and saves them. A row holds `chosen` and
/// `rejected`, and with mDPO `imageless_chosen` (the chosen answer given the corrupted image).
fn reference_cache(dpo: &mut Dpo, path: &Path, batch_size: usize, events: &dyn Events) -> Result<()> {
    if path.exists() {
        #[derive(serde::Deserialize)]
        struct Row {
            id: serde_json::Value,
            chosen: f32,
            rejected: f32,
            imageless_chosen: Option<f32>,
        }
        // A malformed row (a missing or non-numeric log-prob) is an error naming its line, never a NaN.
        let rows: Vec<Row> = crate::jsonl::read(path)?;
        let same = rows.len() == dpo.examples.len()
            && rows.iter().zip(&dpo.examples).all(|(r, e)| r.id == json!(e.id))
            && rows.iter().all(|r| r.imageless_chosen.is_some() == dpo.mdpo.is_some());
        if !same {
            return Err(Error::parse(
                path,
                None,
                "reference log-probs belong to other data or another objective: delete the file to recompute them",
            ));
        }
        let v = rows.iter().map(|r| [r.chosen, r.rejected].into_iter().chain(r.imageless_chosen).collect()).collect();
        dpo.reference = Reference::Precomputed(v);
        return Ok(());
    }
    events.message(&format!("computing reference log-probs for {} pairs", dpo.examples.len()));
    let v = dpo.precompute_reference(batch_size, events)?;
    let rows: Vec<serde_json::Value> = dpo
        .examples
        .iter()
        .zip(&v)
        .map(|(e, r)| {
            let mut row = json!({"id": e.id, "chosen": r[0], "rejected": r[1]});
            if let Some(c) = r.get(2) {
                row["imageless_chosen"] = json!(c);
            }
            row
        })
        .collect();
    crate::jsonl::write(path, &rows)
}

/// Default budget of the feature cache, in MiB.
pub const DEFAULT_FEATURE_CACHE_MB: usize = 2048;
