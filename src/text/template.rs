//! Chat templates of LLaVA-1.5, the model folder's own template, and the assembly of prompt/response token ids (see
//! the module doc of [`crate::text`]).

use std::path::Path;

use super::chat::{ChatTemplate, SpecialTokens};
use super::Tokenizer;
use crate::{bail, Result};

/// The `<image>` placeholder in prompts.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// How a single-turn prompt is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Template {
    /// LLaVA-1.5 training and POPE evaluation: system text, then `" USER: <image>\n{q} ASSISTANT:"`.
    #[default]
    VicunaV1,
    /// llava-hf's chat template: `"USER: <image>\n{q} ASSISTANT:"`, no system text.
    LlavaHf,
    /// The text as given (base language models, continuation prompts).
    Plain,
    /// The chat template the model folder ships (`chat_template.jinja`, `chat_template.json` or
    /// `tokenizer_config.json`), rendered like transformers' `apply_chat_template`: see [`super::chat`].
    Model,
}

const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The Vicuna-v1 conversation around one user message, ready for the assistant's reply.
pub fn vicuna_v1(user: &str) -> String {
    format!("{VICUNA_SYSTEM} USER: {user} ASSISTANT:")
}

/// A template ready to render: a built-in one, or the model folder's own with the special tokens it may use.
#[derive(Debug, Clone)]
pub enum Chat {
    Builtin(Template),
    Model(Box<ChatTemplate>, SpecialTokens),
}

impl Chat {
    /// `template` for the model folder `dir` (read only for [`Template::Model`]). `parts`: the model takes images,
    /// so user messages are typed parts.
    pub fn load(template: Template, dir: &Path, tok: &Tokenizer, parts: bool) -> Result<Self> {
        Ok(match template {
            Template::Model => Chat::Model(Box::new(ChatTemplate::from_dir(dir, parts)?), tok.special_tokens()),
            t => Chat::Builtin(t),
        })
    }

    /// Which template this is.
    pub fn template(&self) -> Template {
        match self {
            Chat::Builtin(t) => *t,
            Chat::Model(..) => Template::Model,
        }
    }

    /// The prompt text up to where the answer starts. With `image`, the built-in templates open the user turn with
    /// `<image>\n` unless the question already holds the placeholder; the model's template places the image part
    /// itself.
    pub fn render(&self, question: &str, image: bool) -> Result<String> {
        let q = || {
            if image && !question.contains(IMAGE_PLACEHOLDER) {
                format!("{IMAGE_PLACEHOLDER}\n{question}")
            } else {
                question.to_string()
            }
        };
        Ok(match self {
            Chat::Builtin(Template::VicunaV1) => vicuna_v1(&q()),
            Chat::Builtin(Template::LlavaHf) => format!("USER: {} ASSISTANT:", q()),
            Chat::Builtin(Template::Plain) => q(),
            Chat::Model(t, special) => t.render(question, image, special)?,
            Chat::Builtin(Template::Model) => {
                bail!("--template model needs the model folder's template: load it with Chat::load")
            }
        })
    }

    /// A later user turn of a conversation, after an answer that ended with EOS (no system text, no image).
    pub fn render_next(&self, question: &str) -> Result<String> {
        Ok(match self.template() {
            Template::VicunaV1 | Template::LlavaHf => format!("USER: {question} ASSISTANT:"),
            Template::Plain => question.to_string(),
            Template::Model => bail!("multi-turn conversations with --template model are not supported yet: choose a built-in template (--template vicuna-v1|llava-hf|plain)"),
        })
    }
}

/// Whose tokenisation conventions to follow for (prompt, response) sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum PromptStyle {
    /// LLaVA's trainer (used by BPO): BOS first, responses end with EOS.
    #[default]
    Llava,
    /// TRL's vision DPO: no BOS, no EOS, each response encoded as `" {text} "`.
    Trl,
}

/// Ids of a rendered prompt: BOS (Llava style) + text, each `<image>` replaced by `image_tokens` copies of `image_id`.
///
/// The Llava style encodes the text around each `<image>` separately, like LLaVA's `tokenizer_image_token` (so a
/// Metaspace tokenizer puts a `▁` after the image block); the Trl style encodes the whole string in one call, like
/// the llava-hf processor that TRL runs (no `▁` there), when the tokenizer knows `<image>` as a token.
pub fn prompt_ids(tok: &Tokenizer, text: &str, style: PromptStyle, image: Option<(u32, usize)>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if style == PromptStyle::Llava {
        ids.extend(tok.bos);
    }
    let placeholder = tok.token_to_id(IMAGE_PLACEHOLDER);
    if let (PromptStyle::Trl, Some((id, n)), Some(p)) = (style, image, placeholder) {
        for t in tok.encode(text)? {
            if t == p {
                ids.extend(std::iter::repeat_n(id, n));
            } else {
                ids.push(t);
            }
        }
        return Ok(ids);
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

/// A multi-turn conversation as token ids with a target flag per id: the answers (with EOS in the Llava style) are
/// targets, everything else (BOS, system text, questions, image positions) is context. The first question gets the
/// image; later questions follow [`Chat::render_next`].
pub fn conversation_ids(
    tok: &Tokenizer,
    chat: &Chat,
    style: PromptStyle,
    turns: &[(String, String)],
    image: Option<(u32, usize)>,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let (mut ids, mut target) = (Vec::new(), Vec::new());
    for (i, (question, answer)) in turns.iter().enumerate() {
        let context = if i == 0 {
            prompt_ids(tok, &chat.render(question, image.is_some())?, style, image)?
        } else {
            tok.encode(&chat.render_next(question)?)?
        };
        let reply = response_ids(tok, answer, style)?;
        target.extend(std::iter::repeat_n(false, context.len()).chain(std::iter::repeat_n(true, reply.len())));
        ids.extend(context.into_iter().chain(reply));
    }
    Ok((ids, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::from_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer"), &[])
            .unwrap()
    }

    #[test]
    fn conversations_label_only_the_answers() {
        let tok = tok();
        let turns = [("What is it?".to_string(), "a cat".to_string()), ("Colour?".to_string(), "red".to_string())];
        let (ids, target) =
            conversation_ids(&tok, &Chat::Builtin(Template::LlavaHf), PromptStyle::Llava, &turns, Some((1022, 3)))
                .unwrap();
        let answers: Vec<u32> = ids.iter().zip(&target).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
        let mut want = tok.encode("a cat").unwrap();
        want.push(2);
        want.extend(tok.encode("red").unwrap());
        want.push(2);
        assert_eq!(answers, want, "answers with EOS are the only targets");
        assert_eq!(ids[0], 1, "BOS first");
        assert_eq!(ids.iter().filter(|&&i| i == 1022).count(), 3, "the image only in the first turn");
        assert!(!target[..ids.iter().position(|&i| i == 1022).unwrap() + 3].iter().any(|&t| t));
        let second_q = tok.encode("USER: Colour? ASSISTANT:").unwrap();
        assert!(ids.windows(second_q.len()).any(|w| w == second_q), "later turns follow render_next");
    }

    #[test]
    fn vicuna_wrapping() {
        assert_eq!(
            vicuna_v1("Hi"),
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
             detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:"
        );
    }

    #[test]
    fn trl_style_encodes_the_prompt_in_one_call() {
        let tok = tok();
        let text = Chat::Builtin(Template::LlavaHf).render("Hi", true).unwrap();
        let llava = prompt_ids(&tok, &text, PromptStyle::Llava, Some((1022, 2))).unwrap();
        let trl = prompt_ids(&tok, &text, PromptStyle::Trl, Some((1022, 2))).unwrap();
        assert_eq!(llava[0], 1);
        assert_ne!(trl[0], 1, "no BOS in the TRL style");
        // LLaVA's chunked encoding puts a "▁" after the image block; one-call encoding does not.
        assert_eq!(llava.len(), trl.len() + 2);
        assert_eq!(response_ids(&tok, "a cat", PromptStyle::Trl).unwrap(), tok.encode(" a cat ").unwrap());
    }
}
