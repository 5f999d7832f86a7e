//! Image weakening (`mllm-hal` negatives): the MLLM answers each prompt while it sees a diffusion-noised copy of
//! the image, so the answer leans on its language prior instead of the picture (method.md, "Image weakening").
//!
//! [`run_weaken`] streams the records of one shard through [`process_pending`]. For every record with an image
//! and every sample it noises the preprocessed image at `noise_step` ([`NoiseSchedule::weaken`], after
//! normalisation), generates one answer with the chosen [`DecodeMode`] and keeps it as a negative unless it is
//! empty, the ground truth, or a repeat. The contrast modes run a clean-image row beside each noisy row in the
//! same batch ([`generate_seeded`] with a contrast set). Each record is appended once, with its new completions,
//! when its batch is done.
//!
//! Determinism: the noise seed and the sampling seed of an answer are hashes of (seed, record id, sample)
//! ([`noise_seed`], [`sample_seed`]), never of the position in a batch. A re-run, a resumed run or another shard
//! layout draws the same noise and the same tokens (batches with left padding can differ by float rounding).
//!
//! Text-only records are written unchanged and counted. A record whose image cannot be read is not written
//! (counted; the next run retries it, e.g. after `--images` is fixed).

use std::path::PathBuf;

use serde::Serialize;

use super::decode::DecodeMode;
use super::inject::{classify, keep_negative, Kept};
use crate::data::records::{CompletionType, Record};
use crate::data::resume::{process_pending, ResumableWriter, RunCounts, Shard};
use crate::generate::{generate_seeded, Completion, Request, SamplingParams};
use crate::hash::stable_hash;
use crate::model::Pass;
use crate::model::Vlm;
use crate::progress;
use crate::vision::NoiseSchedule;
use crate::{bail, Result};

/// Options of [`run_weaken`]. Defaults follow the released script where it is sound (step 900, temperature
/// 0.2, up to 1024 new tokens) and the paper's intent for decoding (sample from the noised image).
#[derive(Debug, Clone)]
pub struct WeakenOptions {
    /// Folder that the records' image paths are relative to.
    pub images: PathBuf,
    /// Answers generated per record (each from its own noise); default 1.
    pub samples: usize,
    /// Diffusion step of the noise, `0..1000`; default 900.
    pub noise_step: usize,
    pub decode: DecodeMode,
    /// Sampling temperature (0 = greedy); default 0.2.
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off); default 1.
    pub top_p: f32,
    /// Most new tokens per answer, cut to what the model's context leaves; default 1024.
    pub max_new_tokens: usize,
    /// Answers generated together; a contrast mode adds one clean-image row per answer. Default 8.
    pub batch_size: usize,
    pub shard: Shard,
    /// Seeds the noise and the sampling; default 0.
    pub seed: u64,
    /// Type given to the new completions; default `mllm-hal`.
    pub kind: CompletionType,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for WeakenOptions {
    fn default() -> Self {
        WeakenOptions {
            images: PathBuf::new(),
            samples: 1,
            noise_step: 900,
            decode: DecodeMode::Noisy,
            temperature: 0.2,
            top_p: 1.0,
            max_new_tokens: 1024,
            batch_size: 8,
            shard: Shard::ALL,
            seed: 0,
            kind: CompletionType::MllmHal,
            progress: false,
        }
    }
}

/// Counts of one [`run_weaken`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WeakenCounts {
    /// Records: input, other shards, already done, written, failed (image unreadable; retried next run).
    pub records: RunCounts,
    /// Records written unchanged: no image.
    pub text_only: usize,
    /// Records written unchanged: the prompt leaves no room in the model's context.
    pub too_long: usize,
    /// Answers generated.
    pub generated: usize,
    /// New completions added to records.
    pub added: usize,
    /// Answers dropped: empty.
    pub empty: usize,
    /// Answers dropped: same as the ground truth (whitespace-normalised).
    pub identical: usize,
    /// Answers dropped: same as another completion of the record.
    pub duplicate: usize,
    /// Records not written because their image could not be read.
    pub image_failed: usize,
    /// The first few image errors, to show the user.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Image errors kept in [`WeakenCounts::errors`].
const KEPT_ERRORS: usize = 5;

/// Seed of the noise for answer `sample` of record `id`.
pub fn noise_seed(seed: u64, id: &str, sample: usize) -> u64 {
    stable_hash(&["noise", &seed.to_string(), id, &sample.to_string()])
}

/// Seed of the token sampling for answer `sample` of record `id`.
pub fn sample_seed(seed: u64, id: &str, sample: usize) -> u64 {
    stable_hash(&["sample", &seed.to_string(), id, &sample.to_string()])
}

/// One answer to generate: record `record` (index in the batch), sample `sample`.
struct Row {
    record: usize,
    sample: usize,
    ids: Vec<u32>,
    clean: candle_core::Tensor,
}

/// Answers every pending record of `opts.shard` from weakened images with `vlm` (a LLaVA model with its image
/// processor and chat template) and appends each record, with its new `mllm-hal` completions, to `output`.
pub fn run_weaken(
    vlm: &Vlm,
    records: Vec<Record>,
    opts: &WeakenOptions,
    output: &mut ResumableWriter,
) -> Result<WeakenCounts> {
    check(vlm, opts)?;
    let schedule = NoiseSchedule::default();
    let mut counts = WeakenCounts::default();
    let bar = progress::bar(opts.progress, "records");
    let records = process_pending(records, opts.shard, opts.batch_size, output, bar.as_ref(), |batch| {
        let mut out: Vec<Option<Record>> = batch.iter().cloned().map(Some).collect();
        let rows = build_rows(vlm, batch, opts, &mut out, &mut counts)?;
        for chunk in rows.chunks(opts.batch_size.max(1)) {
            let answers = answer(vlm, &schedule, batch, chunk, opts)?;
            for (row, ans) in chunk.iter().zip(answers) {
                counts.generated += 1;
                if let Some(record) = out[row.record].as_mut() {
                    let gt = record.ground_truth().map(|c| c.response.clone()).unwrap_or_default();
                    match keep_negative(record, classify(ans.text.trim(), &gt), &opts.kind) {
                        Kept::Added => counts.added += 1,
                        Kept::Empty => counts.empty += 1,
                        Kept::Identical => counts.identical += 1,
                        Kept::Duplicate => counts.duplicate += 1,
                    }
                }
            }
        }
        Ok(out)
    })?;
    bar.finish();
    Ok(WeakenCounts { records, ..counts })
}

impl WeakenOptions {
    /// Checks the settings that do not depend on the model (call before loading one, to fail fast).
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            bail!("samples must be at least 1");
        }
        crate::generate::check_sampling(self.temperature, self.top_p)?;
        NoiseSchedule::default().sqrt_abar(self.noise_step)?;
        self.decode.validate()
    }
}

/// Fails early on settings that cannot work, before any record is touched.
fn check(vlm: &Vlm, opts: &WeakenOptions) -> Result<()> {
    if vlm.processor.is_none() || vlm.model.vision.is_none() {
        bail!("image weakening needs a LLaVA model with a vision tower; this one is text-only");
    }
    opts.validate()
}

/// The answers to generate for one batch of records: `samples` rows per record with a readable image that fits
/// the context. Records that cannot be used are counted here (and unreadable images marked failed in `out`).
fn build_rows(
    vlm: &Vlm,
    batch: &[Record],
    opts: &WeakenOptions,
    out: &mut [Option<Record>],
    counts: &mut WeakenCounts,
) -> Result<Vec<Row>> {
    let context = vlm.model.llm.cfg.max_position_embeddings;
    let mut rows = Vec::new();
    for (i, record) in batch.iter().enumerate() {
        let Some(rel) = &record.image else {
            counts.text_only += 1;
            continue;
        };
        let clean = match vlm.load_image(&opts.images.join(rel)) {
            Ok(t) => t,
            Err(e) => {
                counts.image_failed += 1;
                if counts.errors.len() < KEPT_ERRORS {
                    counts.errors.push(format!("{}: {e}", record.id));
                }
                out[i] = None;
                continue;
            }
        };
        let ids = vlm.prompt_ids(&record.prompt, true)?;
        if ids.len() >= context {
            counts.too_long += 1;
            continue;
        }
        for sample in 0..opts.samples {
            rows.push(Row { record: i, sample, ids: ids.clone(), clean: clean.clone() });
        }
    }
    Ok(rows)
}

/// Generates one answer per row: noisy-image rows, plus clean-image rows when the decode mode contrasts them.
fn answer(
    vlm: &Vlm,
    schedule: &NoiseSchedule,
    batch: &[Record],
    rows: &[Row],
    opts: &WeakenOptions,
) -> Result<Vec<Completion>> {
    let mut noisy = Vec::with_capacity(rows.len());
    let mut seeds = Vec::with_capacity(rows.len());
    for row in rows {
        let id = &batch[row.record].id;
        let image = schedule.weaken(&row.clean, opts.noise_step, noise_seed(opts.seed, id, row.sample))?;
        noisy.push(Request { ids: row.ids.clone(), image: Some(image) });
        seeds.push(sample_seed(opts.seed, id, row.sample));
    }
    let longest = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let room = vlm.model.llm.cfg.max_position_embeddings.saturating_sub(longest);
    let params = SamplingParams {
        max_new_tokens: opts.max_new_tokens.min(room).max(1),
        temperature: opts.temperature,
        top_p: opts.top_p,
        ..Default::default()
    };
    let (model, tok) = (&vlm.model, &vlm.tok);
    if !opts.decode.needs_clean() {
        return generate_seeded(model, tok, &noisy, None, &params, Pass::INFER, &seeds);
    }
    let clean: Vec<Request> =
        rows.iter().map(|r| Request { ids: r.ids.clone(), image: Some(r.clean.clone()) }).collect();
    let mode = opts.decode;
    let mix = move |c: &[f32], n: &[f32]| mode.mix(c, n);
    generate_seeded(model, tok, &clean, Some((&noisy, &mix)), &params, Pass::INFER, &seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_seed_id_and_sample_only() {
        assert_eq!(noise_seed(3, "a#0", 1), noise_seed(3, "a#0", 1));
        let all = [
            noise_seed(3, "a#0", 1),
            noise_seed(4, "a#0", 1),
            noise_seed(3, "a#1", 1),
            noise_seed(3, "a#0", 0),
            sample_seed(3, "a#0", 1),
        ];
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
    }

    #[test]
    fn defaults_follow_the_release() {
        let o = WeakenOptions::default();
        assert_eq!((o.noise_step, o.samples, o.max_new_tokens, o.temperature), (900, 1, 1024, 0.2));
        assert_eq!((o.decode, o.kind), (DecodeMode::Noisy, CompletionType::MllmHal));
    }
}
