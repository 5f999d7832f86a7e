//! LLaVA answer rows (`model_vqa` JSONL: what `bpo generate` writes and every benchmark reads), where a row came
//! from, and the id rules (ids may be numbers or strings in real files; both are normalised to strings, and a
//! numeric question id is written back as a number).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{jsonl, Error, Result};

/// The file and 1-based line a row was read from, so checks made after loading still name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    pub line: usize,
}

impl Origin {
    /// An error about the row at `origin`: `file:line: msg` for rows read from a file, a plain message for
    /// rows built in memory.
    pub fn error(origin: Option<&Origin>, msg: impl std::fmt::Display) -> Error {
        match origin {
            Some(o) => Error::parse(&o.path, Some(o.line), msg),
            None => Error::invalid(msg),
        }
    }

    /// `file:line`, for messages that point at a second row.
    pub fn describe(origin: Option<&Origin>) -> String {
        origin.map(|o| format!("{}:{}", o.path.display(), o.line)).unwrap_or_else(|| "in memory".into())
    }
}

/// One answer row as LLaVA's `model_vqa*` scripts write it. `image_id` / `image` are not part of that format
/// but other tools (RLHF-V, Object HalBench) add them; CHAIR uses them to find the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AnswerFile", into = "AnswerFile")]
pub struct Answer {
    /// The id as a string (`7` and `"7"` alike).
    pub question_id: String,
    /// The question file gave the id as a number: it is written back as one, as LLaVA's scripts copy it.
    pub numeric_id: bool,
    pub prompt: String,
    pub text: String,
    pub answer_id: String,
    pub model_id: String,
    pub metadata: serde_json::Map<String, Value>,
    pub image_id: Option<String>,
    pub image: Option<String>,
    /// Where the row was read from (not part of the row).
    pub origin: Option<Origin>,
}

/// An [`Answer`] as a file holds it.
#[derive(Serialize, Deserialize)]
struct AnswerFile {
    question_id: Value,
    #[serde(default)]
    prompt: String,
    text: String,
    #[serde(default, deserialize_with = "flex_id")]
    answer_id: String,
    #[serde(default, deserialize_with = "flex_id")]
    model_id: String,
    #[serde(default)]
    metadata: serde_json::Map<String, Value>,
    #[serde(default, deserialize_with = "opt_flex_id", skip_serializing_if = "Option::is_none")]
    image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
}

impl TryFrom<AnswerFile> for Answer {
    type Error = String;
    fn try_from(f: AnswerFile) -> std::result::Result<Self, String> {
        Ok(Answer {
            question_id: id_string(&f.question_id)?,
            numeric_id: f.question_id.is_number(),
            prompt: f.prompt,
            text: f.text,
            answer_id: f.answer_id,
            model_id: f.model_id,
            metadata: f.metadata,
            image_id: f.image_id,
            image: f.image,
            origin: None,
        })
    }
}

impl From<Answer> for AnswerFile {
    fn from(a: Answer) -> Self {
        let numeric = a.numeric_id.then(|| a.question_id.parse::<i64>().ok()).flatten();
        AnswerFile {
            question_id: numeric.map_or_else(|| Value::String(a.question_id), Value::from),
            prompt: a.prompt,
            text: a.text,
            answer_id: a.answer_id,
            model_id: a.model_id,
            metadata: a.metadata,
            image_id: a.image_id,
            image: a.image,
        }
    }
}

impl Answer {
    /// An in-memory answer (what a generation loop produces); the other fields stay empty.
    pub fn new(question_id: impl Into<String>, prompt: impl Into<String>, text: impl Into<String>) -> Self {
        Answer {
            question_id: question_id.into(),
            numeric_id: false,
            prompt: prompt.into(),
            text: text.into(),
            answer_id: String::new(),
            model_id: String::new(),
            metadata: Default::default(),
            image_id: None,
            image: None,
            origin: None,
        }
    }
}

/// Reads an answers JSONL file; each row remembers its line.
pub fn load_answers(path: &Path) -> Result<Vec<Answer>> {
    let rows = jsonl::read_numbered::<Answer>(path)?;
    Ok(rows
        .into_iter()
        .map(|(line, mut a)| {
            a.origin = Some(Origin { path: path.to_path_buf(), line });
            a
        })
        .collect())
}

/// Maps each id to the index of its row; a repeated id is an error naming both rows.
pub fn index_unique<'a, T>(
    rows: &'a [T],
    id: impl Fn(&'a T) -> &'a str,
    origin: impl Fn(&'a T) -> Option<&'a Origin>,
    what: &str,
) -> Result<HashMap<&'a str, usize>> {
    let mut index = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if let Some(first) = index.insert(id(row), i) {
            let first = Origin::describe(origin(&rows[first]));
            let msg = format!("duplicate {what} {:?} (first seen at {first})", id(row));
            return Err(Origin::error(origin(row), msg));
        }
    }
    Ok(index)
}

/// Normalises an image reference to the key ground truth is stored under: the digits at the end of a file
/// name without leading zeros (`coco/val2014/COCO_val2014_000000391895.jpg` and `391895` both give
/// `391895`), or the file stem when it does not end in digits.
pub fn image_key(raw: &str) -> String {
    let name = raw.trim().rsplit(['/', '\\']).next().unwrap_or_default();
    let stem = match name.rsplit_once('.') {
        Some((stem, ext)) if !ext.is_empty() && ext.chars().all(|c| c.is_ascii_alphabetic()) => stem,
        _ => name,
    };
    let digits_from = stem.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let digits = &stem[digits_from..];
    if digits.is_empty() {
        return stem.to_string();
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Turns a JSON id (number or string) into a string: `7` and `"7"` both give `"7"`.
pub fn id_string(value: &Value) -> std::result::Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(format!("{}", f as i64)),
            _ => Err(format!("id {n} is not an integer")),
        },
        other => Err(format!("an id must be a number or a string, got {other}")),
    }
}

/// serde adapter for [`id_string`].
pub fn flex_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    id_string(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// serde adapter for an optional id (`null` counts as absent).
pub fn opt_flex_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => id_string(&v).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_numbers_and_strings() {
        let a: Answer = serde_json::from_str(r#"{"question_id": 7, "text": "Yes", "answer_id": "x"}"#).unwrap();
        let b: Answer = serde_json::from_str(r#"{"question_id": "7", "text": "Yes", "model_id": 3}"#).unwrap();
        assert_eq!(a.question_id, "7");
        assert_eq!(b.question_id, "7");
        assert_eq!(b.model_id, "3");
        assert!(serde_json::from_str::<Answer>(r#"{"question_id": [1], "text": ""}"#).is_err());
        assert!(serde_json::from_str::<Answer>(r#"{"question_id": 1.5, "text": ""}"#).is_err());
        assert!(serde_json::from_str::<Answer>(r#"{"text": "no id"}"#).is_err());
    }

    #[test]
    fn ids_are_written_back_as_the_file_gave_them() {
        for row in [
            r#"{"question_id":7,"prompt":"","text":"Yes","answer_id":"","model_id":"","metadata":{}}"#,
            r#"{"question_id":"7","prompt":"","text":"Yes","answer_id":"","model_id":"","metadata":{}}"#,
        ] {
            let a: Answer = serde_json::from_str(row).unwrap();
            assert_eq!(a.question_id, "7");
            assert_eq!(serde_json::to_string(&a).unwrap(), row);
        }
        assert_eq!(serde_json::to_value(Answer::new("7", "", "Yes")).unwrap()["question_id"], "7");
    }

    #[test]
    fn image_keys_normalise_file_names_and_numbers() {
        assert_eq!(image_key("coco/val2014/COCO_val2014_000000391895.jpg"), "391895");
        assert_eq!(image_key("391895"), "391895");
        assert_eq!(image_key("000000391895.jpg"), "391895");
        assert_eq!(image_key("0"), "0");
        assert_eq!(image_key("kitchen.png"), "kitchen");
        assert_eq!(image_key("scene_a"), "scene_a");
    }

    #[test]
    fn duplicate_ids_name_both_rows() {
        let rows = vec![Answer::new("1", "", "a"), Answer::new("1", "", "b")];
        let err = index_unique(&rows, |a| a.question_id.as_str(), |a| a.origin.as_ref(), "question_id");
        assert!(err.unwrap_err().to_string().contains("duplicate question_id \"1\""));
    }
}
