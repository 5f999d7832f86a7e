//! Image weakening (`mllm-hal` negatives): the MLLM answers each prompt while it sees a diffusion-noised copy of
//! the image, so the answer leans on its language prior instead of the picture (method.md, "Image weakening").
//!
//! [`run_weaken`] streams the pending records of one shard through one generation [`Engine`]. For every record
//! with an image and every sample it noises the preprocessed image at `noise_step` ([`NoiseSchedule::weaken`],
//! after normalisation), generates one answer with the chosen [`DecodeMode`] and keeps it as a negative unless it
//! is empty, the ground truth, or a repeat (judged in sample order). The contrast modes give each answer a
//! clean-image contrast row, decoded in lockstep with it. A record is appended, with its new completions, as soon
//! as its last answer finishes, so records come out in the order they finish and a kill loses only the records in
//! progress.
//!
//! Determinism: the noise seed and the sampling seed of an answer are hashes of (seed, record id, sample)
//! ([`noise_seed`], [`sample_seed`]), never of the position in a batch. A re-run, a resumed run or another shard
//! layout draws the same noise and the same tokens (bit for bit on the CPU in f32; elsewhere up to float rounding,
//! see [`crate::generate::engine`]).
//!
//! Text-only records are written unchanged and counted. A record whose image cannot be read is not written
//! (counted; the next run retries it, e.g. after `--images` is fixed).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use serde::Serialize;

use super::decode::DecodeMode;
use super::inject::{classify, keep_negative, Kept};
use crate::data::records::{CompletionType, Record};
use crate::data::resume::{pending, ResumableWriter, RunCounts, Shard};
use crate::generate::{Engine, EngineOptions, Feed, Finished, Request, SamplingParams};
use crate::hash::stable_hash;
use crate::model::Pass;
use crate::model::Vlm;
use crate::progress::Events;
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
    /// Token budget of the KV cache (see [`EngineOptions::max_batch_tokens`]); default none.
    pub max_batch_tokens: Option<usize>,
    pub shard: Shard,
    /// Seeds the noise and the sampling; default 0.
    pub seed: u64,
    /// Type given to the new completions; default `mllm-hal`.
    pub kind: CompletionType,
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
            max_batch_tokens: None,
            shard: Shard::ALL,
            seed: 0,
            kind: CompletionType::MllmHal,
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

/// Answers every pending record of `opts.shard` from weakened images with `vlm` (a LLaVA model with its image
/// processor and chat template) and appends each record, with its new `mllm-hal` completions, to `output`. Reports
/// the stage `records` (one unit a pending record).
pub fn run_weaken(
    vlm: &Vlm,
    records: Vec<Record>,
    opts: &WeakenOptions,
    output: &mut ResumableWriter,
    events: &dyn Events,
) -> Result<WeakenCounts> {
    check(vlm, opts)?;
    let (pending, records) = pending(records, opts.shard, output);
    events.stage("records", Some(pending.len() as u64));
    let contrast = opts.decode.needs_clean();
    let batch = EngineOptions::rows(opts.batch_size.max(1) * (1 + usize::from(contrast)), opts.max_batch_tokens);
    let mode = opts.decode;
    let mix = move |clean: &[f32], noisy: &[f32]| mode.mix(clean, noisy);
    let mut engine = Engine::new(&vlm.model, &vlm.tok, batch, Pass::INFER)?;
    if contrast {
        engine = engine.with_combine(&mix);
    }
    let mut feed = WeakenFeed {
        vlm,
        opts,
        schedule: NoiseSchedule::default(),
        records: pending.into_iter().enumerate(),
        queue: VecDeque::new(),
        open: HashMap::new(),
        output,
        counts: WeakenCounts { records, ..Default::default() },
        events,
    };
    engine.run(&mut feed)?;
    events.end_stage();
    Ok(feed.counts)
}

/// Turns records into the engine's requests (answer `s` of record `i` has id `i * samples + s`) and writes each
/// record when its answers are in.
struct WeakenFeed<'a> {
    vlm: &'a Vlm,
    opts: &'a WeakenOptions,
    schedule: NoiseSchedule,
    records: std::iter::Enumerate<std::vec::IntoIter<Record>>,
    /// Requests of the record being fed that the engine has not taken yet.
    queue: VecDeque<(usize, Request)>,
    /// Records with answers in progress, by index, with their answers so far (in sample order).
    open: HashMap<usize, (Record, Vec<Option<String>>)>,
    output: &'a mut ResumableWriter,
    counts: WeakenCounts,
    events: &'a dyn Events,
}

impl WeakenFeed<'_> {
    fn write(&mut self, record: &Record) -> Result<()> {
        self.output.append(record)?;
        self.counts.records.written += 1;
        self.events.advance(1);
        Ok(())
    }

    /// The requests of record `i`, or `None` when it needs no answer (text-only, or no room in the context: written
    /// unchanged) or its image cannot be read (counted as failed, left for the next run).
    fn requests(&mut self, i: usize, record: &Record) -> Result<Option<Vec<(usize, Request)>>> {
        let opts = self.opts;
        let Some(rel) = &record.image else {
            self.counts.text_only += 1;
            return Ok(None);
        };
        let clean = match self.vlm.load_image(&opts.images.join(rel)) {
            Ok(t) => t,
            Err(e) => {
                self.counts.image_failed += 1;
                self.counts.records.failed += 1;
                if self.counts.errors.len() < KEPT_ERRORS {
                    self.counts.errors.push(format!("{}: {e}", record.id));
                }
                self.events.advance(1);
                return Ok(Some(Vec::new()));
            }
        };
        let ids = self.vlm.prompt_ids(&record.prompt, true)?;
        let context = self.vlm.model.llm.cfg.max_position_embeddings;
        if ids.len() >= context {
            self.counts.too_long += 1;
            return Ok(None);
        }
        let params = SamplingParams {
            max_new_tokens: opts.max_new_tokens.min(context - ids.len()).max(1),
            temperature: opts.temperature,
            top_p: opts.top_p,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(opts.samples);
        for sample in 0..opts.samples {
            let noisy = self.schedule.weaken(&clean, opts.noise_step, noise_seed(opts.seed, &record.id, sample))?;
            let (image, contrast) =
                if opts.decode.needs_clean() { (clean.clone(), Some(noisy)) } else { (noisy, None) };
            let seed = sample_seed(opts.seed, &record.id, sample);
            let request = Request { ids: ids.clone(), image: Some(image), params: params.clone(), seed, contrast };
            out.push((i * opts.samples + sample, request));
        }
        Ok(Some(out))
    }
}

impl Feed for WeakenFeed<'_> {
    fn next(&mut self) -> Result<Option<(usize, Request)>> {
        while self.queue.is_empty() {
            let Some((i, record)) = self.records.next() else { return Ok(None) };
            match self.requests(i, &record)? {
                None => self.write(&record)?,
                Some(requests) if requests.is_empty() => {}
                Some(requests) => {
                    self.queue.extend(requests);
                    self.open.insert(i, (record, vec![None; self.opts.samples]));
                }
            }
        }
        Ok(self.queue.pop_front())
    }

    fn done(&mut self, finished: Finished) -> Result<()> {
        let (i, sample) = (finished.id / self.opts.samples, finished.id % self.opts.samples);
        let Some((_, answers)) = self.open.get_mut(&i) else { bail!("an answer for record {i}, which is not open") };
        answers[sample] = Some(finished.completion.text);
        if answers.iter().any(Option::is_none) {
            return Ok(());
        }
        let Some((mut record, answers)) = self.open.remove(&i) else { return Ok(()) };
        let gt = record.ground_truth().map(|c| c.response.clone()).unwrap_or_default();
        for answer in answers.into_iter().flatten() {
            self.counts.generated += 1;
            match keep_negative(&mut record, classify(answer.trim(), &gt), &self.opts.kind) {
                Kept::Added => self.counts.added += 1,
                Kept::Empty => self.counts.empty += 1,
                Kept::Identical => self.counts.identical += 1,
                Kept::Duplicate => self.counts.duplicate += 1,
            }
        }
        self.write(&record)
    }
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
