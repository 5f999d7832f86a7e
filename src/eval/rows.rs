//! Rows shared by the evaluations: LLaVA answer rows (`model_vqa` JSONL), where a row came from, and the id
//! rules (ids may be numbers or strings in real files; both are normalised to strings).

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
pub struct Answer {
    #[serde(deserialize_with = "flex_id")]
    pub question_id: String,
    #[serde(default)]
    pub prompt: String,
    pub text: String,
    #[serde(default, deserialize_with = "flex_id")]
    pub answer_id: String,
    #[serde(default, deserialize_with = "flex_id")]
    pub model_id: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    #[serde(default, deserialize_with = "opt_flex_id", skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

impl Answer {
    /// An in-memory answer (what a generation loop produces); the other fields stay empty.
    pub fn new(question_id: impl Into<String>, prompt: impl Into<String>, text: impl Into<String>) -> Self {
        Answer {
            question_id: question_id.into(),
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
