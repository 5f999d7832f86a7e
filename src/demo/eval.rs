//! Evaluating a demo model in the field's terms, through the same entry point as `bpo eval` ([`crate::eval::run`]):
//! POPE on the three question files ([`Pope`]) and CHAIR on descriptions of the evaluation images ([`Captions`]
//! with the world's synonym list and ground truth). Answers are written in LLaVA's answer format and scores as
//! `bpo eval` run folders, so `bpo eval compare` works on them.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::data::WorldFiles;
use crate::eval::answer::{Answering, CaptionAsk};
use crate::eval::benchmark;
use crate::eval::captions::{Captions, Truth};
use crate::eval::chair::{CaptionDetail, Chair, ChairReport};
use crate::eval::pope::{self, Pairing, Pope, PopeReport};
use crate::eval::run::{Answers, Context};
use crate::eval::words::Lemmatizer;
use crate::generate::{EngineOptions, SamplingParams};
use crate::model::Pass;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{jsonl, Error, Result};

/// One model's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalScores {
    pub pope: PopeReport,
    pub chair: ChairReport,
    /// Objects named per description (mentions / captions).
    pub objects_per_caption: f64,
    /// Share of descriptions that name an absent partner of a present object: the prior at work.
    pub partner_hallucination: f64,
}

impl EvalScores {
    /// F1 of one POPE split (0 if absent).
    pub fn pope_f1(&self, split: &str) -> f64 {
        self.pope.splits.iter().find(|s| s.split == split).map_or(0.0, |s| s.metrics.f1)
    }
    pub fn pope_accuracy(&self, split: &str) -> f64 {
        self.pope.splits.iter().find(|s| s.split == split).map_or(0.0, |s| s.metrics.accuracy)
    }
    pub fn pope_yes_ratio(&self, split: &str) -> f64 {
        self.pope.splits.iter().find(|s| s.split == split).map_or(0.0, |s| s.metrics.yes_ratio)
    }
}

/// Everything one evaluation produced.
pub struct Evaluation {
    pub scores: EvalScores,
    /// image_id -> description.
    pub captions: HashMap<String, CaptionDetail>,
}

/// Greedy answers of at most `max_new_tokens`, with no `model_id` (the demo's run folders name the model).
fn answering(max_new_tokens: usize, batch: usize, pass: Pass) -> Answering {
    Answering {
        params: SamplingParams { max_new_tokens, ..Default::default() },
        batch: EngineOptions::rows(batch, None),
        pass,
        model_id: String::new(),
    }
}

/// Number of distinct (image, question) requests [`evaluate`] will answer, for a progress bar.
pub fn request_count(files: &WorldFiles) -> Result<usize> {
    let questions = pope::load_questions(&files.pope)?;
    let mut keys: Vec<(String, String)> = questions.into_iter().map(|q| (q.image, q.text)).collect();
    keys.sort();
    keys.dedup();
    Ok(keys.len() + jsonl::read::<serde_json::Value>(&files.describe)?.len())
}

/// Runs POPE and CHAIR for `vlm` (adapters per `pass`) and writes `out/pope/`, `out/chair/` (answers.jsonl,
/// scores.json, details.jsonl); each benchmark's answering is reported to `events`.
pub fn evaluate(
    vlm: &Vlm,
    files: &WorldFiles,
    out: &Path,
    batch: usize,
    pass: Pass,
    events: &dyn Events,
) -> Result<Evaluation> {
    let (pope_dir, chair_dir) = (out.join("pope"), out.join("chair"));
    let ctx = |dir| Context { judge: None, out: Some(dir), events };
    let pope = Pope {
        questions: pope::load_questions(&files.pope)?,
        images: Some(files.images.clone()),
        suffix: String::new(),
        pairing: Pairing::ById,
    };
    let pope_model = Answers::Model { vlm, how: answering(3, batch, pass) };
    let (pope_report, _) = benchmark::run(&pope, pope_model, &ctx(&pope_dir))?;

    let describe: Vec<DescribeRow> = jsonl::read(&files.describe)?;
    let asks: Vec<CaptionAsk> = describe
        .iter()
        .map(|d| CaptionAsk {
            id: d.question_id.clone(),
            image: files.images.join(&d.image),
            name: d.image.clone(),
            instruction: d.text.clone(),
        })
        .collect();
    let synonyms = std::fs::read_to_string(&files.synonyms).map_err(|e| Error::io(&files.synonyms, e))?;
    let chair = Chair::new(&synonyms, Lemmatizer::wordnet())?;
    let captions = Captions { chair, truth: Truth::Jsonl(files.chair_truth.clone()), question_images: None, asks };
    let chair_model = Answers::Model { vlm, how: answering(40, batch, pass) };
    let (chair_report, chair_details) = benchmark::run(&captions, chair_model, &ctx(&chair_dir))?;

    let scores = EvalScores {
        objects_per_caption: ratio(chair_report.mentions, chair_report.captions),
        partner_hallucination: ratio(
            chair_details.iter().filter(|d| names_absent_partner(d)).count(),
            chair_details.len(),
        ),
        pope: pope_report,
        chair: chair_report,
    };
    let captions = chair_details.into_iter().map(|d| (d.image_id.clone(), d)).collect();
    Ok(Evaluation { scores, captions })
}

#[derive(Deserialize)]
struct DescribeRow {
    question_id: String,
    image: String,
    text: String,
}

/// Does a description name an absent kind whose partner is present?
fn names_absent_partner(d: &CaptionDetail) -> bool {
    let kind = |name: &str| super::world::KINDS.iter().position(|k| *k == name);
    d.hallucinated.iter().any(|m| {
        kind(&m.category).is_some_and(|k| d.ground_truth.iter().any(|g| kind(g) == Some(super::world::partner(k))))
    })
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
