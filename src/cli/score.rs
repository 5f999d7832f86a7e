//! `bpo score`: the summed log-probability of each response given its image and prompt.

use std::path::PathBuf;

use anyhow::Context;
use bpo::model::Pass;
use bpo::score::Example;
use serde_json::{Map, Value};

use super::{bars, ModelArgs};

/// Score responses: for each JSONL row with `prompt`, optional `image` and `response`, write the row back with
/// `logprob` (sum over the response tokens, EOS included in the LLaVA prompt style) and `tokens` (their count).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Input rows (JSONL with prompt, image?, response).
    #[arg(long)]
    data: PathBuf,
    /// Folder the rows' image paths are relative to.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Output JSONL: every input row plus `logprob` and `tokens`; replaced atomically when done (a link is
    /// followed; checked to be writable, and not the input, before scoring starts).
    #[arg(long)]
    out: PathBuf,
    /// Rows per forward pass, at least 1.
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    batch_size: usize,
    /// Tokenisation conventions: llava (BOS, response + EOS) or trl (no BOS/EOS, response as " {text} ", and the
    /// model folder's chat template unless --template says otherwise).
    #[arg(long, value_enum, default_value = "llava")]
    prompt_style: bpo::text::PromptStyle,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    bpo::output::check(&a.out, &[&a.data])?;
    let vlm = a.model.load_styled(a.prompt_style)?;
    let rows: Vec<(usize, Map<String, Value>)> = bpo::jsonl::read_numbered(&a.data)?;
    let mut examples = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let at = || format!("{}:{line}", a.data.display());
        let field = |k: &str| {
            row.get(k).and_then(Value::as_str).with_context(|| format!("{}: missing string field {k:?}", at()))
        };
        let (prompt, response) = (field("prompt")?, field("response")?);
        let image = match row.get("image").and_then(Value::as_str) {
            Some(rel) => Some(vlm.load_image(&bpo::data::image_path(a.images.as_deref(), rel)).with_context(at)?),
            None => None,
        };
        let prompt = vlm.prompt_ids(prompt, image.is_some()).with_context(at)?;
        let response = vlm.response_ids(response)?;
        let (total, context) = (prompt.len() + response.len(), vlm.model.llm.cfg.max_position_embeddings);
        anyhow::ensure!(
            total <= context,
            "{}: prompt + response of {total} tokens is longer than the model's context of {context}",
            at()
        );
        examples.push(Example { prompt, response, image });
    }
    let scores = bpo::score::score(&vlm.model, vlm.tok.pad, &examples, a.batch_size, Pass::INFER, &bars())?;
    let out: Vec<Map<String, Value>> = rows
        .into_iter()
        .zip(scores)
        .map(|((_, mut row), (lp, n))| {
            row.insert("logprob".into(), Value::from(lp as f64));
            row.insert("tokens".into(), Value::from(n));
            row
        })
        .collect();
    bpo::jsonl::write(&a.out, &out)?;
    errln!("scored {} rows into {}", out.len(), a.out.display());
    Ok(())
}
