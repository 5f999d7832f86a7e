//! Answering a benchmark's prompts with a loaded model: the one generate-then-collect path that `bpo eval` and the
//! demo share. Answers come back as LLaVA answer rows ([`Answer`]), ready for the scorers of this module's
//! siblings.

use std::path::{Path, PathBuf};

use super::Answer;
use crate::generate::vqa::{self, Prompt};
use crate::generate::{EngineOptions, SamplingParams};
use crate::model::{Pass, Vlm};
use crate::progress::Events;
use crate::Result;

/// How to answer: decoding, batching, adapters, and the `model_id` the rows record.
#[derive(Debug, Clone)]
pub struct Answering {
    pub params: SamplingParams,
    pub batch: EngineOptions,
    pub pass: Pass,
    pub model_id: String,
}

/// One image to describe: the row's id, the image file, the name the row records, the instruction.
#[derive(Debug, Clone)]
pub struct CaptionAsk {
    pub id: String,
    pub image: PathBuf,
    pub name: String,
    pub instruction: String,
}

/// Answers `prompts` through [`vqa::answer_all`]; identical (image, text) prompts (the three POPE splits share most
/// of theirs) are answered once, in sorted order, seeded by their content. Reports the stage `answering` (one unit
/// a distinct prompt).
pub fn answer_unique(vlm: &Vlm, prompts: &[Prompt], how: &Answering, events: &dyn Events) -> Result<Vec<String>> {
    let key = |i: usize| (&prompts[i].image, &prompts[i].text);
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by(|&a, &b| key(a).cmp(&key(b)));
    // `slot[i]`: the distinct prompt that answers prompt `i`.
    let (mut unique, mut slot) = (Vec::<Prompt>::new(), vec![0; prompts.len()]);
    for (k, &i) in order.iter().enumerate() {
        if k == 0 || key(order[k - 1]) != key(i) {
            let p = &prompts[i];
            let id = format!("{}\n{}", p.image.as_deref().unwrap_or(Path::new("")).display(), p.text);
            unique.push(Prompt { id, ..p.clone() });
        }
        slot[i] = unique.len() - 1;
    }
    let texts = vqa::answer_all(vlm, &unique, &how.params, &how.batch, how.pass, events)?;
    Ok(slot.into_iter().map(|u| texts[u].clone()).collect())
}

/// Describes images (CHAIR, Object HalBench); each row records its image's name for the scorer.
pub fn answer_captions(vlm: &Vlm, asks: &[CaptionAsk], how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
    let prompts: Vec<Prompt> = asks
        .iter()
        .map(|a| Prompt {
            text: a.instruction.clone(),
            image: Some(a.image.clone()),
            origin: a.image.display().to_string(),
            id: a.id.clone(),
        })
        .collect();
    let texts = answer_unique(vlm, &prompts, how, events)?;
    Ok(asks
        .iter()
        .zip(texts)
        .map(|(a, t)| Answer {
            image: Some(a.name.clone()),
            model_id: how.model_id.clone(),
            answer_id: a.id.clone(),
            ..Answer::new(a.id.clone(), a.instruction.clone(), t)
        })
        .collect())
}
