//! Error injection (`llm-hal` negatives): a text-only LLM rewrites each ground-truth answer, through any
//! [`Completer`] (an OpenAI-compatible server via [`super::HttpCompleter`], or a local model).
//!
//! [`run_inject`] streams the records of one shard through [`crate::data::resume::process_pending`]: per batch it
//! builds one prompt per record and sample ([`super::prompt`]), asks the completer, cleans each output
//! ([`clean_output`]) and writes each record once, with its new completions, when all its samples are done.
//! A record whose request failed (`Error::Http`: no answer, an error status, or a reply that was not the expected
//! JSON with a text, after the completer's retries) is not written, so the next run retries it, and the first
//! reasons are kept in [`InjectCounts::errors`]; everything else (outputs dropped as empty after cleaning,
//! identical, or prompts the completer cannot run) is final and counted.

use serde::Serialize;

use super::prompt::{check_template, cut_prefix, fill, InjectMode};
use crate::data::records::{normalize_ws, Completion, CompletionType, Record};
use crate::data::resume::{process_pending, ResumableWriter, RunCounts, Shard};
use crate::progress::Events;
use crate::text::template::vicuna_v1;
use crate::{bail, Error, Result};

/// Sampling settings for one batch of prompts. Defaults follow the released script.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOptions {
    /// Sampling temperature; default 0.8.
    pub temperature: f32,
    /// Nucleus sampling mass; default 0.95.
    pub top_p: f32,
    /// Most new tokens per output; default 1024.
    pub max_tokens: usize,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Sampling seed, when the backend supports one.
    pub seed: Option<u64>,
}

impl Default for CompletionOptions {
    fn default() -> Self {
        CompletionOptions { temperature: 0.8, top_p: 0.95, max_tokens: 1024, stop: Vec::new(), seed: None }
    }
}

/// A text-only language model: one continuation per prompt.
///
/// The outer `Err` means the whole batch could not be run (the caller stops). Per prompt, return
/// `Err(Error::Http(..))` when no usable reply came (the record is not written and is retried on the next run)
/// and any other `Err` when the prompt itself cannot be run, e.g. it fills a local model's context (counted as
/// unparseable, final).
pub trait Completer {
    fn complete(&self, prompts: &[String], opts: &CompletionOptions) -> Result<Vec<Result<String>>>;
}

/// Options of [`run_inject`].
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub mode: InjectMode,
    /// Replaces the mode's built-in template (placeholders `{answer}`, `{question}`); not for `continue`.
    pub template: Option<String>,
    /// Wrap prompts in the Vicuna-v1 conversation (for raw completion endpoints); off when the server applies
    /// its own chat template. Never applied in `continue` mode.
    pub vicuna: bool,
    /// Sampling settings; the mode's stop strings are added to `stop`. The seed of sample `s` is `seed + s`.
    pub completion: CompletionOptions,
    /// Negatives asked per record; default 1.
    pub samples: usize,
    /// Records per call to the completer; default 32.
    pub batch_size: usize,
    pub shard: Shard,
    /// Seeds the `continue` cut points; default 0.
    pub seed: u64,
    /// Type given to the new completions; default `llm-hal`.
    pub kind: CompletionType,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            mode: InjectMode::Description,
            template: None,
            vicuna: true,
            completion: CompletionOptions::default(),
            samples: 1,
            batch_size: 32,
            shard: Shard::ALL,
            seed: 0,
            kind: CompletionType::LlmHal,
        }
    }
}

/// Counts of one [`run_inject`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InjectCounts {
    /// Records: input, other shards, already done, written, failed (not written, retried next run).
    pub records: RunCounts,
    /// Prompts sent.
    pub requests: usize,
    /// New completions added to records.
    pub added: usize,
    /// Requests that failed (server unreachable, error status, timeout, a reply without usable text, after all
    /// retries); their records are not written.
    pub request_failed: usize,
    /// Outputs dropped: nothing left after cleaning.
    pub empty: usize,
    /// Outputs dropped: same as the ground truth (whitespace-normalised).
    pub identical: usize,
    /// Outputs dropped: same as another completion of the record.
    pub duplicate: usize,
    /// Prompts the completer could not run (with a local model: the prompt fills its context); final.
    pub unparseable: usize,
    /// Records written unchanged: no ground-truth completion to rewrite.
    pub no_ground_truth: usize,
    /// Records written unchanged (`continue` mode): answer under two words, nothing to cut.
    pub too_short: usize,
    /// The first few reasons of failed requests (`record id: reason`), to show the user.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Request failures kept in [`InjectCounts::errors`].
const KEPT_ERRORS: usize = 5;

/// What became of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    Ok(String),
    Empty,
    Identical,
}

/// Cleans one raw output: drops leading whitespace (the released code dropped the first character, a space),
/// cuts at the first stop string, trims, removes a label the model echoed (`Modified description:`), and
/// classifies the result against the ground truth.
pub fn clean_output(raw: &str, stops: &[String], echoed: &[&str], ground_truth: &str) -> Cleaned {
    let text = cut_at_stops(raw.trim_start(), stops).trim();
    let text = echoed.iter().fold(text, |t, label| t.strip_prefix(label).map_or(t, str::trim));
    classify(text, ground_truth)
}

/// Sorts a finished output (already trimmed) into empty, same as the ground truth, or usable.
pub(super) fn classify(text: &str, ground_truth: &str) -> Cleaned {
    if text.is_empty() {
        Cleaned::Empty
    } else if normalize_ws(text) == normalize_ws(ground_truth) {
        Cleaned::Identical
    } else {
        Cleaned::Ok(text.to_string())
    }
}

/// `text` up to the earliest occurrence of any stop string.
pub fn cut_at_stops<'a>(text: &'a str, stops: &[String]) -> &'a str {
    let end = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
    &text[..end.unwrap_or(text.len())]
}

/// One prompt to send for one record and sample.
struct Job {
    record: usize,
    prompt: String,
    /// `continue` mode: the cut ground truth that the output continues.
    prefix: Option<String>,
}

/// Rewrites the ground truth of every pending record of `opts.shard` through `completer` and appends each
/// record, with its new completions, to `output`. Reports the stage `records` (one unit a pending record).
pub fn run_inject<C: Completer + ?Sized>(
    records: Vec<Record>,
    completer: &C,
    opts: &InjectOptions,
    output: &mut ResumableWriter,
    events: &dyn Events,
) -> Result<InjectCounts> {
    let template = resolve_template(opts)?;
    let mut stops = opts.completion.stop.clone();
    stops.extend(opts.mode.default_stops());
    let mut counts = InjectCounts::default();
    let records = process_pending(records, opts.shard, opts.batch_size, output, events, |batch| {
        let mut out: Vec<Option<Record>> = batch.iter().cloned().map(Some).collect();
        for sample in 0..opts.samples.max(1) {
            let mut jobs = build_jobs(batch, sample, template.as_deref(), opts, &mut counts, sample == 0);
            jobs.retain(|j| out[j.record].is_some()); // a failed record is retried next run, not now
            let mut copts = CompletionOptions { stop: stops.clone(), ..opts.completion.clone() };
            copts.seed = opts.completion.seed.map(|s| s.wrapping_add(sample as u64));
            let prompts: Vec<String> = jobs.iter().map(|j| j.prompt.clone()).collect();
            let replies = if prompts.is_empty() { Vec::new() } else { completer.complete(&prompts, &copts)? };
            if replies.len() != jobs.len() {
                bail!("completer returned {} outputs for {} prompts", replies.len(), jobs.len());
            }
            counts.requests += jobs.len();
            for (job, reply) in jobs.into_iter().zip(replies) {
                absorb(&mut out[job.record], job, reply, &stops, opts, &mut counts);
            }
        }
        Ok(out)
    })?;
    Ok(InjectCounts { records, ..counts })
}

/// The template to fill, checked; `None` in `continue` mode.
fn resolve_template(opts: &InjectOptions) -> Result<Option<String>> {
    match (opts.mode, &opts.template) {
        (InjectMode::Continue, Some(_)) => bail!("a prompt template does not apply to `continue` mode"),
        (InjectMode::Continue, None) => Ok(None),
        (mode, Some(t)) => {
            check_template(t).map(|_| Some(t.clone())).map_err(|e| Error::invalid(format!("{mode:?}: {e}")))
        }
        (mode, None) => Ok(mode.default_template().map(str::to_string)),
    }
}

/// Prompts for one sample round of a batch. Records that cannot be used are counted once (`count_skips`).
fn build_jobs(
    batch: &[Record],
    sample: usize,
    template: Option<&str>,
    opts: &InjectOptions,
    counts: &mut InjectCounts,
    count_skips: bool,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (i, record) in batch.iter().enumerate() {
        let Some(gt) = record.ground_truth() else {
            counts.no_ground_truth += usize::from(count_skips);
            continue;
        };
        let job = match template {
            Some(t) => {
                let text = fill(t, &record.prompt, &gt.response);
                Job { record: i, prompt: if opts.vicuna { vicuna_v1(&text) } else { text }, prefix: None }
            }
            None => match cut_prefix(&gt.response, opts.seed, &record.id, sample) {
                Some(p) => Job { record: i, prompt: p.to_string(), prefix: Some(p.to_string()) },
                None => {
                    counts.too_short += usize::from(count_skips);
                    continue;
                }
            },
        };
        jobs.push(job);
    }
    jobs
}

/// Folds one reply into its record: adds the cleaned completion, or marks the record failed (`None`).
fn absorb(
    slot: &mut Option<Record>,
    job: Job,
    reply: Result<String>,
    stops: &[String],
    opts: &InjectOptions,
    counts: &mut InjectCounts,
) {
    let Some(record) = slot.as_mut() else { return };
    let raw = match reply {
        Ok(raw) => raw,
        Err(e @ Error::Http(_)) => {
            counts.request_failed += 1;
            if counts.errors.len() < KEPT_ERRORS {
                counts.errors.push(format!("{}: {e}", record.id));
            }
            *slot = None;
            return;
        }
        Err(_) => {
            counts.unparseable += 1;
            return;
        }
    };
    let gt = record.ground_truth().map(|c| c.response.clone()).unwrap_or_default();
    let cleaned = match &job.prefix {
        // The continuation is glued to the prefix as generated (it usually starts with a space).
        Some(prefix) => classify(format!("{prefix}{}", cut_at_stops(&raw, stops)).trim(), &gt),
        None => clean_output(&raw, stops, opts.mode.echoed_labels(), &gt),
    };
    match keep_negative(record, cleaned, &opts.kind) {
        Kept::Added => counts.added += 1,
        Kept::Empty => counts.empty += 1,
        Kept::Identical => counts.identical += 1,
        Kept::Duplicate => counts.duplicate += 1,
    }
}

/// What became of one candidate negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    Added,
    Empty,
    Identical,
    Duplicate,
}

/// Adds a cleaned output to `record` as a negative of type `kind`, unless it is empty, the ground truth, or the
/// same (whitespace-normalised) as a completion the record already has.
pub(super) fn keep_negative(record: &mut Record, cleaned: Cleaned, kind: &CompletionType) -> Kept {
    match cleaned {
        Cleaned::Empty => Kept::Empty,
        Cleaned::Identical => Kept::Identical,
        Cleaned::Ok(text) if record.completions.iter().any(|c| normalize_ws(&c.response) == normalize_ws(&text)) => {
            Kept::Duplicate
        }
        Cleaned::Ok(text) => {
            record.completions.push(Completion::negative(text, kind.clone()));
            Kept::Added
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops() -> Vec<String> {
        InjectMode::Description.default_stops()
    }

    #[test]
    fn cleaning_rules() {
        let echoed = InjectMode::Description.echoed_labels();
        let c = |raw: &str| clean_output(raw, &stops(), echoed, "A red  bus.");
        assert_eq!(c(" A blue bus with two dogs.</s>junk"), Cleaned::Ok("A blue bus with two dogs.".into()));
        assert_eq!(c(" Modified description: A blue bus.\nDescription: more"), Cleaned::Ok("A blue bus.".into()));
        assert_eq!(c("   </s>"), Cleaned::Empty);
        assert_eq!(c(""), Cleaned::Empty);
        assert_eq!(c(" A red\nbus. "), Cleaned::Identical);
    }

    #[test]
    fn stops_cut_at_earliest() {
        let s = vec!["B".to_string(), "A".to_string(), String::new()];
        assert_eq!(cut_at_stops("xxAyyB", &s), "xx");
        assert_eq!(cut_at_stops("xx", &s), "xx");
    }

    #[test]
    fn template_resolution() {
        let mut o =
            InjectOptions { mode: InjectMode::Continue, template: Some("{answer}".into()), ..Default::default() };
        assert!(resolve_template(&o).is_err());
        o.template = None;
        assert_eq!(resolve_template(&o).unwrap(), None);
        o.mode = InjectMode::Qa;
        o.template = Some("no placeholder".into());
        assert!(resolve_template(&o).is_err());
        o.template = Some("Fix: {answer}".into());
        assert_eq!(resolve_template(&o).unwrap().as_deref(), Some("Fix: {answer}"));
    }
}
