//! `bpo generate`: answer one prompt, or a question file in LLaVA's `model_vqa` format.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bpo::generate::{vqa, SamplingParams};

use super::{image_path, progress, ModelArgs};

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
    /// Answers file to write (JSONL: question_id, prompt, text, answer_id, model_id, metadata).
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Prompts per batch (rows are left-padded), at least 1.
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    batch_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
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
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the answer contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams { max_new_tokens: self.max_new_tokens, temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed, stop: self.stop.clone() }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = a.sampling.params();
    match (&a.prompt, &a.questions) {
        (Some(prompt), None) => {
            let vlm = a.model.load()?;
            let image = a.image.as_deref().map(|p| vlm.load_image(p)).transpose()?;
            let req = vlm.request(prompt, image)?;
            let out = vlm.answer(&[req], &params, a.model.pass())?;
            println!("{}", out[0].text.trim());
            Ok(())
        }
        (None, Some(questions)) => {
            let answers = a.answers.as_ref().context("--answers is required with --questions")?;
            let vlm = a.model.load()?;
            let rows = vqa::read_questions(questions)?;
            let prompts: Vec<vqa::Prompt> = rows
                .iter()
                .map(|q| vqa::Prompt { text: q.text.clone(), image: q.image.as_deref().map(|rel| image_path(a.images.as_ref(), rel)), origin: format!("{}:{}", questions.display(), q.line) })
                .collect();
            let bar = progress(rows.len(), "answering");
            let texts = vqa::answer_all(&vlm, &prompts, &params, a.batch_size, a.model.pass(), |n| bar.inc(n as u64))?;
            bar.finish();
            let model_id = a.model.model_id();
            let out: Vec<vqa::AnswerRow> = rows.iter().zip(&texts).map(|(q, t)| vqa::answer_row(q, t, &model_id)).collect();
            bpo::jsonl::write(answers, &out)?;
            eprintln!("wrote {} answers to {}", out.len(), answers.display());
            Ok(())
        }
        _ => bail!("give either --prompt (with an optional --image) or --questions with --answers"),
    }
}
