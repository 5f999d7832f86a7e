//! What every benchmark run shares, whatever the benchmark: where the answers come from ([`Answers`]), what the
//! run may use ([`Context`]: a judge, an output folder, an [`Events`] sink), and the one path from answers to a
//! written run folder ([`run`]). A benchmark implements [`Bench`] in its own file; [`super::Benchmark`] names
//! them all.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::answer::{self, Answering};
use super::judge::{self, Grader};
use super::report::{write_run, Scores};
use super::rows::{load_answers, Answer};
use crate::generate::vqa;
use crate::model::Vlm;
use crate::progress::Progress;
use crate::{jsonl, output, Error, Result};

/// Where a benchmark's answers come from.
pub enum Answers<'a> {
    /// Rows the caller read (an answers file); `from` names them in errors (the file's path).
    Given { rows: Vec<Answer>, from: String },
    /// Rows an earlier run of the same benchmark saved in its folder (`answers.jsonl`), reused.
    Saved(Vec<Answer>),
    /// Answered first by `vlm` through the generation engine ([`answer`]); saved as `answers.jsonl` in the output
    /// folder.
    Model { vlm: &'a Vlm, how: Answering },
}

/// The answers a benchmark scores, with how they came.
pub struct Rows {
    pub rows: Vec<Answer>,
    /// What the answers are called in errors: a file's path, "the saved answers", "the generated answers".
    pub from: String,
    /// Given by the caller (not generated or saved by a run of this benchmark).
    pub given: bool,
}

/// What a benchmark run tells its caller while it works. Every method does nothing by default, so `()` is the
/// silent sink.
pub trait Events {
    /// A stage of `len` steps begins (`None`: of unknown length, e.g. reading annotations); its progress goes to
    /// the returned sink, finished by the run.
    fn stage(&self, _what: &str, _len: Option<u64>) -> Box<dyn Progress + '_> {
        Box::new(())
    }
    /// Judging `len` items begins; its progress comes from the judge's worker threads.
    fn judging(&self, _what: &str, _len: u64) -> Box<dyn Progress + Send + Sync> {
        Box::new(())
    }
    /// A line for the user (a warning, what the judge cost).
    fn say(&self, _line: &str) {}
    /// A benchmark of a suite ([`SuiteConfig::run`](super::suite::SuiteConfig::run)) is scored, its run folder
    /// `dir` written.
    fn finished(&self, _benchmark: &str, _scores: &Scores, _dir: &Path) {}
}

impl Events for () {}

/// What a run may use: the judge (judged benchmarks need one), the output folder (`scores.json`,
/// `details.jsonl`, `answers.jsonl` when a model answered; judged benchmarks need one) and the events sink.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub judge: Option<&'a dyn Grader>,
    pub out: Option<&'a Path>,
    pub events: &'a dyn Events,
}

impl<'a> Context<'a> {
    /// The judge; an error naming `benchmark` when there is none.
    pub fn judge(&self, benchmark: &str) -> Result<&'a dyn Grader> {
        self.judge.ok_or_else(|| Error::invalid(format!("{benchmark} needs a judge")))
    }

    /// The output folder; an error naming `benchmark` when there is none.
    pub fn out(&self, benchmark: &str) -> Result<&'a Path> {
        self.out.ok_or_else(|| Error::invalid(format!("{benchmark} needs an output folder")))
    }
}

/// One benchmark: how a model answers it and how answers are scored. Its report becomes a [`Scores`] variant.
pub trait Bench {
    type Report: Into<Scores>;
    type Detail: Serialize;

    /// Answers the benchmark's prompts with `vlm` (its own prompt format), ticking `tick(n, total)`.
    fn answer(&self, vlm: &Vlm, how: &Answering, tick: &mut dyn FnMut(usize, usize)) -> Result<Vec<Answer>>;

    /// Scores `rows` (grading them with the context's judge where the benchmark is judged).
    fn score(&self, rows: Rows, ctx: &Context) -> Result<(Self::Report, Vec<Self::Detail>)>;

    /// Reads an answers file: LLaVA answer JSONL unless the benchmark has its own format.
    fn read_answers(&self, path: &Path, _events: &dyn Events) -> Result<Vec<Answer>> {
        load_answers(path)
    }
}

/// Runs `bench` on `answers` and writes the run folder (`scores.json`, `details.jsonl`) when the context has one;
/// returns the report and the details. [`super::Benchmark::run`] is this for any benchmark.
pub fn run<B: Bench>(bench: &B, answers: Answers, ctx: &Context) -> Result<(B::Report, Vec<B::Detail>)>
where
    B::Report: Clone,
{
    let rows = match answers {
        Answers::Given { rows, from } => Rows { rows, from, given: true },
        Answers::Saved(rows) => Rows { rows, from: "the saved answers".into(), given: false },
        Answers::Model { vlm, how } => {
            let bar = ctx.events.stage("answering", Some(0));
            let rows = bench.answer(vlm, &how, &mut |n, total| {
                bar.set_length(total as u64);
                bar.inc(n as u64)
            })?;
            bar.finish();
            if let Some(dir) = ctx.out {
                output::create_dir(dir)?;
                jsonl::write(&dir.join(ANSWERS_FILE), &rows)?;
            }
            Rows { rows, from: "the generated answers".into(), given: false }
        }
    };
    let (report, details) = bench.score(rows, ctx)?;
    if let Some(dir) = ctx.out {
        write_run(dir, &report.clone().into(), &details)?;
    }
    Ok((report, details))
}

/// The answers a run saves in its folder when a model answered.
pub const ANSWERS_FILE: &str = "answers.jsonl";

/// Answers an earlier run saved in `dir`, if any.
pub fn saved_answers(dir: &Path) -> Result<Option<Vec<Answer>>> {
    let path = dir.join(ANSWERS_FILE);
    path.is_file().then(|| load_answers(&path)).transpose()
}

/// A question a model answers with the benchmark's own prompt: id, prompt text, image file name.
pub struct ToAnswer {
    pub id: String,
    pub text: String,
    pub image: Option<String>,
}

/// Answers `items` (images relative to `images`) as LLaVA answer rows.
pub fn answer_items(
    vlm: &Vlm,
    how: &Answering,
    items: &[ToAnswer],
    images: Option<&Path>,
    tick: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Answer>> {
    let prompts: Vec<vqa::Prompt> = items
        .iter()
        .map(|q| vqa::Prompt {
            text: q.text.clone(),
            image: q.image.as_deref().map(|i| crate::data::image_path(images, i)),
            origin: format!("question {}", q.id),
            id: q.id.clone(),
        })
        .collect();
    let texts = answer::answer_unique(vlm, &prompts, how, tick)?;
    Ok(items.iter().zip(texts).map(|(q, t)| answer_row(&q.id, &q.text, t, how)).collect())
}

/// The LLaVA answer row of question `id` asked with `prompt`: its answer `text`, the model's id from `how`.
pub fn answer_row(id: &str, prompt: &str, text: String, how: &Answering) -> Answer {
    Answer { model_id: how.model_id.clone(), answer_id: id.to_string(), ..Answer::new(id, prompt, text) }
}

/// Runs `grade` over `items` on the judge's workers, then says what the judge cost.
pub fn judge_all<I: Sync, T: Send>(
    judge: &dyn Grader,
    events: &dyn Events,
    items: &[I],
    what: &str,
    grade: impl Fn(&I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let bar = events.judging(what, items.len() as u64);
    let out = judge::map_concurrent(items, judge.concurrency(), grade, || bar.inc(1));
    bar.finish();
    let out = out?;
    let (sent, cached) = judge.counts();
    events.say(&format!("judge {}: {sent} request(s) sent, {cached} answered from the cache", judge.model()));
    Ok(out)
}

/// Answer texts by question id.
pub fn by_id(answers: Vec<Answer>) -> HashMap<String, String> {
    answers.into_iter().map(|a| (a.question_id, a.text)).collect()
}

/// The answers of `ids` (every one must exist), in order; `what` names the answers in the error.
pub fn require<'a>(
    answers: &'a HashMap<String, String>,
    ids: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<Vec<&'a str>> {
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
        return Err(Error::invalid(format!("{what}: no answer for question(s) {}{more}", shown.join(", "))));
    }
    Ok(out)
}
