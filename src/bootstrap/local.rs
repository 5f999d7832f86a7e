//! A local text-only LLM as an error-injection [`Completer`]: a Llama folder, or the language model of a LLaVA
//! folder (BPO's default: the MLLM's own LLM, without the image), run in-process.
//!
//! - Prompts are used as given ([`Template::Plain`], BOS first): [`super::inject`] builds its own Vicuna-v1
//!   wrapper, and `continue` prompts must stay raw.
//! - The output is the text that follows the prompt, leading space included (decoded as part of prompt +
//!   continuation, since a Llama decoder drops the first space of a text), so `continue` mode glues it to the cut
//!   ground truth correctly; it is cut at the first stop string.
//! - Sampling is seeded per prompt by a hash of (seed, prompt), so a prompt gets the same output in any batch.
//! - `max_tokens` is cut to what the context leaves after each prompt; a prompt that fills the context gets its
//!   own error (which [`super::run_inject`] counts as unparseable) while the others are answered.
//! - The prompts of one call run through one generation engine (continuous batching, `batch` rows).

use std::path::Path;

use super::inject::{cut_at_stops, Completer, CompletionOptions};
use crate::generate::{generate, EngineOptions, Request, SamplingParams};
use crate::hash::stable_hash;
use crate::model::Vlm;
use crate::model::{LoadOptions, Pass};
use crate::text::{Chat, Template};
use crate::{Error, Result};

/// An in-process language model answering [`Completer`] requests.
pub struct LocalCompleter {
    pub vlm: Vlm,
    /// How the prompts of one call are batched (rows, cache budget).
    pub batch: EngineOptions,
}

impl LocalCompleter {
    /// Loads the language model of `dir` (a LLaVA folder's Llama part, or a plain Llama folder) with `opts`'s
    /// precision and device; the vision tower, if any, is not loaded.
    pub fn load(dir: &Path, opts: &LoadOptions, batch_size: usize) -> Result<Self> {
        let opts = LoadOptions { text_only: true, ..opts.clone() };
        Ok(Self::new(Vlm::load(dir, &opts, Template::Plain)?, batch_size))
    }

    /// Wraps a loaded model; its template is set to [`Template::Plain`].
    pub fn new(mut vlm: Vlm, batch_size: usize) -> Self {
        vlm.chat = Chat::Builtin(Template::Plain);
        LocalCompleter { vlm, batch: EngineOptions::rows(batch_size.max(1), None) }
    }

    /// The text `new` adds after `prompt`, as the tokenizer writes it in context.
    fn continuation(&self, prompt: &[u32], new: &[u32]) -> Result<String> {
        let head = self.vlm.tok.decode(prompt)?;
        let full = self.vlm.tok.decode(&[prompt, new].concat())?;
        match full.strip_prefix(head.as_str()) {
            Some(tail) => Ok(tail.to_string()),
            None => self.vlm.tok.decode(new),
        }
    }

    /// Answers prompts that fit the context on one engine; `Ok` outputs in the order given.
    fn run(&self, jobs: &[(usize, Vec<u32>)], prompts: &[String], opts: &CompletionOptions) -> Result<Vec<String>> {
        let context = self.vlm.model.llm.cfg.max_position_embeddings;
        let seed = opts.seed.unwrap_or(0).to_string();
        let requests = jobs
            .iter()
            .map(|(i, ids)| Request {
                ids: ids.clone(),
                params: SamplingParams {
                    max_new_tokens: opts.max_tokens.min(context - ids.len()).max(1),
                    temperature: opts.temperature,
                    top_p: opts.top_p,
                    stop: opts.stop.clone(),
                    ..Default::default()
                },
                seed: stable_hash(&["local", &seed, &prompts[*i]]),
                ..Default::default()
            })
            .collect();
        let done = generate(&self.vlm.model, &self.vlm.tok, requests, &self.batch, Pass::INFER)?;
        jobs.iter()
            .zip(done)
            .map(|((_, ids), c)| Ok(cut_at_stops(&self.continuation(ids, &c.ids)?, &opts.stop).to_string()))
            .collect()
    }
}

impl Completer for LocalCompleter {
    fn complete(&self, prompts: &[String], opts: &CompletionOptions) -> Result<Vec<Result<String>>> {
        let context = self.vlm.model.llm.cfg.max_position_embeddings;
        let mut replies: Vec<Option<Result<String>>> = Vec::with_capacity(prompts.len());
        let mut jobs = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let ids = self.vlm.prompt_ids(prompt, false)?;
            if ids.len() >= context {
                let msg = format!("prompt of {} tokens fills the model's context of {context}", ids.len());
                replies.push(Some(Err(Error::invalid(msg))));
            } else {
                replies.push(None);
                jobs.push((i, ids));
            }
        }
        let texts = self.run(&jobs, prompts, opts)?;
        for ((i, _), text) in jobs.iter().zip(texts) {
            replies[*i] = Some(Ok(text));
        }
        Ok(replies.into_iter().map(|r| r.unwrap_or_else(|| Err(Error::invalid("no output")))).collect())
    }
}
