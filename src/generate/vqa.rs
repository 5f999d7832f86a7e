//! LLaVA's `model_vqa` files: question rows in, answer rows out.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{jsonl, Error, Result};

/// A question row: `{question_id, image, text, ...}`; `line` is its 1-based line in the file.
#[derive(Debug, Clone)]
pub struct Question {
    pub question_id: Value,
    pub image: Option<String>,
    pub text: String,
    pub line: usize,
}

#[derive(Deserialize)]
struct RawQuestion {
    question_id: Value,
    #[serde(default)]
    image: Option<String>,
    text: String,
}

/// An answer row in LLaVA's format.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnswerRow {
    pub question_id: Value,
    pub prompt: String,
    pub text: String,
    pub answer_id: String,
    pub model_id: String,
    pub metadata: serde_json::Map<String, Value>,
}

pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let rows: Vec<(usize, RawQuestion)> = jsonl::read_numbered(path)?;
    let mut out = Vec::with_capacity(rows.len());
    for (line, r) in rows {
        if r.question_id.is_null() {
            return Err(Error::parse(path, Some(line), "question_id is null"));
        }
        out.push(Question { question_id: r.question_id, image: r.image, text: r.text, line });
    }
    Ok(out)
}

pub fn answer_row(q: &Question, text: &str, model_id: &str) -> AnswerRow {
    let id = match &q.question_id {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    AnswerRow { question_id: q.question_id.clone(), prompt: q.text.clone(), text: text.to_string(), answer_id: format!("{model_id}-{id}"), model_id: model_id.to_string(), metadata: Default::default() }
}

/// One prompt to answer from a data file: the question text, its image file, and where it came from (`file:line`)
/// so a bad image is reported against the line that named it.
pub struct Prompt {
    pub text: String,
    pub image: Option<std::path::PathBuf>,
    pub origin: String,
}

/// Answers `prompts` in batches of `batch_size` (images decoded per batch, so memory stays flat), calling
/// `progress(n)` after each batch. Answers are trimmed. A prompt that leaves no room for `max_new_tokens` in the
/// model's context is refused, naming its origin, before anything is generated.
pub fn answer_all(vlm: &super::Vlm, prompts: &[Prompt], params: &super::SamplingParams, batch_size: usize, pass: crate::model::Pass, mut progress: impl FnMut(usize)) -> Result<Vec<String>> {
    let context = vlm.model.llm.cfg.max_position_embeddings;
    for p in prompts {
        let ids = vlm.prompt_ids(&p.text, p.image.is_some())?;
        super::fits_context(ids.len(), params.max_new_tokens, context).map_err(|e| Error::invalid(format!("{}: {e}", p.origin)))?;
    }
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        let mut requests = Vec::with_capacity(chunk.len());
        for p in chunk {
            let image = match &p.image {
                Some(path) => Some(vlm.load_image(path).map_err(|e| Error::invalid(format!("{}: {e}", p.origin)))?),
                None => None,
            };
            requests.push(vlm.request(&p.text, image)?);
        }
        out.extend(vlm.answer(&requests, params, pass)?.into_iter().map(|c| c.text.trim().to_string()));
        progress(chunk.len());
    }
    Ok(out)
}
