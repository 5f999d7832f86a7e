//! CHAIR / Object HalBench as a [`Bench`]: descriptions of images (a model's, or an answers file's) scored with
//! [`Chair`] against ground truth from COCO annotations or a JSONL file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::answer::{answer_captions, Answering, CaptionAsk};
use super::chair::{CaptionDetail, Chair, ChairReport, GroundTruth};
use super::inputs;
use super::run::{Bench, Context, Rows};
use super::words::Lemmatizer;
use super::Answer;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{Error, Result};

/// Where the captions' ground truth comes from.
#[derive(Debug, Clone)]
pub enum Truth {
    /// A folder of COCO 2014 annotations (instances and captions).
    Coco(PathBuf),
    /// JSON Lines, one image per line: `{"image_id", "objects"}`.
    Jsonl(PathBuf),
}

/// Captions scored with CHAIR: the synonym list, the ground truth, the images of answers that lack one (a
/// question file's), and what a model describes when it answers.
pub struct Captions {
    pub chair: Chair,
    pub truth: Truth,
    pub question_images: Option<HashMap<String, String>>,
    pub asks: Vec<CaptionAsk>,
}

impl Captions {
    /// The built-in COCO synonym list, or the user's file.
    pub fn chair(synonyms: Option<&Path>) -> Result<Chair> {
        match synonyms {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::invalid(format!("reading {}: {e}", path.display())))?;
                Chair::new(&text, Lemmatizer::wordnet()).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
            }
            None => Chair::builtin(),
        }
    }

    /// Object HalBench's asks: each image of `files` with the `instructions` used in turn; answers are keyed by
    /// file name.
    pub fn describe(files: &[PathBuf], instructions: &[String]) -> Vec<CaptionAsk> {
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                CaptionAsk {
                    id: name.clone(),
                    image: f.clone(),
                    name,
                    instruction: instructions[i % instructions.len()].clone(),
                }
            })
            .collect()
    }

    /// Ground truth for the captions' images.
    fn truth(&self, captions: &[super::chair::Caption], ctx: &Context) -> Result<GroundTruth> {
        match &self.truth {
            Truth::Coco(dir) => {
                let images: HashSet<String> = captions.iter().map(|c| c.image_id.clone()).collect();
                ctx.events.stage(&format!("reading {}", dir.display()), None);
                let truth = GroundTruth::from_coco(dir, &self.chair, &images);
                ctx.events.end_stage();
                truth
            }
            Truth::Jsonl(path) => GroundTruth::from_jsonl(path, &self.chair),
        }
    }
}

/// The images of a folder (jpg, jpeg, png, webp), sorted by name, at most `limit`.
pub fn image_files(dir: &Path, limit: Option<usize>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::invalid(format!("reading {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["jpg", "jpeg", "png", "webp"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    files.truncate(limit.unwrap_or(usize::MAX));
    if files.is_empty() {
        return Err(Error::invalid(format!("no images in {}", dir.display())));
    }
    Ok(files)
}

impl Bench for Captions {
    type Report = ChairReport;
    type Detail = CaptionDetail;

    fn answer(&self, vlm: &Vlm, how: &Answering, events: &dyn Events) -> Result<Vec<Answer>> {
        answer_captions(vlm, &self.asks, how, events)
    }

    fn score(&self, rows: Rows, ctx: &Context) -> Result<(ChairReport, Vec<CaptionDetail>)> {
        let captions = inputs::captions_from_answers(&rows.rows, self.question_images.as_ref())?;
        let truth = self.truth(&captions, ctx)?;
        let out = self.chair.score(&captions, &truth)?;
        Ok((out.report, out.details))
    }
}
