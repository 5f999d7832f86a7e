//! The BPO record: one prompt (and optional image) with every answer bootstrapped for it, each scored.
//!
//! On disk (JSONL, one record per line, see docs/bootstrap.md, "Records"):
//! `{"id": "...", "prompt": "...", "image": "rel/path.jpg", "completions": [{"response": "...", "score": 1,
//! "type": "gt"}, {"response": "...", "score": 0, "type": "llm-hal"}]}`. `image` is left out for text-only
//! prompts. Scores are numbers; whole numbers are written without a fraction (`1`, not `1.0`).
//!
//! Ids are stable across runs, so resuming and sharding can key on them:
//! - LLaVA instruct JSON: [`turn_id`] = `"{source id}#{turn}"`, `turn` the 0-based index of the human/gpt
//!   exchange within the conversation (`"000000033471#0"`). The suffix is always there, so `--first-turn-only`
//!   and a full run give turn 0 the same id. Ids stay unique because the turn is the part after the last `#`
//!   and is all digits.
//! - plain JSONL with an `id` key: that id, verbatim (each line is one exchange).
//! - a source item without an id: [`content_id`] = `"h"` + 16 hex digits of [`stable_hash`] over prompt,
//!   image and answer.
//! - a repeated id is handled by [`super::input`] (suffix `~n` in file order).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hash::stable_hash;

/// Where a completion came from. Unknown strings in a file are kept verbatim ([`CompletionType::Other`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CompletionType {
    /// The data set's ground-truth answer (chosen).
    Gt,
    /// Answer of the MLLM itself looking at a weakened (noised) image.
    MllmHal,
    /// Ground truth rewritten by a text-only LLM (error injection).
    LlmHal,
    /// Any other label, kept as written.
    Other(String),
}

impl CompletionType {
    pub fn as_str(&self) -> &str {
        match self {
            CompletionType::Gt => "gt",
            CompletionType::MllmHal => "mllm-hal",
            CompletionType::LlmHal => "llm-hal",
            CompletionType::Other(s) => s,
        }
    }
}

impl From<&str> for CompletionType {
    fn from(s: &str) -> Self {
        match s {
            "gt" => CompletionType::Gt,
            "mllm-hal" => CompletionType::MllmHal,
            "llm-hal" => CompletionType::LlmHal,
            other => CompletionType::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for CompletionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CompletionType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CompletionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(CompletionType::from(s.as_str()))
    }
}

/// One answer to a record's prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub response: String,
    /// Higher is better: 1 for `gt`, 0 for negatives in BPO.
    #[serde(serialize_with = "write_score")]
    pub score: f64,
    #[serde(rename = "type")]
    pub kind: CompletionType,
}

impl Completion {
    /// The ground-truth answer, score 1.
    pub fn gt(response: impl Into<String>) -> Self {
        Completion { response: response.into(), score: 1.0, kind: CompletionType::Gt }
    }
    /// A bootstrapped negative, score 0.
    pub fn negative(response: impl Into<String>, kind: CompletionType) -> Self {
        Completion { response: response.into(), score: 0.0, kind }
    }
}

/// Whole scores are written as integers (`1`), as in the released data; others as floats.
fn write_score<S: Serializer>(score: &f64, s: S) -> Result<S::Ok, S::Error> {
    if score.fract() == 0.0 && score.abs() < 9.0e15 {
        s.serialize_i64(*score as i64)
    } else {
        s.serialize_f64(*score)
    }
}

/// A prompt with all its scored completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub prompt: String,
    /// Image path relative to the image folder; `None` for text-only prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub completions: Vec<Completion>,
}

impl Record {
    /// The answer negatives are made from: the first `gt` completion, else the highest-scored one.
    pub fn ground_truth(&self) -> Option<&Completion> {
        self.completions
            .iter()
            .find(|c| c.kind == CompletionType::Gt)
            .or_else(|| self.completions.iter().max_by(|a, b| a.score.total_cmp(&b.score)))
    }
}

/// Record id for exchange `turn` (0-based) of source item `source_id`.
pub fn turn_id(source_id: &str, turn: usize) -> String {
    format!("{source_id}#{turn}")
}

/// Record id for a source item without an id: a hash of its content.
pub fn content_id(prompt: &str, image: Option<&str>, answer: &str) -> String {
    format!("h{:016x}", stable_hash(&[prompt, image.unwrap_or(""), answer]))
}

/// Counts whitespace-separated words, the unit of the `max_words` filter.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Collapses every run of whitespace to one space and trims, for "same answer?" comparisons.
pub fn normalize_ws(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn record_json_shape_matches_formats_md() {
        let rec = Record {
            id: "a#0".into(),
            prompt: "What is this?".into(),
            image: Some("coco/1.jpg".into()),
            completions: vec![
                Completion::gt("A cat."),
                Completion::negative("A dog.", CompletionType::LlmHal),
                Completion { response: "x".into(), score: 0.5, kind: "my-kind".into() },
            ],
        };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            v,
            json!({"id": "a#0", "prompt": "What is this?", "image": "coco/1.jpg", "completions": [
                {"response": "A cat.", "score": 1, "type": "gt"},
                {"response": "A dog.", "score": 0, "type": "llm-hal"},
                {"response": "x", "score": 0.5, "type": "my-kind"}]})
        );
        let back: Record = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn text_only_record_has_no_image_key_and_reads_null() {
        let rec = Record { id: "x".into(), prompt: "p".into(), image: None, completions: vec![] };
        let s = serde_json::to_string(&rec).unwrap();
        assert!(!s.contains("image"), "{s}");
        let back: Record = serde_json::from_str(r#"{"id":"x","prompt":"p","image":null,"completions":[]}"#).unwrap();
        assert_eq!(back.image, None);
    }

    #[test]
    fn types_round_trip_and_unknown_kept() {
        for s in ["gt", "mllm-hal", "llm-hal", "human-written"] {
            assert_eq!(CompletionType::from(s).as_str(), s);
        }
        assert_eq!(CompletionType::from("mllm-hal"), CompletionType::MllmHal);
    }

    #[test]
    fn content_id_is_pinned() {
        // Pinned so that content ids never change between releases (the hash itself: `crate::hash`).
        assert_eq!(content_id("p", None, "a"), content_id("p", Some(""), "a"));
        assert_eq!(content_id("p", None, "a"), "h04c038fb1e0562d0");
    }

    #[test]
    fn ground_truth_prefers_gt_then_best_score() {
        let mut rec = Record { id: "x".into(), prompt: "p".into(), image: None, completions: vec![] };
        assert!(rec.ground_truth().is_none());
        rec.completions.push(Completion::negative("bad", CompletionType::LlmHal));
        rec.completions.push(Completion { response: "good".into(), score: 2.0, kind: "human".into() });
        assert_eq!(rec.ground_truth().unwrap().response, "good");
        rec.completions.push(Completion::gt("gt"));
        assert_eq!(rec.ground_truth().unwrap().response, "gt");
    }

    #[test]
    fn words_and_whitespace() {
        assert_eq!(word_count("  a b\n\tc  "), 3);
        assert_eq!(normalize_ws("  a  b\n c "), "a b c");
    }
}
