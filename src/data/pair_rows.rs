//! One preference pair as a JSON row, in the three layouts users have (docs/bootstrap.md, "`bpo pairs`"), and
//! back. Writing is exact; reading is lenient enough for files made by other tools.
//!
//! - `bpo`: `{"id", "prompt", "image"?, "chosen", "rejected", "chosen_type"?, "rejected_type"?}`.
//! - `trl` (vision, conversational): `{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type":
//!   "text", "text": ...}]}], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": ...}]}],
//!   "rejected": [...], "images": ["path"]}`. A text-only pair has no image part and `"images": []`.
//! - `llama-factory` (sharegpt, `"ranking": true`): `{"conversations": [{"from": "human", "value":
//!   "<image>..."}], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}, "images": ["path"]}`; the
//!   `<image>` tag is written only when there is an image, directly before the text (LLaMA-Factory's demo data).
//!
//! Reading tells the layout from each row: `conversations` → llama-factory; `prompt` as a list → TRL
//! conversational; `prompt` as a string → bpo or TRL plain strings (image from `image` or `images[0]`).
//! A row without `id` gets `"h"` + the stable hash of prompt, image, chosen and rejected.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::input::strip_image_tag;
use super::records::CompletionType;
use crate::hash::stable_hash;

/// One preference pair: a prompt (and image), a preferred and a dispreferred answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub chosen: String,
    pub rejected: String,
    /// Provenance of `chosen` (known for pairs made from records; absent in TRL/LLaMA-Factory files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_type: Option<CompletionType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_type: Option<CompletionType>,
}

/// Layout of a pair file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PairFormat {
    #[default]
    Bpo,
    Trl,
    #[cfg_attr(feature = "clap", value(alias = "llamafactory"))]
    LlamaFactory,
}

impl Pair {
    /// The pair as one row of `format`.
    pub fn to_row(&self, format: PairFormat) -> Value {
        let images: Vec<&str> = self.image.iter().map(String::as_str).collect();
        match format {
            PairFormat::Bpo => serde_json::to_value(self).unwrap_or(Value::Null),
            PairFormat::Trl => {
                let mut content = Vec::new();
                if self.image.is_some() {
                    content.push(json!({"type": "image"}));
                }
                content.push(json!({"type": "text", "text": self.prompt}));
                let answer = |text: &str| json!([{"role": "assistant", "content": [{"type": "text", "text": text}]}]);
                json!({
                    "prompt": [{"role": "user", "content": content}],
                    "chosen": answer(&self.chosen),
                    "rejected": answer(&self.rejected),
                    "images": images,
                })
            }
            PairFormat::LlamaFactory => {
                let tag = if self.image.is_some() { "<image>" } else { "" };
                json!({
                    "conversations": [{"from": "human", "value": format!("{tag}{}", self.prompt)}],
                    "chosen": {"from": "gpt", "value": self.chosen},
                    "rejected": {"from": "gpt", "value": self.rejected},
                    "images": images,
                })
            }
        }
    }

    /// Reads a row of any supported layout. The error is a message for the caller to place (file:line).
    pub fn from_row(row: &Value) -> std::result::Result<Pair, String> {
        let (prompt, image, chosen, rejected) = if row.get("conversations").is_some() {
            llama_factory_fields(row)?
        } else {
            match row.get("prompt") {
                Some(Value::String(p)) => flat_fields(row, p)?,
                Some(Value::Array(msgs)) => trl_fields(row, msgs)?,
                _ => return Err("no `prompt` (string or message list) and no `conversations`".into()),
            }
        };
        let id = match row.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => format!("h{:016x}", stable_hash(&[&prompt, image.as_deref().unwrap_or(""), &chosen, &rejected])),
        };
        let kind = |k: &str| row.get(k).and_then(Value::as_str).map(CompletionType::from);
        Ok(Pair {
            id,
            prompt,
            image,
            chosen,
            rejected,
            chosen_type: kind("chosen_type"),
            rejected_type: kind("rejected_type"),
        })
    }
}

type Fields = (String, Option<String>, String, String);

/// `bpo` rows and TRL plain-string rows.
fn flat_fields(row: &Value, prompt: &str) -> std::result::Result<Fields, String> {
    let text = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string).ok_or(format!("`{k}` is not a string"));
    let image = match row.get("image") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => first_image(row)?,
    };
    Ok((prompt.to_string(), image, text("chosen")?, text("rejected")?))
}

fn trl_fields(row: &Value, prompt: &[Value]) -> std::result::Result<Fields, String> {
    let users: Vec<&Value> =
        prompt.iter().filter(|m| m.get("role").and_then(Value::as_str) != Some("system")).collect();
    let [user] = users.as_slice() else {
        return Err(format!(
            "`prompt` has {} non-system messages; only single-turn prompts are supported",
            users.len()
        ));
    };
    let (text, image_parts) = message_text(user).map_err(|e| format!("prompt: {e}"))?;
    let image = first_image(row)?;
    if image_parts > 1 || (image_parts == 1 && image.is_none()) {
        return Err(format!("prompt has {image_parts} image parts but `images` has {}", usize::from(image.is_some())));
    }
    Ok((text, image, answer_text(row, "chosen")?, answer_text(row, "rejected")?))
}

/// Text of `chosen`/`rejected`: a plain string or a list of assistant messages (joined).
fn answer_text(row: &Value, key: &str) -> std::result::Result<String, String> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(msgs)) => {
            let parts: std::result::Result<Vec<_>, _> = msgs.iter().map(|m| message_text(m).map(|t| t.0)).collect();
            Ok(parts.map_err(|e| format!("{key}: {e}"))?.join("\n"))
        }
        _ => Err(format!("`{key}` is neither a string nor a message list")),
    }
}

/// A chat message's text (string content, or the text parts joined) and its number of image parts.
fn message_text(msg: &Value) -> std::result::Result<(String, usize), String> {
    match msg.get("content") {
        Some(Value::String(s)) => Ok((s.clone(), 0)),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            let mut images = 0;
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(p.get("text").and_then(Value::as_str).ok_or("text part without `text`")?)
                    }
                    Some("image") => images += 1,
                    other => return Err(format!("unsupported content part type {other:?}")),
                }
            }
            Ok((texts.join("\n"), images))
        }
        _ => Err("message without `content`".into()),
    }
}

fn llama_factory_fields(row: &Value) -> std::result::Result<Fields, String> {
    let turns = row.get("conversations").and_then(Value::as_array).ok_or("`conversations` is not a list")?;
    let human: Vec<&Value> = turns.iter().filter(|t| t.get("from").and_then(Value::as_str) != Some("system")).collect();
    let [turn] = human.as_slice() else {
        return Err(format!("`conversations` has {} turns; only single-turn prompts are supported", human.len()));
    };
    let value = |v: Option<&Value>, k: &str| {
        v.and_then(|t| t.get("value"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(format!("`{k}` has no string `value`"))
    };
    let prompt = value(Some(turn), "conversations")?;
    Ok((
        strip_image_tag(&prompt),
        first_image(row)?,
        value(row.get("chosen"), "chosen")?,
        value(row.get("rejected"), "rejected")?,
    ))
}

/// `images[0]`, refusing rows with more than one image.
fn first_image(row: &Value) -> std::result::Result<Option<String>, String> {
    match row.get("images") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) if list.len() <= 1 => match list.first() {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err("`images` entry is not a path string".into()),
        },
        Some(Value::Array(list)) => Err(format!("{} images in one row; only one is supported", list.len())),
        Some(_) => Err("`images` is not a list".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(image: Option<&str>) -> Pair {
        Pair {
            id: "r#0/0-1".into(),
            prompt: "What is on the table?".into(),
            image: image.map(str::to_string),
            chosen: "A cup.".into(),
            rejected: "A cup and a fork.".into(),
            chosen_type: Some(CompletionType::Gt),
            rejected_type: Some(CompletionType::LlmHal),
        }
    }

    #[test]
    fn exact_shapes() {
        let p = pair(Some("coco/1.jpg"));
        assert_eq!(
            p.to_row(PairFormat::Bpo),
            json!({"id": "r#0/0-1", "prompt": "What is on the table?", "image": "coco/1.jpg", "chosen": "A cup.",
                   "rejected": "A cup and a fork.", "chosen_type": "gt", "rejected_type": "llm-hal"})
        );
        assert_eq!(
            p.to_row(PairFormat::Trl),
            json!({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]}],
                   "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cup."}]}],
                   "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cup and a fork."}]}],
                   "images": ["coco/1.jpg"]})
        );
        assert_eq!(
            p.to_row(PairFormat::LlamaFactory),
            json!({"conversations": [{"from": "human", "value": "<image>What is on the table?"}],
                   "chosen": {"from": "gpt", "value": "A cup."}, "rejected": {"from": "gpt", "value": "A cup and a fork."},
                   "images": ["coco/1.jpg"]})
        );
        let t = pair(None).to_row(PairFormat::Trl);
        assert_eq!(t["prompt"][0]["content"], json!([{"type": "text", "text": "What is on the table?"}]));
        assert_eq!(t["images"], json!([]));
        assert!(pair(None).to_row(PairFormat::Bpo).get("image").is_none());
    }

    #[test]
    fn rows_read_back() {
        for image in [Some("coco/1.jpg"), None] {
            let p = pair(image);
            assert_eq!(Pair::from_row(&p.to_row(PairFormat::Bpo)).unwrap(), p);
            for f in [PairFormat::Trl, PairFormat::LlamaFactory] {
                let back = Pair::from_row(&p.to_row(f)).unwrap();
                assert_eq!(
                    (&back.prompt, &back.image, &back.chosen, &back.rejected),
                    (&p.prompt, &p.image, &p.chosen, &p.rejected)
                );
                assert_eq!((back.chosen_type, back.id.len()), (None, 17), "{f:?}");
            }
        }
    }

    #[test]
    fn trl_plain_strings_and_errors() {
        let p = Pair::from_row(&json!({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["x.jpg"]})).unwrap();
        assert_eq!((p.prompt.as_str(), p.image.as_deref()), ("q", Some("x.jpg")));
        let two_turns = json!({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x", "rejected": "y"});
        assert!(Pair::from_row(&two_turns).unwrap_err().contains("single-turn"));
        let no_image = json!({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], "chosen": "x", "rejected": "y"});
        assert!(Pair::from_row(&no_image).unwrap_err().contains("image"));
        assert!(Pair::from_row(&json!({"chosen": "x"})).is_err());
        assert!(Pair::from_row(&json!({"prompt": "q", "chosen": 3, "rejected": "y"})).unwrap_err().contains("chosen"));
    }
}
