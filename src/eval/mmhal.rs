//! MMHal-Bench (Sun et al., "Aligning Large Multimodal Models with Factually Augmented RLHF", 2023): 96
//! questions on OpenImages pictures in eight question types; an LLM judge rates each answer 0-6 against the
//! image's object labels and a human answer, ratings below 3 meaning "with hallucination".
//!
//! The protocol is the benchmark's `eval_gpt4.py` (released with the data, Hugging Face dataset
//! `Shengcao1006/MMHal-Bench`, Apache-2.0, temperature 0 since its commit f5f49a9), read here from the copy in
//! llava-rlhf/LLaVA-RLHF `Eval/eval_gpt_mmhal.py` at commit 830a083fd83e:
//! - the prompt [`TEMPLATE`] word for word, its four `{}` filled with the image contents joined by `", "`,
//!   the question, the human answer and the model's answer; one user message, temperature 0, no `max_tokens`;
//! - the rating: the one `s` in 0..=6 for which `"rating: {s}"` occurs in the lower-cased reply; none or
//!   several give 0 (with a warning, as the script prints one);
//! - average score and hallucination rate (share of ratings below 3), printed with two decimals, and the
//!   average per question type rounded to two decimals.
//!
//! Difference: the script takes the question type of answer `i` to be `i % 8` (the 96 records in their
//! original order); here it is each record's `question_type`, which is the same for the released file.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::answer::Answering;
use super::judge::{Ask, ChatRequest, Message};
use super::pynum::py_round;
use super::run::{answer_items, by_id, judge_all, require, Bench, Context, Rows, ToAnswer};
use super::Answer;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{Error, Result};

/// The judge prompt of llava-rlhf/LLaVA-RLHF `Eval/eval_gpt_mmhal.py` (commit 830a083fd83e, `template =
/// '''...'''`), verbatim (`data/judge/mmhal-template.txt`); each `{}` is filled in order by [`judge_prompt`].
pub const TEMPLATE: &str = include_str!("../../data/judge/mmhal-template.txt");

/// One record of `response_template.json` (or of a response file: the same records with `model_answer`).
/// Fields other than these are kept as they are when a response file is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub question_type: String,
    pub image_content: Vec<String>,
    pub question: String,
    pub gt_answer: String,
    pub model_answer: Option<String>,
    /// The whole record as read.
    pub raw: Map<String, Value>,
}

impl Record {
    /// The image file name: `image_path` when the record has one, else the last part of `image_src` (a URL).
    pub fn image_file(&self) -> Option<String> {
        let field = |k: &str| self.raw.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        match field("image_path") {
            Some(p) => Some(p.to_string()),
            None => field("image_src").and_then(|s| s.rsplit('/').next()).map(String::from),
        }
    }

    /// The record with `model_answer` set, as a response file holds it.
    pub fn with_answer(&self, answer: &str) -> Value {
        let mut raw = self.raw.clone();
        raw.insert("model_answer".into(), Value::String(answer.to_string()));
        Value::Object(raw)
    }
}

/// Reads a JSON array of MMHal-Bench records (the template, or a response file).
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let text = crate::jsonl::read_text(path)?;
    let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| Error::parse(path, None, e))?;
    if rows.is_empty() {
        return Err(Error::parse(path, None, "no records"));
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| record(row).map_err(|msg| Error::parse(path, None, format!("record {i}: {msg}"))))
        .collect()
}

fn record(row: Value) -> std::result::Result<Record, String> {
    let Value::Object(raw) = row else { return Err("not a JSON object".into()) };
    let text =
        |k: &str| raw.get(k).and_then(Value::as_str).map(String::from).ok_or_else(|| format!("no \"{k}\" string"));
    let image_content = match raw.get("image_content") {
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().map(String::from)).collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or("no \"image_content\" list of strings")?;
    let model_answer = match raw.get("model_answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("\"model_answer\" is not a string".into()),
    };
    Ok(Record {
        question_type: text("question_type")?,
        image_content,
        question: text("question")?,
        gt_answer: text("gt_answer")?,
        model_answer,
        raw,
    })
}

/// `template.format(", ".join(image_content), question, gt_answer, model_answer)`.
pub fn judge_prompt(r: &Record, answer: &str) -> String {
    let content = r.image_content.join(", ");
    let values = [content.as_str(), r.question.as_str(), r.gt_answer.as_str(), answer];
    let mut out = String::with_capacity(TEMPLATE.len() + values.iter().map(|v| v.len()).sum::<usize>());
    for (i, piece) in TEMPLATE.split("{}").enumerate() {
        if i > 0 {
            out.push_str(values[i - 1]);
        }
        out.push_str(piece);
    }
    out
}

/// The rating of a reply, or `None` where the script finds no rating or several (and uses 0).
pub fn parse_rating(reply: &str) -> Option<u8> {
    let lower = reply.to_lowercase();
    let found: Vec<u8> = (0..7).filter(|s| lower.contains(&format!("rating: {s}"))).collect();
    match found[..] {
        [s] => Some(s),
        _ => None,
    }
}

/// One judged answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detail {
    pub index: usize,
    pub question_type: String,
    pub question: String,
    pub gt_answer: String,
    pub model_answer: String,
    /// The judge's raw reply.
    pub content: String,
    /// The rating used (0 when none or several were found).
    pub rating: u8,
    /// False when the reply held no rating or several.
    pub parsed: bool,
}

/// Judges answer `index`.
pub fn judge(judge: &dyn Ask, index: usize, r: &Record, answer: &str) -> Result<Detail> {
    let request =
        ChatRequest { messages: vec![Message::user(judge_prompt(r, answer))], temperature: 0.0, max_tokens: None };
    let reply = judge.ask(&request, 0)?;
    let rating = parse_rating(&reply.content);
    Ok(Detail {
        index,
        question_type: r.question_type.clone(),
        question: r.question.clone(),
        gt_answer: r.gt_answer.clone(),
        model_answer: answer.to_string(),
        content: reply.content,
        rating: rating.unwrap_or(0),
        parsed: rating.is_some(),
    })
}

/// The average of one question type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeScore {
    pub question_type: String,
    pub questions: usize,
    /// Average rating, rounded to two decimals.
    pub average: f64,
}

/// MMHal-Bench scores as `eval_gpt4.py` prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmHalReport {
    pub judge: String,
    pub questions: usize,
    /// Average rating (0-6), two decimals.
    pub average_score: f64,
    /// Share of ratings below 3 (a fraction), two decimals.
    pub hallucination_rate: f64,
    /// Per question type, in order of first appearance.
    pub types: Vec<TypeScore>,
    /// Replies with no rating or several (rated 0).
    pub unparsed: usize,
    pub warnings: Vec<String>,
}

/// The summary of judged answers.
pub fn summarize(details: &[Detail], judge: &str) -> MmHalReport {
    let n = details.len().max(1) as f64;
    let sum: f64 = details.iter().map(|d| f64::from(d.rating)).sum();
    let hallucinated = details.iter().filter(|d| d.rating < 3).count();
    let mut types: Vec<(String, Vec<u8>)> = Vec::new();
    for d in details {
        match types.iter_mut().find(|(t, _)| *t == d.question_type) {
            Some((_, v)) => v.push(d.rating),
            None => types.push((d.question_type.clone(), vec![d.rating])),
        }
    }
    let types = types
        .into_iter()
        .map(|(question_type, r)| TypeScore {
            question_type,
            questions: r.len(),
            average: py_round(r.iter().map(|&x| f64::from(x)).sum::<f64>() / r.len() as f64, 2),
        })
        .collect();
    let unparsed: Vec<String> = details.iter().filter(|d| !d.parsed).map(|d| d.index.to_string()).collect();
    let mut warnings = Vec::new();
    if !unparsed.is_empty() {
        warnings.push(format!(
            "no single rating in the judge's reply to record(s) {}; rated 0 as the official script does",
            unparsed.join(", ")
        ));
    }
    MmHalReport {
        judge: judge.to_string(),
        questions: details.len(),
        average_score: py_round(sum / n, 2),
        hallucination_rate: py_round(hallucinated as f64 / n, 2),
        types,
        unparsed: unparsed.len(),
        warnings,
    }
}

impl MmHalReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "MMHal-Bench (judge {}, {} questions)\naverage score (0-6)  {:.2}\nhallucination rate   {:.2}\n{:<14} {:>4} {:>8}",
            self.judge, self.questions, self.average_score, self.hallucination_rate, "question type", "n", "average"
        );
        for ty in &self.types {
            t.push_str(&format!("\n{:<14} {:>4} {:>8.2}", ty.question_type, ty.questions, ty.average));
        }
        t.push_str(&format!("\nreplies without a single rating: {}", self.unparsed));
        t
    }

    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = vec![
            ("average_score".to_string(), self.average_score),
            ("hallucination_rate".to_string(), self.hallucination_rate),
        ];
        out.extend(self.types.iter().map(|t| (format!("type/{}", t.question_type), t.average)));
        out
    }
}

/// MMHal-Bench as a [`Bench`]: the records of `response_template.json` (answers joined by position: an answer's
/// question_id is its record's 0-based index) and the images' folder.
pub struct MmHal {
    pub records: Vec<Record>,
    pub images: Option<std::path::PathBuf>,
}

/// The file a run writes when a model answered: the records with `model_answer` filled in, as the official
/// evaluation script reads them.
pub const RESPONSES_FILE: &str = "responses.json";

impl MmHal {
    /// Reads `response_template.json`.
    pub fn load(path: &Path, images: Option<&Path>) -> Result<MmHal> {
        Ok(MmHal { records: load_records(path)?, images: images.map(Path::to_path_buf) })
    }

    /// Reads an official response file (the template's records with `model_answer`, every one filled in) and its
    /// answers.
    pub fn from_responses(path: &Path) -> Result<(MmHal, Vec<Answer>)> {
        let records = load_records(path)?;
        let missing: Vec<String> =
            records.iter().enumerate().filter(|(_, r)| r.model_answer.is_none()).map(|(i, _)| i.to_string()).collect();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "{}: record(s) {} have no model_answer",
                path.display(),
                missing.join(", ")
            )));
        }
        let answers = records
            .iter()
            .enumerate()
            .map(|(i, r)| Answer::new(i.to_string(), "", r.model_answer.clone().unwrap_or_default()))
            .collect();
        Ok((MmHal { records, images: None }, answers))
    }
}

impl Bench for MmHal {
    type Report = MmHalReport;
    type Detail = Detail;

    /// The question alone (as `--test-prompt ''`), ids the records' positions.
    fn answer(&self, vlm: &Vlm, how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
        let items: Vec<ToAnswer> = self
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| ToAnswer { id: i.to_string(), text: r.question.clone(), image: r.image_file() })
            .collect();
        answer_items(vlm, how, &items, self.images.as_deref(), events)
    }

    /// Judges every answer; answers a run made (or saved) are also written as the official response file
    /// [`RESPONSES_FILE`].
    fn score(&self, rows: Rows, ctx: &Context) -> Result<(MmHalReport, Vec<Detail>)> {
        let j = ctx.judge("MMHal-Bench")?;
        let records = &self.records;
        let answers = by_id(rows.rows);
        let ids: Vec<String> = (0..records.len()).map(|i| i.to_string()).collect();
        let from = if rows.given { rows.from.as_str() } else { "the generated answers" };
        let texts = require(&answers, ids.iter().map(String::as_str), from)?;
        if !rows.given {
            let responses: Vec<Value> = records.iter().zip(&texts).map(|(r, t)| r.with_answer(t)).collect();
            let out = ctx.out("MMHal-Bench")?;
            crate::output::write_json(&out.join(RESPONSES_FILE), &Value::Array(responses))?;
        }
        let items: Vec<usize> = (0..records.len()).collect();
        let details = judge_all(j, ctx.events, &items, "judging", |&i| judge(j, i, &records[i], texts[i]))?;
        Ok((summarize(&details, j.model()), details))
    }
}
