//! POPE (Li et al., EMNLP 2023, arXiv 2305.10355): yes/no object-existence questions scored with accuracy,
//! precision, recall, F1 and yes-ratio per split (random / popular / adversarial) and overall.
//!
//! Answers are parsed exactly as LLaVA's `llava/eval/eval_pope.py` (haotian-liu/LLaVA @ 4241f08): keep the text
//! before the first '.', remove ',', split on single spaces; any token exactly `No`, `not` or `no` means *no*,
//! anything else (even `NO` or an empty answer) means *yes*. Positive = yes.
//!
//! Answers are joined to questions by `question_id` ([`Pairing::ById`]); [`Pairing::Positional`] reproduces
//! the official script, which pairs the k-th answer with the k-th question whatever their ids. Nothing is
//! dropped silently: unanswered questions and answers without a question are counted and listed, and a 0/0
//! metric is reported as 0 with a warning (the official script raises ZeroDivisionError).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::answer::{answer_unique, Answering};
use super::ratio;
use super::run::{answer_row, Bench, Context, Rows};
use crate::data::answers::{flex_id, Answer, Origin};
use crate::generate::vqa::Prompt;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{jsonl, Error, Result};

mod pairing;

pub use pairing::Pairing;
use pairing::{notice_unpaired, pair_by_id, pair_positional};

/// The official POPE rule: `true` means the answer counts as *yes*.
pub fn parse_answer(text: &str) -> bool {
    let first = text.split('.').next().unwrap_or_default();
    let first = first.replace(',', "");
    !first.split(' ').any(|w| w == "No" || w == "not" || w == "no")
}

/// A question's ground-truth answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    #[serde(alias = "Yes", alias = "YES")]
    Yes,
    #[serde(alias = "No", alias = "NO")]
    No,
}

/// One POPE question row: `{"question_id", "image", "text", "label"}` plus `category` in merged files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeQuestion {
    #[serde(deserialize_with = "flex_id")]
    pub question_id: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub text: String,
    pub label: Label,
    /// The split; [`load_questions`] fills it from the file name when the row has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

impl PopeQuestion {
    /// The split this question is scored under (`all` when it has no category).
    pub fn split(&self) -> &str {
        self.category.as_deref().unwrap_or("all")
    }
}

/// The split named by a question file: `coco_pope_adversarial.json(l)` gives `adversarial` (the text after
/// the last `pope_`), any other file its stem.
pub fn split_from_path(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let stem = name.trim_end_matches(".jsonl").trim_end_matches(".json");
    match stem.rfind("pope_") {
        Some(i) if i + 5 < stem.len() => stem[i + 5..].to_string(),
        _ => stem.to_string(),
    }
}

/// Reads question files (JSON Lines, whatever the extension: the official `coco_pope_*.json` are JSONL) in
/// order. Rows without `category` get the split named by their file. The same file given twice, or two files
/// naming the same split (`a/pope_random.json` and `b/pope_random.json`) for rows without a category, are
/// refused: their questions would be scored as one split, counted twice.
pub fn load_questions(paths: &[PathBuf]) -> Result<Vec<PopeQuestion>> {
    let mut out = Vec::new();
    let mut named: Vec<(String, &PathBuf)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        if let Some(first) = paths[..i].iter().find(|p| crate::output::same_file(p, path)) {
            return Err(Error::invalid(format!(
                "{}: the same question file as {}; give each split once",
                path.display(),
                first.display()
            )));
        }
        let split = split_from_path(path);
        let rows = jsonl::read_numbered::<PopeQuestion>(path)?;
        if rows.iter().any(|(_, q)| q.category.is_none()) {
            if let Some((_, other)) = named.iter().find(|(s, _)| *s == split) {
                return Err(Error::invalid(format!(
                    "{} and {} both name split {split:?} (from the file name), which would merge them into one: \
                     rename one, or give its rows a \"category\"",
                    other.display(),
                    path.display()
                )));
            }
            named.push((split.clone(), path));
        }
        for (line, mut q) in rows {
            q.category.get_or_insert_with(|| split.clone());
            q.origin = Some(Origin { path: path.clone(), line });
            out.push(q);
        }
    }
    Ok(out)
}

/// Counts of one split's predictions against labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl Confusion {
    pub fn add(&mut self, predicted_yes: bool, label: Label) {
        match (predicted_yes, label) {
            (true, Label::Yes) => self.tp += 1,
            (true, Label::No) => self.fp += 1,
            (false, Label::No) => self.tn += 1,
            (false, Label::Yes) => self.fn_ += 1,
        }
    }

    /// The five POPE metrics (fractions in [0, 1]); a 0/0 gives 0 and a warning naming `split`.
    pub fn metrics(&self, split: &str, warnings: &mut Vec<String>) -> PopeMetrics {
        let n = self.tp + self.fp + self.tn + self.fn_;
        let mut r = |num, den, what: &str| ratio(num, den, &format!("{split}: {what}"), warnings);
        let accuracy = r(self.tp + self.tn, n, "accuracy (no scored questions)");
        let precision = r(self.tp, self.tp + self.fp, "precision (no yes predictions)");
        let recall = r(self.tp, self.tp + self.fn_, "recall (no yes labels)");
        let yes_ratio = r(self.tp + self.fp, n, "yes-ratio (no scored questions)");
        let f1 = if precision + recall == 0.0 {
            warnings.push(format!("{split}: F1 is 0/0 (precision and recall are 0), reported as 0"));
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        PopeMetrics {
            n,
            tp: self.tp,
            fp: self.fp,
            tn: self.tn,
            fn_: self.fn_,
            accuracy,
            precision,
            recall,
            f1,
            yes_ratio,
        }
    }
}

/// Metrics of one split (or of all splits pooled). Ratios are fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeMetrics {
    /// Scored (question, answer) pairs.
    pub n: usize,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Share of scored answers parsed as yes.
    pub yes_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitMetrics {
    pub split: String,
    #[serde(flatten)]
    pub metrics: PopeMetrics,
}

/// A count with the ids behind it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdList {
    pub count: usize,
    pub ids: Vec<String>,
}

impl IdList {
    fn from_ids(ids: Vec<String>) -> Self {
        IdList { count: ids.len(), ids }
    }
}

/// Everything `scores.json` holds for a POPE run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeReport {
    pub pairing: Pairing,
    /// Splits in the order their first question appears.
    pub splits: Vec<SplitMetrics>,
    /// All scored pairs pooled.
    pub overall: PopeMetrics,
    /// Questions no answer was paired with.
    pub unanswered: IdList,
    /// Answers no question was paired with.
    pub orphan_answers: IdList,
    /// Positional pairing only: pairs whose question_ids differ.
    pub id_mismatches: usize,
    pub warnings: Vec<String>,
}

/// One scored pair, for `details.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeDetail {
    pub question_id: String,
    pub split: String,
    pub label: Label,
    pub prediction: Label,
    pub answer: String,
}

/// A scored POPE run: the report and one detail row per scored pair.
#[derive(Debug, Clone)]
pub struct PopeOutput {
    pub report: PopeReport,
    pub details: Vec<PopeDetail>,
}

/// Scores in-memory answers against questions. Errors only on duplicate ids under [`Pairing::ById`].
pub fn score(questions: &[PopeQuestion], answers: &[Answer], pairing: Pairing) -> Result<PopeOutput> {
    let paired = match pairing {
        Pairing::ById => pair_by_id(questions, answers)?,
        Pairing::Positional => pair_positional(questions, answers),
    };
    let mut warnings = Vec::new();
    let mut splits: Vec<(&str, Confusion)> = Vec::new();
    let mut overall = Confusion::default();
    let mut details = Vec::with_capacity(paired.pairs.len());
    for &(qi, ai) in &paired.pairs {
        let (q, a) = (&questions[qi], &answers[ai]);
        let yes = parse_answer(&a.text);
        let split = q.split();
        let at = match splits.iter().position(|(s, _)| *s == split) {
            Some(at) => at,
            None => {
                splits.push((split, Confusion::default()));
                splits.len() - 1
            }
        };
        splits[at].1.add(yes, q.label);
        overall.add(yes, q.label);
        let prediction = if yes { Label::Yes } else { Label::No };
        details.push(PopeDetail {
            question_id: q.question_id.clone(),
            split: split.to_string(),
            label: q.label,
            prediction,
            answer: a.text.clone(),
        });
    }
    let splits = order_splits(questions, splits)
        .into_iter()
        .map(|(split, c)| SplitMetrics { split: split.to_string(), metrics: c.metrics(split, &mut warnings) })
        .collect();
    let overall = overall.metrics("overall", &mut warnings);
    notice_unpaired(&paired, &mut warnings);
    let report = PopeReport {
        pairing,
        splits,
        overall,
        unanswered: IdList::from_ids(paired.unanswered.iter().map(|&i| questions[i].question_id.clone()).collect()),
        orphan_answers: IdList::from_ids(paired.orphans.iter().map(|&i| answers[i].question_id.clone()).collect()),
        id_mismatches: paired.id_mismatches,
        warnings,
    };
    Ok(PopeOutput { report, details })
}

/// Splits in question order, including splits whose questions all went unanswered (they score 0 with a
/// warning rather than vanish).
fn order_splits<'a>(questions: &'a [PopeQuestion], scored: Vec<(&'a str, Confusion)>) -> Vec<(&'a str, Confusion)> {
    let mut order: Vec<&str> = Vec::new();
    for q in questions {
        if !order.contains(&q.split()) {
            order.push(q.split());
        }
    }
    order.into_iter().map(|s| (s, scored.iter().find(|(t, _)| *t == s).map(|(_, c)| *c).unwrap_or_default())).collect()
}

/// LLaVA's short-answer suffix, appended to POPE questions as its evaluation scripts do.
pub const SHORT_ANSWER: &str = "\nAnswer the question using a single word or phrase.";

/// POPE as a [`Bench`]: the questions, their images' folder, the suffix a model's prompt gets ([`SHORT_ANSWER`]
/// in LLaVA's protocol) and how answers pair with questions.
pub struct Pope {
    pub questions: Vec<PopeQuestion>,
    pub images: Option<PathBuf>,
    pub suffix: String,
    pub pairing: Pairing,
}

impl Bench for Pope {
    type Report = PopeReport;
    type Detail = PopeDetail;

    fn answer(&self, vlm: &Vlm, how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
        let prompts: Vec<Prompt> = self
            .questions
            .iter()
            .map(|q| Prompt {
                text: format!("{}{}", q.text, self.suffix),
                image: (!q.image.is_empty()).then(|| crate::data::image_path(self.images.as_deref(), &q.image)),
                origin: q.origin.as_ref().map(|o| format!("{}:{}", o.path.display(), o.line)).unwrap_or_default(),
                id: q.question_id.clone(),
            })
            .collect();
        let texts = answer_unique(vlm, &prompts, how, events)?;
        Ok(self.questions.iter().zip(texts).map(|(q, t)| answer_row(&q.question_id, &q.text, t, how)).collect())
    }

    fn score(&self, rows: Rows, _ctx: &Context) -> Result<(PopeReport, Vec<PopeDetail>)> {
        let out = score(&self.questions, &rows.rows, self.pairing)?;
        Ok((out.report, out.details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, label: Label, split: &str) -> PopeQuestion {
        PopeQuestion {
            question_id: id.into(),
            image: String::new(),
            text: String::new(),
            label,
            category: Some(split.into()),
            origin: None,
        }
    }

    #[test]
    fn parsing_follows_the_official_script() {
        // (answer, official prediction is yes)
        let cases = [
            ("Yes", true),
            ("No", false),
            ("No.", false),
            ("no,", false),
            ("NO", true), // only `No`, `no`, `not` count
            ("Not really", true),
            ("not sure", false),
            ("There is no dog", false),
            ("Yes, no doubt", false), // the comma is removed, then `no` is a token
            ("", true),
            ("Yes. There is no dog in the image.", true), // only the first sentence counts
            ("There is a dog. No cat.", true),
            ("No, there is not.", false),
            ("I do not know", false),
            ("No\n", true), // split on single spaces only: the token is "No\n"
            ("nothing", true),
            ("Yes,no", true), // removing ',' joins the words: "Yesno"
        ];
        for (text, yes) in cases {
            assert_eq!(parse_answer(text), yes, "{text:?}");
        }
    }

    #[test]
    fn a_known_confusion_matrix_gives_every_metric() {
        let c = Confusion { tp: 3, fp: 1, tn: 4, fn_: 2 };
        let mut w = Vec::new();
        let m = c.metrics("x", &mut w);
        assert_eq!(m.n, 10);
        assert!((m.accuracy - 0.7).abs() < 1e-12);
        assert!((m.precision - 0.75).abs() < 1e-12);
        assert!((m.recall - 0.6).abs() < 1e-12);
        assert!((m.f1 - 2.0 * 0.75 * 0.6 / 1.35).abs() < 1e-12);
        assert!((m.yes_ratio - 0.4).abs() < 1e-12);
        assert!(w.is_empty());
    }

    #[test]
    fn zero_division_gives_zero_and_a_warning() {
        let mut w = Vec::new();
        let m = Confusion { tp: 0, fp: 0, tn: 5, fn_: 0 }.metrics("random", &mut w);
        assert_eq!((m.precision, m.recall, m.f1, m.yes_ratio), (0.0, 0.0, 0.0, 0.0));
        assert_eq!(m.accuracy, 1.0);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("random: precision"));
        let mut w = Vec::new();
        let m = Confusion::default().metrics("empty", &mut w);
        assert!(!m.accuracy.is_nan() && !m.f1.is_nan());
        assert_eq!(w.len(), 5);
    }

    #[test]
    fn by_id_pairing_ignores_order_and_reports_leftovers() {
        let qs = vec![q("1", Label::Yes, "random"), q("2", Label::No, "random"), q("3", Label::Yes, "popular")];
        let ans = vec![Answer::new("2", "", "No"), Answer::new("1", "", "Yes"), Answer::new("9", "", "Yes")];
        let out = score(&qs, &ans, Pairing::ById).unwrap();
        let r = &out.report;
        assert_eq!(r.splits.len(), 2);
        assert_eq!((r.splits[0].split.as_str(), r.splits[0].metrics.accuracy), ("random", 1.0));
        assert_eq!(r.splits[1].metrics.n, 0, "popular is listed even though unanswered");
        assert_eq!(r.unanswered, IdList { count: 1, ids: vec!["3".into()] });
        assert_eq!(r.orphan_answers, IdList { count: 1, ids: vec!["9".into()] });
        assert_eq!(r.overall.n, 2);
        assert_eq!(out.details.len(), 2);
    }

    #[test]
    fn positional_pairing_reproduces_the_official_zip() {
        let qs = vec![q("1", Label::Yes, "a"), q("2", Label::No, "a")];
        let ans = vec![Answer::new("2", "", "No"), Answer::new("1", "", "Yes")];
        let by_id = score(&qs, &ans, Pairing::ById).unwrap().report;
        let pos = score(&qs, &ans, Pairing::Positional).unwrap().report;
        assert_eq!(by_id.overall.accuracy, 1.0);
        assert_eq!(pos.overall.accuracy, 0.0, "swapped answers are paired with the wrong questions");
        assert_eq!(pos.id_mismatches, 2);
        let short = score(&qs, &ans[..1], Pairing::Positional).unwrap().report;
        assert_eq!(short.unanswered.ids, vec!["2".to_string()]);
    }

    #[test]
    fn duplicate_ids_are_errors_by_id_only() {
        let qs = vec![q("1", Label::Yes, "a"), q("1", Label::No, "b")];
        let ans = vec![Answer::new("1", "", "Yes"), Answer::new("1", "", "No")];
        assert!(score(&qs, &ans, Pairing::ById).is_err());
        assert!(score(&qs, &ans, Pairing::Positional).is_ok());
        let qs = vec![q("1", Label::Yes, "a")];
        let err = score(&qs, &ans, Pairing::ById).unwrap_err().to_string();
        assert!(err.contains("duplicate answer for question_id \"1\""), "{err}");
    }

    #[test]
    fn splits_come_from_file_names() {
        assert_eq!(split_from_path(Path::new("x/coco_pope_adversarial.json")), "adversarial");
        assert_eq!(split_from_path(Path::new("coco_pope_random.jsonl")), "random");
        assert_eq!(split_from_path(Path::new("aokvqa_pope_seem_popular.json")), "seem_popular");
        assert_eq!(split_from_path(Path::new("my_questions.jsonl")), "my_questions");
    }

    #[test]
    fn two_files_naming_one_split_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let row = "{\"question_id\": 1, \"text\": \"q\", \"label\": \"yes\"}\n";
        let tagged = "{\"question_id\": 1, \"text\": \"q\", \"label\": \"no\", \"category\": \"x\"}\n";
        for (name, text) in
            [("p2.jsonl", row), ("sub/p2.jsonl", row), ("coco_pope_p2.json", row), ("t/p2.jsonl", tagged)]
        {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let load = |names: &[&str]| load_questions(&names.iter().map(|n| dir.path().join(n)).collect::<Vec<_>>());
        for names in [&["sub/p2.jsonl", "p2.jsonl"][..], &["p2.jsonl", "coco_pope_p2.json"]] {
            let err = load(names).unwrap_err().to_string();
            assert!(err.contains("both name split \"p2\"") && err.contains(names[1]), "{err}");
        }
        let err = load(&["p2.jsonl", "./p2.jsonl"]).unwrap_err().to_string();
        assert!(err.contains("the same question file"), "{err}");
        // Rows that carry their own category do not take the file's name.
        assert_eq!(load(&["p2.jsonl", "t/p2.jsonl"]).unwrap().len(), 2);
    }

    #[test]
    fn labels_must_be_yes_or_no() {
        let ok: PopeQuestion = serde_json::from_str(r#"{"question_id": 3, "label": "Yes"}"#).unwrap();
        assert_eq!((ok.question_id.as_str(), ok.label), ("3", Label::Yes));
        assert!(serde_json::from_str::<PopeQuestion>(r#"{"question_id": 3, "label": "maybe"}"#).is_err());
    }
}
