//! LLaVA's `model_vqa` files: question rows in, answer rows out.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::data::answers::Answer;
use crate::data::resume::{key_string, ResumableWriter};
use crate::progress::Events;
use crate::{jsonl, Error, Result};

/// A question row: `{question_id, image, text, ...}`; `line` is its 1-based line in the file.
#[derive(Debug, Clone)]
pub struct Question {
    pub question_id: Value,
    pub image: Option<String>,
    pub text: String,
    pub line: usize,
}

#[derive(Deserialize)]
struct RawQuestion {
    question_id: Value,
    #[serde(default)]
    image: Option<String>,
    text: String,
}

/// Reads a question file. A `question_id` that is null, not a string or number, or repeated (as the answers
/// file keys it: `1` and `"1"` are the same id) fails with the file and line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let rows: Vec<(usize, RawQuestion)> = jsonl::read_numbered(path)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut seen = HashMap::new();
    for (line, r) in rows {
        let Some(key) = key_string(&r.question_id) else {
            return Err(Error::parse(
                path,
                Some(line),
                format!("question_id must be a string or a number, not {}", r.question_id),
            ));
        };
        if let Some(first) = seen.insert(key, line) {
            return Err(Error::parse(
                path,
                Some(line),
                format!("question_id {} repeats line {first}; answers are keyed by it", r.question_id),
            ));
        }
        out.push(Question { question_id: r.question_id, image: r.image, text: r.text, line });
    }
    Ok(out)
}

impl Question {
    /// The id the answers file keys this question by (see [`key_string`]).
    pub fn key(&self) -> String {
        key_string(&self.question_id).unwrap_or_default()
    }
}

/// The answer row of `q` (LLaVA's `model_vqa` layout: the question's id as written, `answer_id` = `MODEL-ID`).
pub fn answer_row(q: &Question, text: &str, model_id: &str) -> Answer {
    let id = q.key();
    Answer {
        numeric_id: q.question_id.is_number(),
        answer_id: format!("{model_id}-{id}"),
        model_id: model_id.to_string(),
        ..Answer::new(id, q.text.clone(), text)
    }
}

/// One prompt to answer from a data file: the question text, its image file, where it came from (`file:line`, so
/// a bad image is reported against the line that named it) and its id, which seeds its sampling
/// ([`super::request_seed`] with the run's seed).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub image: Option<std::path::PathBuf>,
    pub origin: String,
    pub id: String,
}

/// Answers `prompts` on one engine (`batch`: rows and cache budget), reporting the stage `answering` (one unit a
/// prompt). Answers are trimmed and returned in order. A prompt that leaves no room for `max_new_tokens` in the model's
/// context is refused, naming its origin, before anything is generated.
pub fn answer_all(
    vlm: &super::Vlm,
    prompts: &[Prompt],
    params: &super::SamplingParams,
    batch: &super::EngineOptions,
    pass: crate::model::Pass,
    events: &dyn Events,
) -> Result<Vec<String>> {
    let mut out = vec![String::new(); prompts.len()];
    events.stage("answering", Some(prompts.len() as u64));
    answer_each(vlm, prompts, params, batch, pass, |a| {
        events.advance(1);
        out[a.index] = a.text;
        Ok(())
    })?;
    events.end_stage();
    Ok(out)
}

/// Refuses, naming its origin, the first prompt that leaves no room for `params.max_new_tokens` in the model's
/// context.
pub fn check_fit(vlm: &super::Vlm, prompts: &[Prompt], params: &super::SamplingParams) -> Result<()> {
    let context = vlm.model.llm.cfg.max_position_embeddings;
    prompts.iter().try_for_each(|p| {
        let ids = vlm.prompt_ids(&p.text, p.image.is_some()).map_err(|e| match e {
            Error::Parse { .. } => e,
            e => Error::invalid(format!("{}: {e}", p.origin)),
        })?;
        super::fits_context(ids.len(), params.max_new_tokens, context).map_err(|e| match e {
            Error::Range(_) => e,
            e => Error::invalid(format!("{}: {e}", p.origin)),
        })
    })
}

/// A finished answer of [`answer_each`].
pub struct Answered {
    /// The prompt's index in the slice given.
    pub index: usize,
    /// The answer, trimmed.
    pub text: String,
}

/// Like [`answer_all`], but hands each answer to `done` as soon as it is finished (in the order they finish), so a
/// caller can write it at once; an error from `done` stops the run. Images are read when
/// their prompt joins the batch, so memory holds only the running prompts' images.
pub fn answer_each(
    vlm: &super::Vlm,
    prompts: &[Prompt],
    params: &super::SamplingParams,
    batch: &super::EngineOptions,
    pass: crate::model::Pass,
    mut done: impl FnMut(Answered) -> Result<()>,
) -> Result<()> {
    // Every prompt is checked against the context before anything is generated, and tokenised again when it joins
    // the batch: nothing per prompt stays in memory but the prompt itself.
    check_fit(vlm, prompts, params)?;
    let requests = prompts.iter().map(|p| {
        let ids = vlm.prompt_ids(&p.text, p.image.is_some())?;
        let image = match &p.image {
            Some(path) => Some(vlm.load_image(path).map_err(|e| Error::invalid(format!("{}: {e}", p.origin)))?),
            None => None,
        };
        let seed = super::request_seed(params.seed, &p.id);
        Ok(super::Request { ids, image, params: params.clone(), seed, contrast: None })
    });
    let mut engine = super::Engine::new(&vlm.model, &vlm.tok, batch.clone(), pass)?;
    engine.run_each(requests, |f| done(Answered { index: f.id, text: f.completion.text.trim().to_string() }))
}

/// Refuses to resume an answers file that holds answers of another model: its rows would silently stand for
/// this model's. `model_id` is what [`answer_row`] writes. Lines that are not JSON are left to
/// [`ResumableWriter`], which cuts a torn last line and refuses a bad one before it.
pub fn check_same_model(answers: &Path, model_id: &str) -> Result<()> {
    let text = jsonl::read_text(answers)?;
    let rows = text.lines().enumerate().filter_map(|(i, l)| serde_json::from_str::<Value>(l).ok().map(|v| (i + 1, v)));
    match rows.into_iter().find(|(_, r)| r.get("model_id").and_then(Value::as_str) != Some(model_id)) {
        Some((line, r)) => Err(Error::parse(
            answers,
            Some(line),
            format!(
                "an answer of model {}, not {model_id:?}: delete the file or give another --answers to start over",
                r.get("model_id").unwrap_or(&Value::Null)
            ),
        )),
        None => Ok(()),
    }
}

/// Counts of one [`answer_into`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerCounts {
    /// Questions in the question file.
    pub questions: usize,
    /// Questions already answered in the output (skipped).
    pub already_done: usize,
    /// Answers written by this run.
    pub written: usize,
    /// Rows of the output whose question is not in the question file (kept as they are).
    pub other: usize,
}

/// Answers the questions that `out` does not hold yet and appends each answer as soon as it is finished, so a run
/// killed at any point and started again continues where it stopped, losing only the answers in progress and
/// repeating nothing (the writer drops a torn last line). `prompt` makes the prompt of a question; its sampling is
/// seeded by the question's id. Reports the stage `answering` (one unit a question, the ones already answered
/// done at its start).
#[allow(clippy::too_many_arguments)]
pub fn answer_into(
    vlm: &super::Vlm,
    questions: &[Question],
    prompt: impl Fn(&Question) -> Prompt,
    params: &super::SamplingParams,
    batch: &super::EngineOptions,
    pass: crate::model::Pass,
    model_id: &str,
    out: &mut ResumableWriter,
    events: &dyn Events,
) -> Result<AnswerCounts> {
    let pending: Vec<&Question> = questions.iter().filter(|q| !out.is_done(&q.key())).collect();
    let already_done = questions.len() - pending.len();
    let counts = AnswerCounts {
        questions: questions.len(),
        already_done,
        written: pending.len(),
        other: out.done_count() - already_done,
    };
    let prompts: Vec<Prompt> = pending.iter().map(|q| Prompt { id: q.key(), ..prompt(q) }).collect();
    events.stage("answering", Some(questions.len() as u64));
    events.advance(already_done as u64);
    answer_each(vlm, &prompts, params, batch, pass, |a| {
        events.advance(1);
        out.append(&answer_row(pending[a.index], &a.text, model_id))
    })?;
    events.end_stage();
    Ok(counts)
}
