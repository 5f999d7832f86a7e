//! Where CHAIR's inputs come from: ground truth (COCO 2014 annotation files or a JSONL file of objects per
//! image) and captions (answer rows, with the image each one describes).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::chair::{Caption, Chair, GroundTruth};
use crate::data::answers::{flex_id, id_string, image_key, opt_flex_id, Answer, Origin};
use crate::{jsonl, Error, Result};

/// A question row, read only for the image it refers to.
#[derive(Debug, Deserialize)]
struct ImageRef {
    #[serde(deserialize_with = "flex_id")]
    question_id: String,
    #[serde(default, deserialize_with = "opt_flex_id")]
    image_id: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

/// Reads a question file (LLaVA question JSONL) into question_id -> image key, for answers that do not
/// name their image. A row without `image_id` / `image`, or a repeated question_id, is an error.
pub fn load_question_images(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (line, row) in jsonl::read_numbered::<ImageRef>(path)? {
        let Some(image) = row.image_id.as_deref().or(row.image.as_deref()) else {
            return Err(Error::parse(path, Some(line), "question row has neither \"image_id\" nor \"image\""));
        };
        if out.insert(row.question_id.clone(), image_key(image)).is_some() {
            return Err(Error::parse(path, Some(line), format!("duplicate question_id {:?}", row.question_id)));
        }
    }
    Ok(out)
}

/// The image an answer describes, as an [`image_key`]: the first of the answer's `image_id`, its `image`,
/// `metadata.image_id`, `metadata.image`, then (when `questions` is given) the image of the question with the
/// same question_id, and otherwise the question_id itself (Object HalBench files often use the COCO image id
/// as question_id). Errors when `questions` is given but does not hold the answer's question_id.
pub fn image_of(answer: &Answer, questions: Option<&HashMap<String, String>>) -> Result<String> {
    let meta = |key: &str| answer.metadata.get(key).filter(|v| !v.is_null()).map(id_string);
    let own = answer.image_id.clone().or_else(|| answer.image.clone());
    if let Some(raw) = own {
        return Ok(image_key(&raw));
    }
    if let Some(raw) = meta("image_id").or_else(|| meta("image")) {
        return raw.map(|r| image_key(&r)).map_err(|e| Origin::error(answer.origin.as_ref(), format!("metadata: {e}")));
    }
    match questions {
        Some(q) => q.get(&answer.question_id).cloned().ok_or_else(|| {
            let msg = format!("question_id {:?} is not in the questions file", answer.question_id);
            Origin::error(answer.origin.as_ref(), msg)
        }),
        None => Ok(image_key(&answer.question_id)),
    }
}

/// Captions from answer rows: the text with "Assistant:" removed and trimmed (as RLHF-V's loader does), and
/// the image from [`image_of`].
pub fn captions_from_answers(answers: &[Answer], questions: Option<&HashMap<String, String>>) -> Result<Vec<Caption>> {
    answers
        .iter()
        .map(|a| {
            Ok(Caption {
                id: a.question_id.clone(),
                image_id: image_of(a, questions)?,
                text: a.text.replace("Assistant:", "").trim().to_string(),
                origin: a.origin.clone(),
            })
        })
        .collect()
}

/// One line of a ground-truth JSONL file.
#[derive(Debug, Deserialize)]
struct TruthRow {
    #[serde(deserialize_with = "flex_id")]
    image_id: String,
    objects: Vec<String>,
}

/// Subset of a COCO annotation file (instances or captions); everything else is skipped.
#[derive(Debug, Deserialize)]
struct CocoFile {
    #[serde(default)]
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    categories: Vec<CocoCategory>,
}

#[derive(Debug, Deserialize)]
struct CocoImage {
    id: Value,
}

#[derive(Debug, Deserialize)]
struct CocoAnnotation {
    image_id: Value,
    #[serde(default)]
    category_id: Option<u64>,
    #[serde(default)]
    caption: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

impl GroundTruth {
    /// Reads `{"image_id": ..., "objects": ["dog", ...]}` lines. Objects may be any synonym (or a phrase the
    /// caption pipeline resolves, like "teddy bears"); each becomes its category. An object naming no COCO
    /// category, or a repeated image_id, is an error naming the line.
    pub fn from_jsonl(path: &Path, chair: &Chair) -> Result<GroundTruth> {
        let mut objects = HashMap::new();
        for (line, row) in jsonl::read_numbered::<TruthRow>(path)? {
            let mut cats = BTreeSet::new();
            for object in &row.objects {
                let found = chair.object_categories(object);
                if found.is_empty() {
                    let msg = format!("object {object:?} is not in the CHAIR synonym list");
                    return Err(Error::parse(path, Some(line), msg));
                }
                cats.extend(found);
            }
            if objects.insert(image_key(&row.image_id), cats).is_some() {
                return Err(Error::parse(path, Some(line), format!("duplicate image_id {:?}", row.image_id)));
            }
        }
        Ok(GroundTruth { objects, source: format!("ground truth {}", path.display()) })
    }

    /// Reads COCO annotation files from `dir` (all `instances_*.json` and `captions_*.json`, e.g. train2014 and
    /// val2014 as RLHF-V does) for the given images only: the categories of their instance annotations plus
    /// the categories the caption pipeline finds in their reference captions.
    pub fn from_coco(dir: &Path, chair: &Chair, images: &HashSet<String>) -> Result<GroundTruth> {
        let mut objects: HashMap<String, BTreeSet<String>> = HashMap::new();
        for path in coco_files(dir, "instances_")? {
            let coco = read_coco(&path)?;
            note_images(&coco, images, &mut objects);
            let names: HashMap<u64, &str> = coco.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
            for ann in &coco.annotations {
                let (Some(set), Some(cat)) = (wanted(&mut objects, images, &ann.image_id), ann.category_id) else {
                    continue;
                };
                let name = names.get(&cat).ok_or_else(|| {
                    Error::parse(
                        &path,
                        None,
                        format!("annotation uses category_id {cat}, which is not in \"categories\""),
                    )
                })?;
                set.insert(chair.category(name).unwrap_or(name).to_string());
            }
        }
        for path in coco_files(dir, "captions_")? {
            let coco = read_coco(&path)?;
            note_images(&coco, images, &mut objects);
            for ann in &coco.annotations {
                if let (Some(set), Some(caption)) = (wanted(&mut objects, images, &ann.image_id), &ann.caption) {
                    set.extend(chair.mentions(caption).into_iter().map(|m| m.category));
                }
            }
        }
        Ok(GroundTruth { objects, source: format!("the COCO annotations in {}", dir.display()) })
    }
}

/// The `{prefix}*.json` files in `dir`, sorted; none is an error.
fn coco_files(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with(prefix) && name.ends_with(".json") {
            out.push(path);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("{}: no {prefix}*.json (COCO 2014 annotations) found", dir.display())));
    }
    out.sort();
    Ok(out)
}

fn read_coco(path: &Path) -> Result<CocoFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let json = bytes.strip_prefix(jsonl::BOM.as_bytes()).unwrap_or(&bytes);
    serde_json::from_slice(json).map_err(|e| Error::parse(path, None, e))
}

/// Registers the wanted images a file lists, so an image with no objects still has (empty) ground truth.
fn note_images(coco: &CocoFile, wanted: &HashSet<String>, objects: &mut HashMap<String, BTreeSet<String>>) {
    for img in &coco.images {
        if let Ok(id) = id_string(&img.id) {
            let key = image_key(&id);
            if wanted.contains(&key) {
                objects.entry(key).or_default();
            }
        }
    }
}

/// The category set of an annotation's image, when that image is wanted.
fn wanted<'a>(
    objects: &'a mut HashMap<String, BTreeSet<String>>,
    images: &HashSet<String>,
    image_id: &Value,
) -> Option<&'a mut BTreeSet<String>> {
    let key = image_key(&id_string(image_id).ok()?);
    if images.contains(&key) {
        Some(objects.entry(key).or_default())
    } else {
        None
    }
}
