//! The benchmarks of a `suite.toml` as [`Benchmark`]s: each section's files read, with how the model answers it
//! and, for the judged ones, how to open their judge. `bpo eval suite` runs what [`SuiteConfig::benchmark`] gives
//! through [`Benchmark::run`].

use std::path::PathBuf;

use super::benchmark::Benchmark;
use super::captions::{image_files, Captions, Truth};
use super::llava_bench::LlavaBench;
use super::mmhal::MmHal;
use super::mmvet::MmVet;
use super::pope::{load_questions, Pairing, Pope, SHORT_ANSWER};
use super::suite::SuiteConfig;
use crate::{Error, Result};

/// One benchmark of a suite, ready to run.
pub struct Planned {
    /// Its name in `suite.json` and its run folder's.
    pub name: &'static str,
    pub bench: Benchmark,
    /// Most new tokens per answer when the model answers.
    pub max_new_tokens: usize,
    /// The judge's model name and the files its cache may not be, for a judged benchmark.
    pub judge: Option<(Option<String>, Vec<PathBuf>)>,
}

impl SuiteConfig {
    /// Benchmark `name` ([`super::suite::BENCHMARKS`]) with its files read, or `None` when the config lacks it
    /// (or lacks the `[judge]` it needs).
    pub fn benchmark(&self, name: &'static str) -> Result<Option<Planned>> {
        let judged = self.judge.is_some();
        let plan = |bench, max_new_tokens, judge| Planned { name, bench, max_new_tokens, judge };
        Ok(match name {
            "pope" => match &self.pope {
                Some(c) => Some(plan(
                    Benchmark::Pope(Pope {
                        questions: load_questions(&c.questions)?,
                        images: c.images.clone(),
                        suffix: SHORT_ANSWER.into(),
                        // By position: the answers are in question order, and the official split files each number
                        // their questions from 1, so ids repeat across splits.
                        pairing: Pairing::Positional,
                    }),
                    c.max_new_tokens.unwrap_or(128),
                    None,
                )),
                None => None,
            },
            "object-halbench" => match &self.object_halbench {
                Some(c) => {
                    let files = image_files(&c.images, c.limit)?;
                    let prompts: Vec<String> = super::object_halbench_prompts().into_iter().map(String::from).collect();
                    let truth = match (&c.coco, &c.ground_truth) {
                        (Some(dir), _) => Truth::Coco(dir.clone()),
                        (None, Some(path)) => Truth::Jsonl(path.clone()),
                        (None, None) => return Err(Error::invalid("give coco or ground_truth")),
                    };
                    let asks = Captions::describe(&files, &prompts);
                    let bench = Captions { chair: Captions::chair(None)?, truth, question_images: None, asks };
                    Some(plan(Benchmark::Captions(bench), c.max_new_tokens.unwrap_or(512), None))
                }
                None => None,
            },
            "mmvet" => match self.mmvet.as_ref().filter(|_| judged) {
                Some(c) => Some(plan(
                    Benchmark::MmVet(MmVet::load(&c.questions, c.images.as_deref(), c.runs.unwrap_or(5))?),
                    c.max_new_tokens.unwrap_or(1024),
                    Some((c.judge_model.clone(), vec![c.questions.clone()])),
                )),
                None => None,
            },
            "llava-bench" => match self.llava_bench.as_ref().filter(|_| judged) {
                Some(c) => Some(plan(
                    Benchmark::LlavaBench(LlavaBench::load(
                        &c.questions,
                        &c.context,
                        &c.references,
                        c.images.as_deref(),
                    )?),
                    c.max_new_tokens.unwrap_or(1024),
                    Some((c.judge_model.clone(), vec![c.questions.clone(), c.context.clone(), c.references.clone()])),
                )),
                None => None,
            },
            "mmhal" => match self.mmhal.as_ref().filter(|_| judged) {
                Some(c) => Some(plan(
                    Benchmark::MmHal(MmHal::load(&c.questions, c.images.as_deref())?),
                    c.max_new_tokens.unwrap_or(1024),
                    Some((c.judge_model.clone(), vec![c.questions.clone()])),
                )),
                None => None,
            },
            other => return Err(Error::invalid(format!("unknown benchmark {other}"))),
        })
    }
}

#[cfg(feature = "http")]
impl super::suite::JudgeConfig {
    /// The judge's options: `model` instead of `[judge] model` when given, its reply cache in `dir`, which may not
    /// be one of `inputs`.
    pub fn options(
        &self,
        model: Option<&str>,
        dir: &std::path::Path,
        inputs: &[PathBuf],
    ) -> Result<super::judge::JudgeOptions> {
        let (backoff, timeout) = (self.backoff()?, self.timeout()?);
        Ok(super::judge::JudgeOptions {
            url: self.url.clone(),
            model: model.unwrap_or(&self.model).to_string(),
            api_key: crate::http::api_key_from_env(&self.api_key_env)?,
            concurrency: self.concurrency,
            retries: self.retries,
            backoff,
            timeout,
            cache: super::judge::cache_path(dir),
            inputs: inputs.to_vec(),
        })
    }
}
