//! `bpo generate`: answer one prompt, or a question file in LLaVA's `model_vqa` format.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bpo::data::{ResumableWriter, Shape};
use bpo::generate::{request_seed, vqa, EngineOptions, SamplingParams};

use super::{bars, ModelArgs};

/// Generate answers with a model folder: one prompt (`--prompt`, optional `--image`), or every row of a
/// question file (`--questions`, LLaVA `model_vqa` rows `{question_id, image, text}`) into an answers file.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image for the single prompt.
    #[arg(long, requires = "prompt")]
    image: Option<PathBuf>,
    /// One prompt to answer (printed to stdout).
    #[arg(long, conflicts_with = "questions")]
    prompt: Option<String>,
    /// Question file (JSONL: question_id, image, text).
    #[arg(long, requires = "answers")]
    questions: Option<PathBuf>,
    /// Folder that the question file's image paths are relative to.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Answers file (JSONL: question_id, prompt, text, answer_id, model_id, metadata), appended as answers are
    /// made: a rerun skips the questions it already answers, so a killed run continues where it stopped (delete
    /// the file to start over). A link is followed; one process at a time (a lock beside it).
    #[arg(long)]
    answers: Option<PathBuf>,
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How answers are batched (continuous batching: an answer that ends leaves the batch at once and the next prompt
/// takes its row).
#[derive(clap::Args, Debug, Clone)]
pub struct BatchArgs {
    /// Answers generated together at most, at least 1.
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    pub batch_size: usize,
    /// Token budget of the KV cache, shared by the answers in progress (each holds its prompt and
    /// --max-new-tokens); a prompt waits until it fits. Default: --batch-size times the model's context, never
    /// binding (the cache grows to what is used).
    #[arg(long, value_parser = super::range::at_least_one)]
    pub max_batch_tokens: Option<usize>,
}

impl BatchArgs {
    pub fn engine(&self) -> EngineOptions {
        EngineOptions::rows(self.batch_size, self.max_batch_tokens)
    }
}

/// Decoding options.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate per answer, at least 1.
    #[arg(long, default_value_t = 128, value_parser = super::range::at_least_one)]
    pub max_new_tokens: usize,
    /// Sampling temperature, >= 0; 0 means greedy.
    #[arg(long, default_value_t = 0.0, value_parser = super::range::non_negative::<f32>)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold, in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::range::top_p::<f32>)]
    pub top_p: f32,
    /// Random seed for sampling: each answer samples from a seed made of this one and its question id, so it
    /// does not depend on --batch-size, the file's order or an interruption.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the answer contains this string (repeatable; not empty).
    #[arg(long, value_parser = super::range::not_empty)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = a.sampling.params();
    match (&a.prompt, &a.questions) {
        (Some(prompt), None) => {
            let vlm = a.model.load()?;
            let image = a.image.as_deref().map(|p| vlm.load_image(p)).transpose()?;
            let req = vlm.request(prompt, image, &params, request_seed(params.seed, ""))?;
            let out = vlm.answer(vec![req], a.model.pass())?;
            outln!("{}", out[0].text.trim());
            Ok(())
        }
        (None, Some(questions)) => {
            let answers = a.answers.as_ref().context("--answers is required with --questions")?;
            let rows = vqa::read_questions(questions)?;
            bpo::output::check(answers, &[questions])?;
            if answers.exists() {
                vqa::check_same_model(answers, &a.model.model_id())?;
            }
            let vlm = a.model.load()?;
            let prompt = |q: &vqa::Question| vqa::Prompt {
                text: q.text.clone(),
                image: q.image.as_deref().map(|rel| bpo::data::image_path(a.images.as_deref(), rel)),
                origin: format!("{}:{}", questions.display(), q.line),
                id: q.key(),
            };
            // Every prompt fits before the answers file is opened: a refused run writes nothing.
            vqa::check_fit(&vlm, &rows.iter().map(prompt).collect::<Vec<_>>(), &params)?;
            let (mut writer, reopened) = ResumableWriter::open_as(answers, Shape::ANSWERS, &[questions])?;
            if let Some(t) = &reopened.torn {
                errln!("{}: cut a torn last line {} ({} bytes: {})", answers.display(), t.line, t.bytes, t.reason);
            }
            let c = vqa::answer_into(
                &vlm,
                &rows,
                prompt,
                &params,
                &a.batch.engine(),
                a.model.pass(),
                &a.model.model_id(),
                &mut writer,
                &bars(),
            )?;
            errln!("wrote {} answers to {} ({} were already there)", c.written, answers.display(), c.already_done);
            if c.other > 0 {
                errln!(
                    "  {} rows of {} answer questions that {} does not have (kept)",
                    c.other,
                    answers.display(),
                    questions.display()
                );
            }
            Ok(())
        }
        _ => bail!("give either --prompt (with an optional --image) or --questions with --answers"),
    }
}
