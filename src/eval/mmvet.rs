//! MM-Vet (Yu et al., "MM-Vet: Evaluating Large Multimodal Models for Integrated Capabilities", 2023): 218
//! open questions, each graded 0.0..1.0 by an LLM against a ground truth, reported per capability and per
//! capability combination, as percentages.
//!
//! The protocol is the official grader's, yuweihao/MM-Vet `mm-vet_evaluator.py` at commit acde843e02da:
//! - the few-shot prompt [`PROMPT`] word for word, followed by `"\n"` and the row
//!   `question | ground truth | prediction | ` (ground truth with `<AND>`/`<OR>` padded by spaces);
//! - one user message, `max_tokens` 3, temperature 0; the score is the reply's text before its first space,
//!   stripped, read as a Python float and accepted only in [0, 1];
//! - otherwise the row is asked again with [`RETRY_SUFFIX`] appended, at temperature 0, 0.5, 1.0, 1.5, 2.0
//!   (the temperature rises after each retry); after the fifth retry the score is 0.0 whatever the last reply;
//! - `runs` repetitions (the paper uses 5; the script's own default is 1), each run's per-capability sum
//!   divided by the capability's question count ×100, averaged over runs and rounded to one decimal as NumPy
//!   rounds; `std` is the population standard deviation of the run totals.
//!
//! Differences: combination names join the capabilities in the order the data lists them (the script joins a
//! Python `set`, whose order changes between interpreter runs), columns with equal counts keep data order,
//! and a non-finite reply (`nan`) is not a score (the script would accept `nan`).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::answer::Answering;
use super::judge::{Ask, ChatRequest, Message};
use super::pynum::{np_mean, np_round, np_std, py_float, py_strip};
use super::run::{answer_items, by_id, judge_all, require, Bench, Context, Rows, ToAnswer};
use super::Answer;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{Error, Result};

/// The grading prompt of yuweihao/MM-Vet `mm-vet_evaluator.py` (commit acde843e02da, `prompt = """..."""`),
/// verbatim, including its final newline (`data/judge/mm-vet-prompt.txt`).
pub const PROMPT: &str = include_str!("../../data/judge/mm-vet-prompt.txt");

/// Appended to the row when a reply is not a score (same file, the `except:` branch).
pub const RETRY_SUFFIX: &str = "\nPredict the correctness of the answer (digit): ";

/// `max_tokens` of every grading request.
pub const MAX_TOKENS: u32 = 3;

/// Retries after the first reply before the score becomes 0.0 (`try_time > 5`).
const MAX_RETRIES: usize = 5;

/// One MM-Vet question (an entry of `mm-vet.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Question {
    /// The key in `mm-vet.json` (`v1_0` ...).
    #[serde(skip)]
    pub id: String,
    #[serde(rename = "imagename")]
    pub image: String,
    #[serde(rename = "capability")]
    pub capabilities: Vec<String>,
    pub question: String,
    pub answer: String,
}

/// A JSON object read in file order (serde_json's map sorts keys; the official script iterates in file order,
/// which decides the summation order and the order of equal-count columns).
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, T>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Reads `mm-vet.json` (`{"v1_0": {"imagename", "capability", "question", "answer"}, ...}`) in file order.
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let text = crate::jsonl::read_text(path)?;
    let Ordered(rows) = serde_json::from_str::<Ordered<Question>>(&text).map_err(|e| Error::parse(path, None, e))?;
    if rows.is_empty() {
        return Err(Error::parse(path, None, "no questions"));
    }
    Ok(rows.into_iter().map(|(id, q)| Question { id, ..q }).collect())
}

/// Answers by question id, from the official results file (`{"v1_0": "answer", ...}`) or LLaVA answer rows
/// (JSON Lines; `question_id` either the key itself or the number LLaVA's `convert_mmvet_for_eval.py` turns
/// into `v1_<n>`).
pub fn load_answers(path: &Path, questions: &[Question]) -> Result<(HashMap<String, String>, Vec<String>)> {
    let known: HashSet<&str> = questions.iter().map(|q| q.id.as_str()).collect();
    let text = crate::jsonl::read_text(path)?;
    let pairs: Vec<(String, String)> = match serde_json::from_str::<Ordered<String>>(&text) {
        Ok(Ordered(rows)) => rows,
        Err(_) => super::load_answers(path)?.into_iter().map(|a| (a.question_id, a.text)).collect(),
    };
    let mut answers = HashMap::new();
    let mut orphans = Vec::new();
    for (id, text) in pairs {
        let id = if known.contains(id.as_str()) { id } else { format!("v1_{id}") };
        if !known.contains(id.as_str()) {
            orphans.push(id);
        } else if answers.insert(id.clone(), text).is_some() {
            return Err(Error::parse(path, None, format!("two answers for {id}")));
        }
    }
    Ok((answers, orphans))
}

/// The row the grader completes: `PROMPT + "\n" + " | ".join([question, answer, prediction, ""])`.
pub fn grading_prompt(q: &Question, prediction: &str) -> String {
    let answer = q.answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ");
    format!("{PROMPT}\n{} | {answer} | {prediction} | ", q.question)
}

/// The score of a reply as the grader reads it: text before the first space, stripped, a float in [0, 1].
pub fn parse_score(reply: &str) -> Option<f64> {
    let first = reply.split(' ').next().unwrap_or_default();
    py_float(py_strip(first)).filter(|s| (0.0..=1.0).contains(s))
}

/// One grading of one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grade {
    pub score: f64,
    /// What the official grade file keeps as `content`: the parsed token, or the last raw reply when the
    /// retries ran out.
    pub content: String,
    /// The model that served the last reply.
    pub model: String,
    /// Every raw reply, in order (more than one when the first was not a score).
    pub replies: Vec<String>,
    /// True when no reply was a score and 0.0 was given.
    pub gave_up: bool,
}

/// Grades `prediction` once (run index `run`), following the grader's retry rule.
pub fn grade(judge: &dyn Ask, q: &Question, prediction: &str, run: usize) -> Result<Grade> {
    let prompt = grading_prompt(q, prediction);
    let request = |text: String, temperature: f64| ChatRequest {
        messages: vec![Message::user(text)],
        temperature,
        max_tokens: Some(MAX_TOKENS),
    };
    let mut reply = judge.ask(&request(prompt.clone(), 0.0), run)?;
    let mut replies = vec![reply.content.clone()];
    let mut temperature = 0.0;
    for _ in 0..MAX_RETRIES {
        if let Some(score) = parse_score(&reply.content) {
            let content = py_strip(reply.content.split(' ').next().unwrap_or_default()).to_string();
            return Ok(Grade { score, content, model: reply.model, replies, gave_up: false });
        }
        reply = judge.ask(&request(format!("{prompt}{RETRY_SUFFIX}"), temperature), run)?;
        replies.push(reply.content.clone());
        temperature += 0.5;
    }
    // The script sets 0.0 right after the fifth retry's request, without reading its reply.
    Ok(Grade { score: 0.0, content: reply.content, model: reply.model, replies, gave_up: true })
}

/// A column of the result tables: a capability (or combination), its question count and score (%).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub count: usize,
    /// Mean over runs of (sum of scores / count × 100), rounded to one decimal (NumPy).
    pub score: f64,
}

/// MM-Vet scores as the official CSV files hold them (percentages, one decimal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmVetReport {
    pub judge: String,
    pub runs: usize,
    pub questions: usize,
    pub total: f64,
    /// Population standard deviation of the run totals.
    pub std: f64,
    /// Each run's total, rounded to one decimal.
    pub run_totals: Vec<f64>,
    /// Per capability, most frequent first (the `cap-score` CSV).
    pub capabilities: Vec<Column>,
    /// Per capability combination, most frequent first (the `cap-int-score` CSV).
    pub integrations: Vec<Column>,
    /// Gradings where no reply was a score (scored 0.0).
    pub gave_up: usize,
    pub warnings: Vec<String>,
}

/// The result tables from per-question, per-run scores (`scores[i][r]` for question `i`, run `r`).
pub fn score(questions: &[Question], scores: &[Vec<f64>], runs: usize, judge: &str) -> Result<MmVetReport> {
    if scores.len() != questions.len() || scores.iter().any(|s| s.len() != runs) || runs == 0 {
        return Err(Error::invalid(format!(
            "MM-Vet: expected {runs} scores for each of {} questions",
            questions.len()
        )));
    }
    // Columns in first-seen order with counts; combinations keyed by their capability set.
    let mut caps: Vec<(String, usize, Vec<f64>)> = Vec::new();
    let mut combos: Vec<(Vec<String>, String, usize, Vec<f64>)> = Vec::new();
    let mut total = vec![0.0; runs];
    for (q, s) in questions.iter().zip(scores) {
        let mut unique: Vec<&String> = Vec::new();
        for c in &q.capabilities {
            if !unique.contains(&c) {
                unique.push(c);
            }
        }
        for c in &unique {
            let i = match caps.iter().position(|(n, ..)| n == *c) {
                Some(i) => i,
                None => {
                    caps.push((c.to_string(), 0, vec![0.0; runs]));
                    caps.len() - 1
                }
            };
            caps[i].1 += 1;
            caps[i].2.iter_mut().zip(s).for_each(|(a, x)| *a += x);
        }
        let mut set: Vec<String> = unique.iter().map(|c| c.to_string()).collect();
        set.sort();
        let i = match combos.iter().position(|(k, ..)| *k == set) {
            Some(i) => i,
            None => {
                let name = unique.iter().map(|c| c.as_str()).collect::<Vec<_>>().join("_");
                combos.push((set, name, 0, vec![0.0; runs]));
                combos.len() - 1
            }
        };
        combos[i].2 += 1;
        combos[i].3.iter_mut().zip(s).for_each(|(a, x)| *a += x);
        total.iter_mut().zip(s).for_each(|(a, x)| *a += x);
    }
    let n = questions.len();
    let percent = |sums: &[f64], count: usize| -> Vec<f64> { sums.iter().map(|x| x / count as f64 * 100.0).collect() };
    let column = |name: String, count: usize, sums: &[f64]| Column {
        name,
        count,
        score: np_round(np_mean(&percent(sums, count)), 1),
    };
    let mut capabilities: Vec<Column> =
        caps.into_iter().map(|(name, count, sums)| column(name, count, &sums)).collect();
    let mut integrations: Vec<Column> =
        combos.into_iter().map(|(_, name, count, sums)| column(name, count, &sums)).collect();
    capabilities.sort_by_key(|c| std::cmp::Reverse(c.count));
    integrations.sort_by_key(|c| std::cmp::Reverse(c.count));
    let totals = percent(&total, n);
    Ok(MmVetReport {
        judge: judge.to_string(),
        runs,
        questions: n,
        total: np_round(np_mean(&totals), 1),
        std: np_round(np_std(&totals), 1),
        run_totals: totals.iter().map(|t| np_round(*t, 1)).collect(),
        capabilities,
        integrations,
        gave_up: 0,
        warnings: Vec::new(),
    })
}

/// One row of `details.jsonl`: the question, the answer graded, and every grading (the official grade file's
/// `model`/`content`/`score` lists, plus each grading's raw replies).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detail {
    pub id: String,
    pub capability: Vec<String>,
    pub question: String,
    pub answer: String,
    pub prediction: String,
    pub score: Vec<f64>,
    pub grades: Vec<Grade>,
}

impl MmVetReport {
    /// The terminal tables: capabilities, then combinations, then the run totals.
    pub fn table(&self) -> String {
        let row = |cols: &[Column]| -> (String, String) {
            let head: Vec<String> = cols.iter().map(|c| format!("{:>w$}", c.name, w = c.name.len().max(6))).collect();
            let vals: Vec<String> =
                cols.iter().map(|c| format!("{:>w$.1}", c.score, w = c.name.len().max(6))).collect();
            (head.join(" "), vals.join(" "))
        };
        let (h1, v1) = row(&self.capabilities);
        let (h2, v2) = row(&self.integrations);
        format!(
            "MM-Vet (judge {}, {} run(s), {} questions; percentages)\n{h1} {:>6} {:>5}\n{v1} {:>6.1} {:>5.1}\n\
             capability integrations:\n{h2}\n{v2}\nrun totals: {:?}; gradings given 0.0 after retries: {}",
            self.judge, self.runs, self.questions, "total", "std", self.total, self.std, self.run_totals, self.gave_up
        )
    }

    /// The numbers `bpo eval compare` lines up.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = vec![("total".to_string(), self.total), ("std".to_string(), self.std)];
        out.extend(self.capabilities.iter().map(|c| (c.name.clone(), c.score)));
        out.extend(self.integrations.iter().map(|c| (format!("int/{}", c.name), c.score)));
        out
    }
}

/// MM-Vet as a [`Bench`]: the questions (read from `path`), their images' folder, and the gradings per answer.
pub struct MmVet {
    pub questions: Vec<Question>,
    pub path: std::path::PathBuf,
    pub images: Option<std::path::PathBuf>,
    pub runs: usize,
}

impl MmVet {
    /// Reads `mm-vet.json`.
    pub fn load(path: &Path, images: Option<&Path>, runs: usize) -> Result<MmVet> {
        Ok(MmVet {
            questions: load_questions(path)?,
            path: path.to_path_buf(),
            images: images.map(Path::to_path_buf),
            runs,
        })
    }
}

impl Bench for MmVet {
    type Report = MmVetReport;
    type Detail = Detail;

    fn answer(&self, vlm: &Vlm, how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
        let items: Vec<ToAnswer> = self
            .questions
            .iter()
            .map(|q| ToAnswer { id: q.id.clone(), text: q.question.clone(), image: Some(q.image.clone()) })
            .collect();
        answer_items(vlm, how, &items, self.images.as_deref(), events)
    }

    /// The official results JSON or LLaVA answer JSONL ([`load_answers`]); answers for unknown ids are a warning.
    fn read_answers(&self, path: &Path, events: &dyn Events) -> Result<Vec<Answer>> {
        let (answers, orphans) = load_answers(path, &self.questions)?;
        if !orphans.is_empty() {
            events.message(&format!(
                "warning: {}: {} answer(s) for ids not in {}",
                path.display(),
                orphans.len(),
                self.path.display()
            ));
        }
        Ok(answers.into_iter().map(|(id, text)| Answer::new(id, "", text)).collect())
    }

    /// Grades every answer `runs` times.
    fn score(&self, rows: Rows, ctx: &Context) -> Result<(MmVetReport, Vec<Detail>)> {
        let judge = ctx.judge("MM-Vet")?;
        let (questions, runs) = (&self.questions, self.runs);
        let answers = by_id(rows.rows);
        let predictions = require(&answers, questions.iter().map(|q| q.id.as_str()), &rows.from)?;
        let items: Vec<(usize, usize)> = (0..runs).flat_map(|r| (0..questions.len()).map(move |i| (i, r))).collect();
        let grades =
            judge_all(judge, ctx.events, &items, "grading", |&(i, r)| grade(judge, &questions[i], predictions[i], r))?;
        let mut per_question: Vec<Vec<Grade>> = vec![Vec::new(); questions.len()];
        for (&(i, _), g) in items.iter().zip(grades) {
            per_question[i].push(g);
        }
        let scores: Vec<Vec<f64>> = per_question.iter().map(|g| g.iter().map(|g| g.score).collect()).collect();
        let mut report = score(questions, &scores, runs, judge.model())?;
        report.gave_up = per_question.iter().flatten().filter(|g| g.gave_up).count();
        if report.gave_up > 0 {
            report.warnings.push(format!(
                "{} grading(s) got no score in six replies and count 0.0, as in the official grader",
                report.gave_up
            ));
        }
        let details: Vec<Detail> = questions
            .iter()
            .zip(per_question)
            .zip(predictions)
            .map(|((q, grades), p)| Detail {
                id: q.id.clone(),
                capability: q.capabilities.clone(),
                question: q.question.clone(),
                answer: q.answer.clone(),
                prediction: p.to_string(),
                score: grades.iter().map(|g| g.score).collect(),
                grades,
            })
            .collect();
        Ok((report, details))
    }
}
