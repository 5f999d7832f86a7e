//! CHAIR (Rohrbach et al., EMNLP 2018, arXiv 1809.02156) and Object HalBench (RLHF-V, arXiv 2312.00849):
//! which COCO objects a caption mentions, and how many of them are not in the image.
//!
//! The word pipeline follows RLHF-V's `eval/eval_gpt_obj_halbench.py` (RLHF-V/RLHF-V @ 3d35a91), itself the
//! CHAIR code of LisaAnne/Hallucination with NLTK's lemmatizer: lower-case, tokenise, singularise
//! ([`super::words`]), merge two-word names greedily left to right (every multi-word synonym entry, "home
//! plate", "train track", "baby/adult X" -> X for animals, "passenger jet/train" -> jet/train, "bow tie" -> tie,
//! "toilet seat" -> toilet), drop "seat" when "toilet" is present, keep synonym-list words and map each to its
//! category. As in the original, only *pairs* are merged, so a three-word entry ("stove top oven") never
//! matches as a whole.
//!
//! Metrics: CHAIR_i = hallucinated mentions / mentions (every occurrence counts); CHAIR_s = captions with a
//! hallucination / captions; Object HalBench response hallucination = hallucinated captions / captions that
//! mention at least one object; object recall = distinct correctly mentioned categories / ground-truth
//! categories (summed over captions); average length = words per caption, counted as the official script
//! does (`len(caption.strip().split(" "))`).

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::ratio;
use super::words::{tokenize, Lemmatizer};
use crate::data::answers::{index_unique, Origin};
use crate::{bail, Result};

/// The COCO synonym list shipped with bpo (RLHF-V's `synonyms_refine.txt`).
pub const SYNONYMS: &str = include_str!("../../data/chair/synonyms_refine.txt");

const ANIMALS: [&str; 12] =
    ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"];
const VEHICLES: [&str; 2] = ["jet", "train"];

/// Word tables built once from a synonym list and WordNet's noun exceptions; then [`Chair::mentions`] and
/// [`Chair::score`] are cheap.
#[derive(Debug, Clone)]
pub struct Chair {
    /// Category names in synonym-file order (the first entry of each line).
    categories: Vec<String>,
    /// Synonym (one or more words) -> index into `categories`.
    synonyms: HashMap<String, usize>,
    /// First word -> second word -> what the pair becomes.
    merges: HashMap<String, HashMap<String, String>>,
    lemmatizer: Lemmatizer,
}

/// One object word found in a caption, with its COCO category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    pub word: String,
    pub category: String,
}

impl Chair {
    /// Builds the tables. `synonyms`: one category per line, entries separated by ", ", first entry = the
    /// category; `lemmatizer`: usually [`Lemmatizer::wordnet`].
    pub fn new(synonyms: &str, lemmatizer: Lemmatizer) -> Result<Chair> {
        let mut categories = Vec::new();
        let mut table = HashMap::new();
        for line in synonyms.lines().filter(|l| !l.trim().is_empty()) {
            let entries: Vec<&str> = line.trim().split(", ").map(str::trim).filter(|e| !e.is_empty()).collect();
            let Some(first) = entries.first() else { continue };
            categories.push(first.to_string());
            for entry in entries {
                table.insert(entry.to_string(), categories.len() - 1);
            }
        }
        if categories.is_empty() {
            bail!("the CHAIR synonym list is empty");
        }
        let merges = merge_table(&table);
        Ok(Chair { categories, synonyms: table, merges, lemmatizer })
    }

    /// The shipped synonym list and WordNet tables.
    pub fn builtin() -> Result<Chair> {
        Chair::new(SYNONYMS, Lemmatizer::wordnet())
    }

    /// All category names, in synonym-file order.
    pub fn categories(&self) -> &[String] {
        &self.categories
    }

    /// The category of a synonym-list entry (exact match, as the official script).
    pub fn category(&self, word: &str) -> Option<&str> {
        self.synonyms.get(word).map(|&i| self.categories[i].as_str())
    }

    /// The COCO objects `caption` mentions, in order, one per occurrence.
    pub fn mentions(&self, caption: &str) -> Vec<Mention> {
        let tokens = tokenize(caption);
        let words: Vec<_> = tokens.iter().map(|t| self.lemmatizer.lemma(t)).collect();
        let mut merged: Vec<&str> = Vec::with_capacity(words.len());
        let mut i = 0;
        while i < words.len() {
            let pair = words.get(i + 1).and_then(|next| self.merges.get(words[i].as_ref())?.get(next.as_ref()));
            match pair {
                Some(joined) => {
                    merged.push(joined);
                    i += 2;
                }
                None => {
                    merged.push(&words[i]);
                    i += 1;
                }
            }
        }
        // "the seat of the toilet" is not a chair.
        if merged.contains(&"toilet") {
            merged.retain(|w| *w != "seat");
        }
        merged
            .into_iter()
            .filter_map(|w| Some(Mention { word: w.to_string(), category: self.category(w)?.to_string() }))
            .collect()
    }

    /// The categories an object name given as ground truth stands for: a synonym-list entry, or whatever the
    /// caption pipeline finds in it ("dogs", "teddy bears"). Empty when it names no COCO object.
    pub fn object_categories(&self, object: &str) -> Vec<String> {
        match self.category(object).or_else(|| self.category(&object.to_lowercase())) {
            Some(c) => vec![c.to_string()],
            None => self.mentions(object).into_iter().map(|m| m.category).collect(),
        }
    }

    /// Scores captions against per-image ground truth. Errors on a repeated caption id or an image without
    /// ground truth (naming the answer's file and line when it came from one).
    pub fn score(&self, captions: &[Caption], truth: &GroundTruth) -> Result<ChairOutput> {
        index_unique(captions, |c| c.id.as_str(), |c| c.origin.as_ref(), "question_id")?;
        let mut t = Totals::default();
        let mut details = Vec::with_capacity(captions.len());
        for c in captions {
            let Some(gt) = truth.objects.get(&c.image_id) else {
                let msg = format!("image {:?} has no ground truth in {}", c.image_id, truth.source);
                return Err(Origin::error(c.origin.as_ref(), msg));
            };
            let detail = self.score_caption(c, gt);
            t.add(&detail);
            details.push(detail);
        }
        Ok(ChairOutput { report: t.report(), details })
    }

    fn score_caption(&self, c: &Caption, gt: &BTreeSet<String>) -> CaptionDetail {
        let mentions = self.mentions(&c.text);
        let hallucinated: Vec<Mention> = mentions.iter().filter(|m| !gt.contains(&m.category)).cloned().collect();
        let recalled: BTreeSet<&String> = mentions.iter().map(|m| &m.category).filter(|c| gt.contains(*c)).collect();
        CaptionDetail {
            question_id: c.id.clone(),
            image_id: c.image_id.clone(),
            words: c.text.trim().split(' ').count(),
            chair_i: if mentions.is_empty() { 0.0 } else { hallucinated.len() as f64 / mentions.len() as f64 },
            recalled: recalled.into_iter().cloned().collect(),
            ground_truth: gt.iter().cloned().collect(),
            mentions,
            hallucinated,
            caption: c.text.clone(),
        }
    }
}

/// The pair table: every multi-word synonym maps to itself, then the hard-coded CHAIR rules (inserted in the
/// official order, so "bow tie" ends up as "tie").
fn merge_table(synonyms: &HashMap<String, usize>) -> HashMap<String, HashMap<String, String>> {
    let mut pairs: Vec<(String, String)> =
        synonyms.keys().filter(|k| k.contains(' ')).map(|k| (k.clone(), k.clone())).collect();
    pairs.sort(); // HashMap order is random; keep the table deterministic
    for extra in ["home plate", "train track"] {
        pairs.push((extra.into(), extra.into()));
    }
    for animal in ANIMALS {
        pairs.push((format!("baby {animal}"), animal.into()));
        pairs.push((format!("adult {animal}"), animal.into()));
    }
    for vehicle in VEHICLES {
        pairs.push((format!("passenger {vehicle}"), vehicle.into()));
    }
    pairs.push(("bow tie".into(), "tie".into()));
    pairs.push(("toilet seat".into(), "toilet".into()));
    pairs.push(("wine glas".into(), "wine glass".into())); // dead with NLTK's lemmatizer, kept as in the original
    let mut table: HashMap<String, HashMap<String, String>> = HashMap::new();
    for (key, value) in pairs {
        // Only two-word keys can match: the original joins exactly two words before looking up.
        if let Some((a, b)) = key.split_once(' ').filter(|(_, b)| !b.contains(' ')) {
            table.entry(a.to_string()).or_default().insert(b.to_string(), value);
        }
    }
    table
}

/// A caption to score: the answer's id, the image it describes (normalised with [`crate::data::answers::image_key`])
/// and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub id: String,
    pub image_id: String,
    pub text: String,
    pub origin: Option<Origin>,
}

/// Ground-truth categories per image (keys normalised with [`crate::data::answers::image_key`]).
#[derive(Debug, Clone, Default)]
pub struct GroundTruth {
    pub objects: HashMap<String, BTreeSet<String>>,
    /// Where it came from, for messages ("ground truth gt.jsonl", "COCO annotations in DIR").
    pub source: String,
}

/// Everything `scores.json` holds for a CHAIR run. Ratios are fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChairReport {
    pub captions: usize,
    /// Captions that mention at least one COCO object.
    pub captions_with_objects: usize,
    pub hallucinated_captions: usize,
    pub mentions: usize,
    pub hallucinated_mentions: usize,
    pub chair_s: f64,
    pub chair_i: f64,
    /// Object HalBench's response-level rate: hallucinated captions / captions with objects.
    pub response_hallucination: f64,
    pub object_recall: f64,
    /// Distinct correctly mentioned categories, summed over captions.
    pub recalled_objects: usize,
    /// Ground-truth categories, summed over captions.
    pub ground_truth_objects: usize,
    /// Mean words per caption (`len(text.strip().split(" "))`).
    pub avg_length: f64,
    pub warnings: Vec<String>,
}

/// One caption's result, for `details.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionDetail {
    pub question_id: String,
    pub image_id: String,
    pub caption: String,
    pub words: usize,
    pub mentions: Vec<Mention>,
    pub hallucinated: Vec<Mention>,
    /// Ground-truth categories mentioned correctly.
    pub recalled: Vec<String>,
    pub ground_truth: Vec<String>,
    /// This caption's hallucinated mentions / mentions (0 without mentions).
    pub chair_i: f64,
}

/// A scored CHAIR run: the report and one detail row per caption.
#[derive(Debug, Clone)]
pub struct ChairOutput {
    pub report: ChairReport,
    pub details: Vec<CaptionDetail>,
}

#[derive(Default)]
struct Totals {
    captions: usize,
    with_objects: usize,
    hallucinated_captions: usize,
    mentions: usize,
    hallucinated_mentions: usize,
    recalled: usize,
    ground_truth: usize,
    words: usize,
}

impl Totals {
    fn add(&mut self, d: &CaptionDetail) {
        self.captions += 1;
        self.with_objects += usize::from(!d.mentions.is_empty());
        self.hallucinated_captions += usize::from(!d.hallucinated.is_empty());
        self.mentions += d.mentions.len();
        self.hallucinated_mentions += d.hallucinated.len();
        self.recalled += d.recalled.len();
        self.ground_truth += d.ground_truth.len();
        self.words += d.words;
    }

    fn report(&self) -> ChairReport {
        let mut w = Vec::new();
        ChairReport {
            captions: self.captions,
            captions_with_objects: self.with_objects,
            hallucinated_captions: self.hallucinated_captions,
            mentions: self.mentions,
            hallucinated_mentions: self.hallucinated_mentions,
            chair_s: ratio(self.hallucinated_captions, self.captions, "CHAIR_s (no captions)", &mut w),
            chair_i: ratio(self.hallucinated_mentions, self.mentions, "CHAIR_i (no object mentions)", &mut w),
            response_hallucination: ratio(
                self.hallucinated_captions,
                self.with_objects,
                "response hallucination (no caption mentions an object)",
                &mut w,
            ),
            object_recall: ratio(self.recalled, self.ground_truth, "object recall (no ground-truth objects)", &mut w),
            recalled_objects: self.recalled,
            ground_truth_objects: self.ground_truth,
            avg_length: ratio(self.words, self.captions, "average length (no captions)", &mut w),
            warnings: w,
        }
    }
}

#[cfg(test)]
mod tests;
