//! LLaVA-Bench (in the wild) (Liu et al., "Visual Instruction Tuning", 2023): 60 questions on 24 images in
//! three categories (`conv`, `detail`, `complex`); an LLM judge reads the image captions, the question, a
//! reference answer (GPT-4's) and the model's answer, and scores both 1-10. The result is the model's mean
//! score relative to the reference's, ×100.
//!
//! The protocol is LLaVA's, haotian-liu/LLaVA at commit c121f0432da2:
//! - `llava/eval/eval_gpt_review_bench.py`: the system message [`SYSTEM`], the user message built by
//!   [`review_content`] (captions joined by `\n`, reference = assistant 1, model = assistant 2), the rule
//!   prompt [`RULE_PROMPT`] and role `Assistant` of `llava/eval/table/rule.json` (`llava_bench_conv`,
//!   `llava_bench_detail` and `llava_bench_complex` hold the same text), temperature 0.2, `max_tokens` 1024;
//!   the reply's first line, commas turned into spaces, split on single spaces, must give exactly two floats,
//!   otherwise the pair is (-1, -1) and still counts (the script does not retry).
//! - `llava/eval/summarize_gpt_review.py`: per category and over all rows, the mean pair rounded to three
//!   decimals; relative score = round(model / reference × 100, 1), and both means ×10 rounded to one decimal
//!   (Python rounding).
//!
//! Difference: answers are joined to questions by `question_id` (the script zips the three files line by
//! line, which is the same for files written in question order).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::answer::Answering;
use super::judge::{Ask, ChatRequest, Message};
use super::pynum::{py_float, py_round};
use super::run::{answer_items, by_id, judge_all, require, Bench, Context, Rows, ToAnswer};
use super::Answer;
use crate::data::answers::{flex_id, Origin};
use crate::model::Vlm;
use crate::progress::Events;
use crate::{jsonl, Error, Result};

/// The system message of `eval_gpt_review_bench.py` (`get_eval`).
pub const SYSTEM: &str = "You are a helpful and precise assistant for checking the quality of the answer.";

/// The `prompt` of `llava_bench_conv` / `llava_bench_detail` / `llava_bench_complex` in
/// haotian-liu/LLaVA `llava/eval/table/rule.json` (commit c121f0432da2), verbatim (note the space before the
/// first newline; `data/judge/llava-bench-rule.txt`).
pub const RULE_PROMPT: &str = include_str!("../../data/judge/llava-bench-rule.txt");

/// The `role` of those rules.
pub const ROLE: &str = "Assistant";
/// Sampling temperature of the review requests.
pub const TEMPERATURE: f64 = 0.2;
/// `--max-tokens` default of the review script.
pub const MAX_TOKENS: u32 = 1024;
/// The categories rule.json has rules for.
pub const CATEGORIES: [&str; 3] = ["conv", "detail", "complex"];

/// A question row of `questions.jsonl`: `{"question_id", "image", "text", "category"}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    #[serde(deserialize_with = "flex_id")]
    pub question_id: String,
    pub image: String,
    pub text: String,
    pub category: String,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// Reads `questions.jsonl`; a category without a rule is an error naming the line (the script asserts).
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    for (line, mut q) in jsonl::read_numbered::<Question>(path)? {
        if !CATEGORIES.contains(&q.category.as_str()) {
            return Err(Error::parse(
                path,
                Some(line),
                format!("category {:?} is not one of conv, detail, complex", q.category),
            ));
        }
        q.origin = Some(Origin { path: path.to_path_buf(), line });
        out.push(q);
    }
    crate::data::answers::index_unique(&out, |q| q.question_id.as_str(), |q| q.origin.as_ref(), "question_id")?;
    Ok(out)
}

/// Reads `context.jsonl` (`{"image", "caption"}`, caption a string or a list joined by `\n`): captions by image.
pub fn load_context(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (line, row) in jsonl::read_numbered::<Value>(path)? {
        let image = row["image"].as_str().ok_or_else(|| Error::parse(path, Some(line), "no \"image\" string"))?;
        let caption = match &row["caption"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                let parts: Option<Vec<&str>> = parts.iter().map(Value::as_str).collect();
                parts.ok_or_else(|| Error::parse(path, Some(line), "\"caption\" list holds a non-string"))?.join("\n")
            }
            _ => return Err(Error::parse(path, Some(line), "\"caption\" must be a string or a list of strings")),
        };
        out.insert(image.to_string(), caption);
    }
    Ok(out)
}

/// The user message of one review (`content` in `eval_gpt_review_bench.py`).
pub fn review_content(captions: &str, question: &str, reference: &str, answer: &str) -> String {
    format!(
        "[Context]\n{captions}\n\n[Question]\n{question}\n\n[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n\
         [{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n[System]\n{RULE_PROMPT}\n\n"
    )
}

/// The review request for one question.
pub fn review_request(captions: &str, question: &str, reference: &str, answer: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::system(SYSTEM), Message::user(review_content(captions, question, reference, answer))],
        temperature: TEMPERATURE,
        max_tokens: Some(MAX_TOKENS),
    }
}

/// `parse_score` of the review script: the two scores on the reply's first line, or `None` where the script
/// returns `[-1, -1]`.
pub fn parse_score(review: &str) -> Option<[f64; 2]> {
    let first = review.split('\n').next().unwrap_or_default().replace(',', " ");
    let parts: Vec<&str> = first.split(' ').collect();
    match parts[..] {
        [a, b] => Some([py_float(a)?, py_float(b)?]),
        _ => None,
    }
}

/// One reviewed question (a line of the official review file, plus the texts reviewed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detail {
    pub question_id: String,
    pub category: String,
    pub question: String,
    pub reference: String,
    pub answer: String,
    /// The judge's raw review.
    pub content: String,
    /// (reference score, model score); (-1, -1) when the review could not be parsed.
    pub tuple: [f64; 2],
}

/// Reviews one question.
pub fn review(judge: &dyn Ask, q: &Question, captions: &str, reference: &str, answer: &str) -> Result<Detail> {
    let reply = judge.ask(&review_request(captions, &q.text, reference, answer), 0)?;
    Ok(Detail {
        question_id: q.question_id.clone(),
        category: q.category.clone(),
        question: q.text.clone(),
        reference: reference.to_string(),
        answer: answer.to_string(),
        tuple: parse_score(&reply.content).unwrap_or([-1.0, -1.0]),
        content: reply.content,
    })
}

/// One line of the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryScore {
    /// `all`, `complex`, `conv` or `detail`.
    pub category: String,
    pub questions: usize,
    /// round(model mean / reference mean × 100, 1).
    pub relative: f64,
    /// Reference answer's mean score ×10, rounded to one decimal.
    pub reference: f64,
    /// Model answer's mean score ×10, rounded to one decimal.
    pub model: f64,
}

/// LLaVA-Bench scores as `summarize_gpt_review.py` prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaBenchReport {
    pub judge: String,
    /// `all` first, then the categories in name order (the script sorts its keys).
    pub categories: Vec<CategoryScore>,
    /// Reviews whose scores could not be parsed (counted as -1, -1, as the script does).
    pub unparsed: usize,
    pub warnings: Vec<String>,
}

/// The summary of reviewed rows.
pub fn summarize(details: &[Detail], judge: &str) -> LlavaBenchReport {
    let mut groups: Vec<(String, Vec<[f64; 2]>)> = vec![("all".into(), details.iter().map(|d| d.tuple).collect())];
    let mut names: Vec<&str> = details.iter().map(|d| d.category.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        groups.push((name.into(), details.iter().filter(|d| d.category == name).map(|d| d.tuple).collect()));
    }
    let mut warnings = Vec::new();
    let categories = groups
        .into_iter()
        .map(|(category, pairs)| {
            // np.asarray(v).mean(0): column sums left to right, divided by the row count; then round(x, 3).
            let n = pairs.len().max(1) as f64;
            let stats = [0, 1].map(|j| py_round(pairs.iter().map(|p| p[j]).sum::<f64>() / n, 3));
            let relative = if stats[0] == 0.0 {
                warnings.push(format!("{category}: the reference's mean score is 0; relative score reported as 0"));
                0.0
            } else {
                py_round(stats[1] / stats[0] * 100.0, 1)
            };
            CategoryScore {
                category,
                questions: pairs.len(),
                relative,
                reference: py_round(stats[0] * 10.0, 1),
                model: py_round(stats[1] * 10.0, 1),
            }
        })
        .collect();
    let unparsed = details.iter().filter(|d| d.tuple == [-1.0, -1.0]).count();
    if unparsed > 0 {
        warnings.push(format!(
            "{unparsed} review(s) had no score pair on their first line and count as (-1, -1), as in LLaVA's script"
        ));
    }
    LlavaBenchReport { judge: judge.to_string(), categories, unparsed, warnings }
}

impl LlavaBenchReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "LLaVA-Bench (in the wild) (judge {})\n{:<10} {:>5} {:>9} {:>10} {:>6}",
            self.judge, "category", "n", "relative", "reference", "model"
        );
        for c in &self.categories {
            t.push_str(&format!(
                "\n{:<10} {:>5} {:>9.1} {:>10.1} {:>6.1}",
                c.category, c.questions, c.relative, c.reference, c.model
            ));
        }
        t.push_str(&format!("\nunparsed reviews: {}", self.unparsed));
        t
    }

    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for c in &self.categories {
            out.push((format!("{}/relative", c.category), c.relative));
            out.push((format!("{}/model", c.category), c.model));
            out.push((format!("{}/reference", c.category), c.reference));
        }
        out
    }
}

/// LLaVA-Bench as a [`Bench`]: its three files (questions, the judge's image captions, GPT-4's reference answers)
/// and the images' folder.
pub struct LlavaBench {
    pub questions: Vec<Question>,
    context: HashMap<String, String>,
    context_path: std::path::PathBuf,
    references: HashMap<String, String>,
    references_path: std::path::PathBuf,
    pub images: Option<std::path::PathBuf>,
}

impl LlavaBench {
    /// Reads `questions.jsonl`, `context.jsonl` and the reference answers.
    pub fn load(questions: &Path, context: &Path, references: &Path, images: Option<&Path>) -> Result<LlavaBench> {
        Ok(LlavaBench {
            questions: load_questions(questions)?,
            context: load_context(context)?,
            context_path: context.to_path_buf(),
            references: by_id(super::load_answers(references)?),
            references_path: references.to_path_buf(),
            images: images.map(Path::to_path_buf),
        })
    }
}

impl Bench for LlavaBench {
    type Report = LlavaBenchReport;
    type Detail = Detail;

    fn answer(&self, vlm: &Vlm, how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
        let items: Vec<ToAnswer> = self
            .questions
            .iter()
            .map(|q| ToAnswer { id: q.question_id.clone(), text: q.text.clone(), image: Some(q.image.clone()) })
            .collect();
        answer_items(vlm, how, &items, self.images.as_deref(), events)
    }

    /// Reviews every answer (by question_id) against its reference.
    fn score(&self, rows: Rows, ctx: &Context) -> Result<(LlavaBenchReport, Vec<Detail>)> {
        let judge = ctx.judge("LLaVA-Bench")?;
        let answers = by_id(rows.rows);
        let questions = &self.questions;
        let ids = || questions.iter().map(|q| q.question_id.as_str());
        let refs = require(&self.references, ids(), &self.references_path.display().to_string())?;
        let model_answers = require(&answers, ids(), &rows.from)?;
        let mut captions = Vec::with_capacity(questions.len());
        for q in questions {
            let c = self.context.get(&q.image).ok_or_else(|| {
                Error::invalid(format!(
                    "{}: no caption for image {:?} of question {}",
                    self.context_path.display(),
                    q.image,
                    q.question_id
                ))
            })?;
            captions.push(c.as_str());
        }
        let items: Vec<usize> = (0..questions.len()).collect();
        let details = judge_all(judge, ctx.events, &items, "reviewing", |&i| {
            review(judge, &questions[i], captions[i], refs[i], model_answers[i])
        })?;
        Ok((summarize(&details, judge.model()), details))
    }
}
