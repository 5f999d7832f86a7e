//! A loaded model folder: weights, tokenizer, image processor and chat template together, turning a question and
//! an image into prompt ids and a pixel tensor. Generation on it (`request`, `answer`) is in [`crate::generate`].

use std::path::Path;

use candle_core::Tensor;

use super::config::ModelConfig;
use super::{load, LoadOptions, Model};
use crate::text::template::{conversation_ids, prompt_ids, response_ids};
use crate::text::{Chat, PromptStyle, Template, Tokenizer};
use crate::vision::{AspectMode, ImageProcessor};
use crate::Result;

pub struct Vlm {
    pub model: Model,
    pub tok: Tokenizer,
    /// None for a text-only model.
    pub processor: Option<ImageProcessor>,
    /// The chat template around prompts (set with [`Vlm::set_template`]).
    pub chat: Chat,
    pub aspect: AspectMode,
    pub style: PromptStyle,
}

impl Vlm {
    /// Loads `dir` (weights, `tokenizer.json`, `preprocessor_config.json`). The folder's small files are read
    /// first, so a bad tokenizer, processor or chat template is refused before the weights are checked and mapped.
    pub fn load(dir: &Path, opts: &LoadOptions, template: Template) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let side = match &cfg {
            ModelConfig::Llava(c) if !opts.text_only => Some(c.vision.image_size),
            _ => None,
        };
        let (tok, processor, chat) = Self::folder_files(dir, &cfg.text().eos_ids(), side, template)?;
        let model = load(dir, opts)?;
        Ok(Vlm { model, tok, processor, chat, aspect: AspectMode::Pad, style: PromptStyle::Llava })
    }

    /// A loaded (or built) `model` with the tokenizer and image processor of the folder `dir`.
    pub fn from_model(model: Model, dir: &Path, template: Template) -> Result<Self> {
        let side = model.vision.as_ref().map(|v| v.cfg.vision.image_size);
        let (tok, processor, chat) = Self::folder_files(dir, &model.llm.cfg.eos_ids(), side, template)?;
        Ok(Vlm { model, tok, processor, chat, aspect: AspectMode::Pad, style: PromptStyle::Llava })
    }

    /// The tokenizer, the image processor (for a vision tower taking `side` x `side` images) and the chat template
    /// of the folder `dir`.
    fn folder_files(
        dir: &Path,
        eos_ids: &[u32],
        side: Option<usize>,
        template: Template,
    ) -> Result<(Tokenizer, Option<ImageProcessor>, Chat)> {
        let tok = Tokenizer::from_dir(dir, eos_ids)?;
        let processor = side.map(|side| ImageProcessor::for_tower(dir, side)).transpose()?;
        let chat = Chat::load(template, dir, &tok, processor.is_some())?;
        Ok((tok, processor, chat))
    }

    /// Switches to `template`, reading the folder `dir`'s own template for [`Template::Model`].
    pub fn set_template(&mut self, template: Template, dir: &Path) -> Result<()> {
        self.chat = Chat::load(template, dir, &self.tok, self.processor.is_some())?;
        Ok(())
    }

    /// Decodes and preprocesses an image file: (3, H, W).
    pub fn load_image(&self, path: &Path) -> Result<Tensor> {
        match &self.processor {
            Some(p) => p.load(path, self.aspect),
            None => crate::bail!("{}: this model has no vision tower, so it cannot take an image", path.display()),
        }
    }

    /// Prompt ids of `question` (rendered with the template; `<image>` expanded when `image` is given). A question
    /// far longer than the context is refused before it is rendered or tokenised.
    pub fn prompt_ids(&self, question: &str, image: bool) -> Result<Vec<u32>> {
        let context = self.model.llm.cfg.max_position_embeddings;
        if self.tok.surely_longer_than(question, context) {
            crate::bail!("a prompt of {} bytes cannot fit the model's context of {context} tokens", question.len());
        }
        let text = self.chat.render(question, image)?;
        prompt_ids(&self.tok, &text, self.style, self.image_slot(image))
    }

    /// Prompt ids of `question` after the earlier (question, answer) turns of a conversation, laid out as in
    /// training ([`conversation_ids`]: the image, if any, with the first question; answers closed by EOS). With no
    /// earlier turns this is [`Vlm::prompt_ids`].
    pub fn chat_ids(&self, earlier: &[(String, String)], question: &str, image: bool) -> Result<Vec<u32>> {
        if earlier.is_empty() {
            return self.prompt_ids(question, image);
        }
        let context = self.model.llm.cfg.max_position_embeddings;
        let pieces = earlier.iter().flat_map(|(q, a)| [q, a]).map(String::as_str).chain([question]);
        if let Some(long) = pieces.into_iter().find(|p| self.tok.surely_longer_than(p, context)) {
            crate::bail!("a message of {} bytes cannot fit the model's context of {context} tokens", long.len());
        }
        let (mut ids, _) = conversation_ids(&self.tok, &self.chat, self.style, earlier, self.image_slot(image))?;
        ids.extend(self.tok.encode(&self.chat.render_next(question)?)?);
        Ok(ids)
    }

    /// The image token and its count, when an image is given and the model takes one.
    fn image_slot(&self, image: bool) -> Option<(u32, usize)> {
        match (image, self.model.image_token()) {
            (true, Some(id)) => Some((id, self.model.image_tokens())),
            _ => None,
        }
    }

    /// Decodes and preprocesses the bytes of an image file (JPEG, PNG or WebP), as [`Vlm::load_image`] does a
    /// file's: (3, H, W). Errors are plain messages (there is no path to name).
    pub fn image_from_bytes(&self, bytes: &[u8]) -> Result<Tensor> {
        let Some(p) = &self.processor else {
            crate::bail!("this model has no vision tower, so it cannot take an image")
        };
        let image = crate::vision::decode_image(bytes, p.max_pixels, self.aspect).map_err(crate::Error::invalid)?;
        p.preprocess(&image, self.aspect)
    }

    /// Response ids per the prompt style (EOS appended in the LLaVA style).
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>> {
        response_ids(&self.tok, response, self.style)
    }
}
