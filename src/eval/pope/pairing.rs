//! How POPE answers find their questions: by `question_id`, or by position as the official script does; and what
//! is left over on either side (counted and warned about, never dropped silently).

use serde::{Deserialize, Serialize};

use super::PopeQuestion;
use crate::data::answers::{index_unique, Answer};
use crate::{Error, Result};

/// How answers find their questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// By `question_id`; ids must be unique among questions and among answers.
    #[default]
    ById,
    /// The k-th answer with the k-th question (question files concatenated in the order given), as the
    /// official script does; ids are not compared except to count mismatches.
    Positional,
}

impl std::fmt::Display for Pairing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pairing::ById => "by question_id",
            Pairing::Positional => "positional",
        })
    }
}

pub(super) fn notice_unpaired(paired: &Paired, warnings: &mut Vec<String>) {
    if !paired.unanswered.is_empty() {
        warnings.push(format!("{} question(s) have no answer; they are not scored", paired.unanswered.len()));
    }
    if !paired.orphans.is_empty() {
        warnings.push(format!("{} answer(s) match no question; they are not scored", paired.orphans.len()));
    }
    if paired.id_mismatches > 0 {
        warnings.push(format!(
            "positional pairing: {} pair(s) have different question_ids (expected only when the question \
             files number their rows independently)",
            paired.id_mismatches
        ));
    }
}

/// Index pairs (question, answer) plus what was left over.
pub(super) struct Paired {
    pub pairs: Vec<(usize, usize)>,
    pub unanswered: Vec<usize>,
    pub orphans: Vec<usize>,
    pub id_mismatches: usize,
}

pub(super) fn pair_by_id(questions: &[PopeQuestion], answers: &[Answer]) -> Result<Paired> {
    let by_id =
        index_unique(questions, |q| q.question_id.as_str(), |q| q.origin.as_ref(), "question_id").map_err(with_hint)?;
    index_unique(answers, |a| a.question_id.as_str(), |a| a.origin.as_ref(), "answer for question_id")?;
    let mut answer_of: Vec<Option<usize>> = vec![None; questions.len()];
    let mut orphans = Vec::new();
    for (ai, a) in answers.iter().enumerate() {
        match by_id.get(a.question_id.as_str()) {
            Some(&qi) => answer_of[qi] = Some(ai),
            None => orphans.push(ai),
        }
    }
    let pairs = answer_of.iter().enumerate().filter_map(|(qi, ai)| ai.map(|ai| (qi, ai))).collect();
    let unanswered = answer_of.iter().enumerate().filter(|(_, ai)| ai.is_none()).map(|(qi, _)| qi).collect();
    Ok(Paired { pairs, unanswered, orphans, id_mismatches: 0 })
}

/// Adds the likely cause to a duplicate-question error: several official split files at once.
fn with_hint(e: Error) -> Error {
    const HINT: &str = " (the official coco_pope_*.json files each number their questions from 1: score one \
                        file per run, or pair by position)";
    match e {
        Error::Parse { path, line, msg } => Error::Parse { path, line, msg: msg + HINT },
        Error::Invalid(msg) => Error::Invalid(msg + HINT),
        other => other,
    }
}

pub(super) fn pair_positional(questions: &[PopeQuestion], answers: &[Answer]) -> Paired {
    let n = questions.len().min(answers.len());
    let id_mismatches = (0..n).filter(|&i| questions[i].question_id != answers[i].question_id).count();
    Paired {
        pairs: (0..n).map(|i| (i, i)).collect(),
        unanswered: (n..questions.len()).collect(),
        orphans: (n..answers.len()).collect(),
        id_mismatches,
    }
}
