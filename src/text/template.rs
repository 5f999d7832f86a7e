//! Chat templates of LLaVA-1.5 and the assembly of prompt/response token ids (see the module doc of [`crate::text`]).

use super::Tokenizer;
use crate::Result;

/// The `<image>` placeholder in prompts.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// How a single-turn prompt is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Template {
    /// LLaVA-1.5 training and POPE evaluation: system text, then `" USER: <image>\n{q} ASSISTANT:"`.
    #[default]
    VicunaV1,
    /// llava-hf's chat template: `"USER: <image>\n{q} ASSISTANT:"`, no system text.
    LlavaHf,
    /// The text as given (base language models, continuation prompts).
    Plain,
}

const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

impl Template {
    /// The prompt text up to and including `ASSISTANT:`. With `image`, `<image>\n` opens the user turn unless the
    /// question already holds the placeholder.
    pub fn render(self, question: &str, image: bool) -> String {
        let q = if image && !question.contains(IMAGE_PLACEHOLDER) { format!("{IMAGE_PLACEHOLDER}\n{question}") } else { question.to_string() };
        match self {
            Template::VicunaV1 => format!("{VICUNA_SYSTEM} USER: {q} ASSISTANT:"),
            Template::LlavaHf => format!("USER: {q} ASSISTANT:"),
            Template::Plain => q,
        }
    }
}

/// Whose tokenisation conventions to follow for (prompt, response) sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PromptStyle {
    /// LLaVA's trainer (used by BPO): BOS first, responses end with EOS.
    #[default]
    Llava,
    /// TRL's vision DPO: no BOS, no EOS, each response encoded as `" {text} "`.
    Trl,
}

/// Ids of a rendered prompt: BOS (Llava style) + text, each `<image>` replaced by `image_tokens` copies of `image_id`.
pub fn prompt_ids(tok: &Tokenizer, text: &str, style: PromptStyle, image: Option<(u32, usize)>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if style == PromptStyle::Llava {
        ids.extend(tok.bos);
    }
    for (i, part) in text.split(IMAGE_PLACEHOLDER).enumerate() {
        if i > 0 {
            if let Some((id, n)) = image {
                ids.extend(std::iter::repeat_n(id, n));
            } else {
                ids.extend(tok.encode(IMAGE_PLACEHOLDER)?);
            }
        }
        if !part.is_empty() {
            ids.extend(tok.encode(part)?);
        }
    }
    Ok(ids)
}

/// Ids of a response, per `style`.
pub fn response_ids(tok: &Tokenizer, response: &str, style: PromptStyle) -> Result<Vec<u32>> {
    match style {
        PromptStyle::Llava => {
            let mut ids = tok.encode(response)?;
            ids.extend(tok.eos.first());
            Ok(ids)
        }
        PromptStyle::Trl => tok.encode(&format!(" {response} ")),
    }
}
