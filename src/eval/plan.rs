//! The benchmarks of a `suite.toml` as [`Benchmark`]s: each section's files read, with how the model answers it
//! and, for the judged ones, how to open their judge; [`SuiteConfig::run`] runs them all through
//! [`Benchmark::run`] into a suite folder (`bpo eval suite`, `bpo loop`).

use std::path::{Path, PathBuf};

use super::answer::Answering;
use super::benchmark::Benchmark;
use super::captions::{image_files, Captions, Truth};
use super::judge::Grader;
use super::llava_bench::LlavaBench;
use super::mmhal::MmHal;
use super::mmvet::MmVet;
use super::pope::{load_questions, Pairing, Pope, SHORT_ANSWER};
use super::report::Scores;
use super::run::{saved_answers, Answers, Context, ANSWERS_FILE};
use super::suite::{SuiteConfig, SuiteInfo, BENCHMARKS, SUITE_FILE};
use crate::generate::{EngineOptions, SamplingParams};
use crate::model::{Pass, Vlm};
use crate::progress::Events;
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

/// The model a suite evaluates, loaded on first use: a suite whose answers are all saved never loads it.
pub struct LazyModel<'a> {
    load: &'a dyn Fn() -> Result<Vlm>,
    vlm: Option<Vlm>,
}

impl<'a> LazyModel<'a> {
    pub fn new(load: &'a dyn Fn() -> Result<Vlm>) -> Self {
        LazyModel { load, vlm: None }
    }

    fn get(&mut self) -> Result<&Vlm> {
        if self.vlm.is_none() {
            self.vlm = Some((self.load)()?);
        }
        self.vlm.as_ref().ok_or_else(|| Error::invalid("model not loaded"))
    }
}

impl SuiteConfig {
    /// Every configured benchmark with its files read, in run order ([`BENCHMARKS`]); an error names the section.
    pub fn prepare(&self) -> Result<Vec<Planned>> {
        let mut prepared = Vec::new();
        for name in BENCHMARKS {
            let at = |e: Error| Error::invalid(format!("[{}]: {e}", name.replace('-', "_")));
            prepared.extend(self.benchmark(name).map_err(at)?);
        }
        Ok(prepared)
    }

    /// Runs the `prepared` benchmarks ([`SuiteConfig::prepare`]) into their run folders under `out` (each locked
    /// while it runs), recording `info` with the benchmarks done in `out/suite.json` after each. Answers saved by an
    /// earlier run in a benchmark's folder are reused and the judge's cache answers what it was asked before, so a
    /// killed suite resumes. `model_id` is what the answer rows record; `scored` sees each benchmark's scores and
    /// run folder as soon as it is done.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        prepared: &[Planned],
        model: &mut LazyModel,
        model_id: &str,
        mut info: SuiteInfo,
        out: &Path,
        events: &dyn Events,
        scored: &mut dyn FnMut(&str, &Scores, &Path),
    ) -> Result<()> {
        let batch = EngineOptions::rows(self.batch_size.unwrap_or(8), None);
        for plan in prepared {
            let dir = out.join(plan.name);
            crate::output::check_dir(&dir, &[])?;
            crate::output::create_dir(&dir)?;
            let _lock = crate::output::Lock::dir(&dir)?;
            let judge = self.open_judge(plan, &dir, events)?;
            let answers = match saved_answers(&dir)? {
                Some(rows) => {
                    events.message(&format!("reusing {}", dir.join(ANSWERS_FILE).display()));
                    Answers::Saved(rows)
                }
                None => {
                    let params = SamplingParams { max_new_tokens: plan.max_new_tokens, ..Default::default() };
                    let how =
                        Answering { params, batch: batch.clone(), pass: Pass::INFER, model_id: model_id.to_string() };
                    Answers::Model { vlm: model.get()?, how }
                }
            };
            let scores = plan.bench.run(answers, &Context { judge: judge.as_deref(), out: Some(&dir), events })?;
            scored(plan.name, &scores, &dir);
            if !info.benchmarks.iter().any(|b| b == plan.name) {
                info.benchmarks.push(plan.name.to_string());
            }
            crate::output::write_json(&out.join(SUITE_FILE), &info)?;
        }
        Ok(())
    }

    /// The judge of a judged benchmark (its cache in `dir`), checked to answer; `None` for the others.
    #[cfg(feature = "http")]
    fn open_judge(&self, plan: &Planned, dir: &Path, events: &dyn Events) -> Result<Option<Box<dyn Grader>>> {
        let (Some((model, inputs)), Some(j)) = (&plan.judge, &self.judge) else { return Ok(None) };
        let opts = j.options(model.as_deref(), dir, inputs)?;
        let (judge, note) = super::judge::Judge::open(&opts)?;
        if let Some(note) = note {
            events.message(&format!("warning: {note}"));
        }
        super::judge::check_reachable(&opts.url, std::time::Duration::from_secs(10))?;
        Ok(Some(Box::new(judge)))
    }

    #[cfg(not(feature = "http"))]
    fn open_judge(&self, plan: &Planned, _dir: &Path, _events: &dyn Events) -> Result<Option<Box<dyn Grader>>> {
        match plan.judge {
            Some(_) => Err(Error::invalid(format!("{} needs a judge: build bpo with the `http` feature", plan.name))),
            None => Ok(None),
        }
    }
}
