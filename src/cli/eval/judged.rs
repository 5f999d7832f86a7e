//! `bpo eval mmvet / llava-bench / mmhal`: the judged benchmarks. Answers come from a file or from a model
//! (generated with the benchmark's own prompt, greedy, up to 1024 new tokens, as LLaVA's `model_vqa` and
//! MMHal-Bench's `model_vqa_mmhal` do); the judge grades them through [`bpo::eval::judge`] and the run folder
//! gets `scores.json`, `details.jsonl` (raw judge replies beside parsed scores), `answers.jsonl` when a model
//! answered, and the judge's reply cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args};

use bpo::eval::judge::{self, Judge, JudgeOptions};
use bpo::eval::report::Scores;
use bpo::eval::{llava_bench, mmhal, mmvet, Answer};
use bpo::generate::{vqa, SamplingParams};

use bpo::model::Vlm;

use super::{answer_with, finish, save_answers};
use crate::cli::{progress, ModelArgs};

/// Where the judge is and how to talk to it.
#[derive(Args, Clone, Debug)]
pub struct JudgeArgs {
    /// OpenAI-compatible chat server: its root (http://127.0.0.1:8000), `.../v1`, or the full
    /// `/v1/chat/completions` URL. Plain http only.
    #[arg(long, value_name = "URL")]
    pub judge_url: String,
    /// Model name sent with every request. The official judges: gpt-4-0613 (MM-Vet), gpt-4-0314 (LLaVA-Bench,
    /// MMHal-Bench).
    #[arg(long, value_name = "NAME")]
    pub judge_model: String,
    /// Environment variable holding the API key, sent as a Bearer token and never written anywhere. Unset or
    /// empty: no key is sent; not UTF-8, or holding a line break: refused, naming the variable.
    #[arg(long, value_name = "VAR", default_value = "OPENAI_API_KEY")]
    pub judge_key_env: String,
    /// Judge requests in flight at once, at least 1.
    #[arg(long, default_value_t = 4, value_parser = crate::cli::range::at_least_one)]
    pub judge_concurrency: usize,
    /// Extra attempts after a connection error, timeout, HTTP 429 or 5xx, or a reply that is not chat JSON with a
    /// message (HTML, malformed, no `choices`, `null`, over 4 MiB).
    #[arg(long, default_value_t = 5)]
    pub judge_retries: u32,
    /// Seconds to wait before the first retry, in [0, 30], doubled for each further one (at most 30). A 429 or
    /// 503 reply that asks for a longer wait (Retry-After) gets it, up to 120 s.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = crate::cli::range::backoff)]
    pub judge_backoff: Duration,
    /// Total seconds allowed for one judge request attempt, in [1, 86400]: connecting (at most 10 s), sending and
    /// reading the whole reply.
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = crate::cli::range::timeout)]
    pub judge_timeout: Duration,
    /// Reply cache, shared by runs that should not ask twice (default: OUT/judge-cache.jsonl). Only a judge cache
    /// bpo wrote is appended to: any other file (one of the run's inputs, another JSON file) is refused unchanged.
    #[arg(long, value_name = "FILE")]
    pub judge_cache: Option<PathBuf>,
}

impl JudgeArgs {
    /// Opens the judge whose cache defaults to `out/judge-cache.jsonl` and may not be one of `inputs`.
    pub fn open(&self, out: &Path, inputs: &[&Path]) -> anyhow::Result<Judge> {
        let opts = JudgeOptions {
            url: self.judge_url.clone(),
            model: self.judge_model.clone(),
            api_key: bpo::http::api_key_from_env(&self.judge_key_env)?,
            concurrency: self.judge_concurrency,
            retries: self.judge_retries,
            backoff: self.judge_backoff,
            timeout: self.judge_timeout,
            cache: self.judge_cache.clone().unwrap_or_else(|| judge::cache_path(out)),
            inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
        };
        let (judge, note) = Judge::open(&opts).context("judge")?;
        if let Some(note) = note {
            errln!("warning: {note}");
        }
        judge::check_reachable(&self.judge_url, Duration::from_secs(10))?;
        Ok(judge)
    }
}

/// Generation settings when `--model` answers a judged benchmark.
#[derive(Args, Clone, Debug)]
pub struct JudgedGenArgs {
    /// Folder the benchmark's image file names are relative to.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    #[command(flatten)]
    pub batch: crate::cli::generate::BatchArgs,
    /// Most new tokens per answer, at least 1 (greedy; LLaVA's model_vqa allows 1024).
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::range::at_least_one)]
    pub max_new_tokens: usize,
}

impl JudgedGenArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams { max_new_tokens: self.max_new_tokens, ..Default::default() }
    }
}

/// What every judged command shares: a model that answers first (instead of an answers file; the benchmark's
/// own prompt, greedy), how it generates, the judge, and the run folder.
#[derive(Args)]
pub struct JudgedRun {
    #[command(flatten)]
    model: Option<ModelArgs>,
    #[command(flatten)]
    gen: JudgedGenArgs,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Run folder: scores.json, details.jsonl, judge-cache.jsonl (locked while a run uses it), and the answers
    /// when a model answered.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["answers", "model"])))]
pub struct MmVetArgs {
    /// mm-vet.json of the MM-Vet release: {"v1_0": {"imagename", "capability", "question", "answer"}, ...}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// Answers: the official results JSON ({"v1_0": "answer", ...}) or LLaVA answer JSONL (question_id "v1_0"
    /// or 0).
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    /// Gradings per answer, at least 1, averaged (the MM-Vet paper uses 5; its script's default is 1).
    #[arg(long, default_value_t = 5, value_parser = crate::cli::range::at_least_one)]
    runs: usize,
    #[command(flatten)]
    run: JudgedRun,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["answers", "model"])))]
pub struct LlavaBenchArgs {
    /// questions.jsonl of llava-bench-in-the-wild: {"question_id", "image", "text", "category"}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// context.jsonl: {"image", "caption"} (the judge's view of each image).
    #[arg(long, value_name = "FILE")]
    context: PathBuf,
    /// The reference answers the model is compared with: answers_gpt4.jsonl.
    #[arg(long, value_name = "FILE")]
    references: PathBuf,
    /// The model's answers (LLaVA answer JSONL, joined by question_id).
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    #[command(flatten)]
    run: JudgedRun,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["responses", "answers", "model"])))]
pub struct MmHalArgs {
    /// An official response file: the records of response_template.json with "model_answer" filled in; judged as
    /// they are.
    #[arg(long, value_name = "FILE")]
    responses: Option<PathBuf>,
    /// response_template.json of MMHal-Bench (with --answers or --model; a record's image is its image_path, else
    /// the file name at the end of its image_src, under --images).
    #[arg(long, value_name = "FILE")]
    questions: Option<PathBuf>,
    /// Answers as LLaVA answer JSONL whose question_id is the record's 0-based position.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    #[command(flatten)]
    run: JudgedRun,
}

/// A question to answer with the model: id, prompt text, image file name.
pub struct ToAnswer {
    pub id: String,
    pub text: String,
    pub image: Option<String>,
}

/// Answers `items` with the model and saves them as `answers.jsonl` in `out`.
pub fn generate(
    vlm: &Vlm,
    model: &ModelArgs,
    gen: &JudgedGenArgs,
    items: &[ToAnswer],
    out: &Path,
) -> anyhow::Result<Vec<Answer>> {
    let prompts: Vec<vqa::Prompt> = items
        .iter()
        .map(|q| vqa::Prompt {
            text: q.text.clone(),
            image: q.image.as_deref().map(|i| bpo::data::image_path(gen.images.as_deref(), i)),
            origin: format!("question {}", q.id),
            id: q.id.clone(),
        })
        .collect();
    let texts = answer_with(vlm, model, &prompts, &gen.params(), &gen.batch.engine())?;
    let answers: Vec<Answer> = items
        .iter()
        .zip(texts)
        .map(|(q, t)| Answer {
            model_id: model.model_id(),
            answer_id: q.id.clone(),
            ..Answer::new(q.id.clone(), q.text.clone(), t)
        })
        .collect();
    save_answers(Some(out), &answers)?;
    Ok(answers)
}

/// Runs `grade` over `items` on the judge's workers with a progress bar, then prints what the judge cost.
pub fn judge_all<I: Sync, T: Send>(
    judge: &Judge,
    items: &[I],
    what: &str,
    grade: impl Fn(&I) -> bpo::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let bar = progress(items.len(), what);
    let out = judge::map_concurrent(items, judge.concurrency(), grade, || bar.inc(1));
    bar.finish_and_clear();
    let out = out?;
    let (sent, cached) = judge.counts();
    errln!("judge {}: {sent} request(s) sent, {cached} answered from the cache", judge.model());
    Ok(out)
}

/// The answers of `ids` (every one must exist), by id.
pub fn require<'a>(
    answers: &'a HashMap<String, String>,
    ids: impl Iterator<Item = &'a str>,
    what: &str,
) -> anyhow::Result<Vec<&'a str>> {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for id in ids {
        match answers.get(id) {
            Some(a) => out.push(a.as_str()),
            None => missing.push(id.to_string()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        anyhow::bail!("{what}: no answer for question(s) {}{more}", shown.join(", "));
    }
    Ok(out)
}

pub fn by_id(answers: Vec<Answer>) -> HashMap<String, String> {
    answers.into_iter().map(|a| (a.question_id, a.text)).collect()
}

/// The MM-Vet questions as prompts: the question text and its image.
pub fn mmvet_items(questions: &[mmvet::Question]) -> Vec<ToAnswer> {
    questions
        .iter()
        .map(|q| ToAnswer { id: q.id.clone(), text: q.question.clone(), image: Some(q.image.clone()) })
        .collect()
}

impl JudgedRun {
    /// Checks, makes and locks the run folder (none of `inputs`, the images or the model), then opens the judge.
    fn start(&self, inputs: &[&Path]) -> anyhow::Result<(bpo::output::Lock, Judge)> {
        let mut all = inputs.to_vec();
        all.extend(self.gen.images.as_deref());
        all.extend(self.model.as_ref().map(|m| m.model.as_path()));
        let lock = super::lock_run(&self.out, &all)?;
        Ok((lock, self.judge.open(&self.out, inputs)?))
    }
}

pub fn run_mmvet(a: MmVetArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> = std::iter::once(a.questions.as_path()).chain(a.answers.as_deref()).collect();
    let (_lock, judge) = a.run.start(&inputs)?;
    let questions = mmvet::load_questions(&a.questions)?;
    let (answers, source) = match (&a.answers, &a.run.model) {
        (Some(path), _) => {
            let (answers, orphans) = mmvet::load_answers(path, &questions)?;
            if !orphans.is_empty() {
                errln!(
                    "warning: {}: {} answer(s) for ids not in {}",
                    path.display(),
                    orphans.len(),
                    a.questions.display()
                );
            }
            (answers, path.display().to_string())
        }
        (None, Some(model)) => (
            by_id(generate(&model.load()?, model, &a.run.gen, &mmvet_items(&questions), &a.run.out)?),
            "the generated answers".to_string(),
        ),
        (None, None) => anyhow::bail!("give --answers FILE or --model DIR"),
    };
    let predictions = require(&answers, questions.iter().map(|q| q.id.as_str()), &source)?;
    grade_mmvet(&judge, &questions, &predictions, a.runs, &a.run.out)
}

/// Grades every prediction `runs` times and writes the run folder.
pub fn grade_mmvet(
    judge: &Judge,
    questions: &[mmvet::Question],
    predictions: &[&str],
    runs: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let items: Vec<(usize, usize)> = (0..runs).flat_map(|r| (0..questions.len()).map(move |i| (i, r))).collect();
    let grades = judge_all(judge, &items, "grading", |&(i, r)| mmvet::grade(judge, &questions[i], predictions[i], r))?;
    let mut per_question: Vec<Vec<mmvet::Grade>> = vec![Vec::new(); questions.len()];
    for (&(i, _), g) in items.iter().zip(grades) {
        per_question[i].push(g);
    }
    let scores: Vec<Vec<f64>> = per_question.iter().map(|g| g.iter().map(|g| g.score).collect()).collect();
    let mut report = mmvet::score(questions, &scores, runs, judge.model())?;
    report.gave_up = per_question.iter().flatten().filter(|g| g.gave_up).count();
    if report.gave_up > 0 {
        report.warnings.push(format!(
            "{} grading(s) got no score in six replies and count 0.0, as in the official grader",
            report.gave_up
        ));
    }
    let details: Vec<mmvet::Detail> = questions
        .iter()
        .zip(per_question)
        .zip(predictions)
        .map(|((q, grades), p)| mmvet::Detail {
            id: q.id.clone(),
            capability: q.capabilities.clone(),
            question: q.question.clone(),
            answer: q.answer.clone(),
            prediction: p.to_string(),
            score: grades.iter().map(|g| g.score).collect(),
            grades,
        })
        .collect();
    finish(&Scores::MmVet(report), &details, Some(out))
}

/// The LLaVA-Bench questions as prompts.
pub fn llava_items(questions: &[llava_bench::Question]) -> Vec<ToAnswer> {
    questions
        .iter()
        .map(|q| ToAnswer { id: q.question_id.clone(), text: q.text.clone(), image: Some(q.image.clone()) })
        .collect()
}

pub fn run_llava_bench(a: LlavaBenchArgs) -> anyhow::Result<()> {
    let mut inputs = vec![a.questions.as_path(), &a.context, &a.references];
    inputs.extend(a.answers.as_deref());
    let (_lock, judge) = a.run.start(&inputs)?;
    let files = LlavaFiles::load(&a.questions, &a.context, &a.references)?;
    let (answers, source) = match (&a.answers, &a.run.model) {
        (Some(path), _) => (by_id(bpo::eval::load_answers(path)?), path.display().to_string()),
        (None, Some(model)) => (
            by_id(generate(&model.load()?, model, &a.run.gen, &llava_items(&files.questions), &a.run.out)?),
            "the generated answers".to_string(),
        ),
        (None, None) => anyhow::bail!("give --answers FILE or --model DIR"),
    };
    files.review(&judge, &answers, &source, &a.run.out)
}

/// The three LLaVA-Bench files.
pub struct LlavaFiles {
    pub questions: Vec<llava_bench::Question>,
    context: HashMap<String, String>,
    context_path: PathBuf,
    references: HashMap<String, String>,
    references_path: PathBuf,
}

impl LlavaFiles {
    pub fn load(questions: &Path, context: &Path, references: &Path) -> anyhow::Result<LlavaFiles> {
        Ok(LlavaFiles {
            questions: llava_bench::load_questions(questions)?,
            context: llava_bench::load_context(context)?,
            context_path: context.to_path_buf(),
            references: by_id(bpo::eval::load_answers(references)?),
            references_path: references.to_path_buf(),
        })
    }

    /// Reviews every answer (by question_id; `source` names the answers in errors) and writes the run folder.
    pub fn review(
        &self,
        judge: &Judge,
        answers: &HashMap<String, String>,
        source: &str,
        out: &Path,
    ) -> anyhow::Result<()> {
        let questions = &self.questions;
        let ids = || questions.iter().map(|q| q.question_id.as_str());
        let refs = require(&self.references, ids(), &self.references_path.display().to_string())?;
        let model_answers = require(answers, ids(), source)?;
        let mut captions = Vec::with_capacity(questions.len());
        for q in questions {
            let c = self.context.get(&q.image).with_context(|| {
                format!(
                    "{}: no caption for image {:?} of question {}",
                    self.context_path.display(),
                    q.image,
                    q.question_id
                )
            })?;
            captions.push(c.as_str());
        }
        let items: Vec<usize> = (0..questions.len()).collect();
        let details = judge_all(judge, &items, "reviewing", |&i| {
            llava_bench::review(judge, &questions[i], captions[i], refs[i], model_answers[i])
        })?;
        let report = llava_bench::summarize(&details, judge.model());
        finish(&Scores::LlavaBench(report), &details, Some(out))
    }
}

/// The MMHal-Bench records as prompts (ids are positions; the question alone, as `--test-prompt ''`).
pub fn mmhal_items(records: &[mmhal::Record]) -> Vec<ToAnswer> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| ToAnswer { id: i.to_string(), text: r.question.clone(), image: r.image_file() })
        .collect()
}

/// Generated MMHal answers in record order, also written as the official response file `responses.json`.
pub fn mmhal_responses(records: &[mmhal::Record], answers: Vec<Answer>, out: &Path) -> anyhow::Result<Vec<String>> {
    let answers = by_id(answers);
    let ids: Vec<String> = (0..records.len()).map(|i| i.to_string()).collect();
    let texts: Vec<String> = require(&answers, ids.iter().map(String::as_str), "the generated answers")?
        .into_iter()
        .map(String::from)
        .collect();
    let responses: Vec<serde_json::Value> = records.iter().zip(&texts).map(|(r, t)| r.with_answer(t)).collect();
    bpo::output::write_json(&out.join("responses.json"), &serde_json::Value::Array(responses))?;
    Ok(texts)
}

pub fn run_mmhal(a: MmHalArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> =
        [&a.responses, &a.questions, &a.answers].into_iter().flatten().map(|p| p.as_path()).collect();
    let (_lock, judge) = a.run.start(&inputs)?;
    let (records, answers): (Vec<mmhal::Record>, Vec<String>) = match (&a.responses, &a.questions) {
        (Some(path), None) => {
            let records = mmhal::load_records(path)?;
            let missing: Vec<String> = records
                .iter()
                .enumerate()
                .filter(|(_, r)| r.model_answer.is_none())
                .map(|(i, _)| i.to_string())
                .collect();
            anyhow::ensure!(
                missing.is_empty(),
                "{}: record(s) {} have no model_answer",
                path.display(),
                missing.join(", ")
            );
            let answers = records.iter().map(|r| r.model_answer.clone().unwrap_or_default()).collect();
            (records, answers)
        }
        (None, Some(questions)) => {
            let records = mmhal::load_records(questions)?;
            let answers = match (&a.answers, &a.run.model) {
                (Some(path), _) => {
                    let answers = by_id(bpo::eval::load_answers(path)?);
                    let ids: Vec<String> = (0..records.len()).map(|i| i.to_string()).collect();
                    require(&answers, ids.iter().map(String::as_str), &path.display().to_string())?
                        .into_iter()
                        .map(String::from)
                        .collect()
                }
                (None, Some(model)) => mmhal_responses(
                    &records,
                    generate(&model.load()?, model, &a.run.gen, &mmhal_items(&records), &a.run.out)?,
                    &a.run.out,
                )?,
                (None, None) => anyhow::bail!("give --answers FILE or --model DIR with --questions"),
            };
            (records, answers)
        }
        (Some(_), Some(_)) => anyhow::bail!("give either --responses FILE or --questions FILE, not both"),
        (None, None) => anyhow::bail!("--answers and --model need --questions response_template.json"),
    };
    judge_mmhal(&judge, &records, &answers, &a.run.out)
}

/// Judges every answer and writes the run folder.
pub fn judge_mmhal(judge: &Judge, records: &[mmhal::Record], answers: &[String], out: &Path) -> anyhow::Result<()> {
    let items: Vec<usize> = (0..records.len()).collect();
    let details = judge_all(judge, &items, "judging", |&i| mmhal::judge(judge, i, &records[i], &answers[i]))?;
    let report = mmhal::summarize(&details, judge.model());
    finish(&Scores::MmHal(report), &details, Some(out))
}
