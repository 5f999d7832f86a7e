//! `bpo bootstrap ...`: make negatives for BPO records. `inject` rewrites ground-truth answers with a
//! text-only LLM behind an OpenAI-compatible server (error injection, `llm-hal`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bpo::bootstrap::{
    read_input, run_inject, Completer, CompletionOptions, Endpoint, HttpCompleter, HttpOptions, InjectMode,
    InjectOptions, InputFormat, InputOptions, ResumableWriter, Shard,
};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BootstrapArgs {
    #[command(subcommand)]
    command: BootstrapCommand,
}

#[derive(Subcommand)]
enum BootstrapCommand {
    /// Error injection: a text-only LLM rewrites each ground-truth answer, adding, removing or changing
    /// objects and attributes while keeping it plausible; the results are `llm-hal` negatives.
    ///
    /// Reads LLaVA instruct JSON, plain JSONL ({prompt, image, answer, id?}) or BPO records (to add more
    /// negatives), and appends one BPO record per prompt to --out. The output is resumable: run the same
    /// command again after an interruption and it continues where it stopped (records whose requests failed
    /// are retried). Split a large run with --shard 1/4 ... 4/4 and merge the outputs with `bpo pairs`.
    Inject(Box<InjectArgs>),
}

#[derive(Args)]
pub struct InjectArgs {
    /// OpenAI-compatible server: root (http://127.0.0.1:8080), .../v1, or the full endpoint URL.
    /// llama.cpp's llama-server, vLLM and Ollama work; plain http only.
    #[arg(long)]
    llm_url: Option<String>,
    /// Use /v1/chat/completions (the server applies its chat template) instead of /v1/completions (bpo wraps
    /// the prompt in the Vicuna-v1 conversation itself).
    #[arg(long)]
    chat: bool,
    /// With /v1/completions, send the prompt without the Vicuna-v1 wrapper.
    #[arg(long)]
    raw: bool,
    /// Model name sent with each request (required by vLLM and Ollama, ignored by llama.cpp).
    #[arg(long)]
    model: Option<String>,
    /// Environment variable holding an API key, sent as a Bearer token if set.
    #[arg(long, default_value = "BPO_LLM_API_KEY")]
    api_key_env: String,
    /// Input: LLaVA instruct JSON, plain JSONL or BPO records JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Input format: auto (detect from the content), llava, jsonl or records.
    #[arg(long, default_value = "auto")]
    format: InputFormat,
    /// LLaVA input: use only the first question/answer of each conversation.
    #[arg(long)]
    first_turn_only: bool,
    /// Output BPO records (JSONL, appended; existing ids are skipped).
    #[arg(long)]
    out: PathBuf,
    /// Prompt: description (zero-shot rewrite), qa (six-shot, question and response), or continue (cut the
    /// answer at a random word and let the LLM finish it from its own prior; needs /v1/completions).
    #[arg(long, default_value = "description")]
    mode: InjectMode,
    /// Replace the built-in prompt with this file's text; placeholders {answer} (required) and {question}.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Extra stop string (repeatable); `</s>` and the mode's own are always used.
    #[arg(long)]
    stop: Vec<String>,
    /// Negatives asked per prompt.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Records per batch (each record is written when its batch is done).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Time limit of one request, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Retries of a request after a connection error, timeout, 5xx or 429 (exponential back-off from 1 s).
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Process only shard i of n (1-based, e.g. 2/4); shards split the ids by a stable hash.
    #[arg(long)]
    shard: Option<Shard>,
    /// Seed: sent to the server (sample s uses seed + s) and used for the `continue` cut points.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    match args.command {
        BootstrapCommand::Inject(a) => inject(*a),
    }
}

/// The text LLM to use.
fn completer(a: &InjectArgs) -> anyhow::Result<Box<dyn Completer>> {
    let Some(url) = &a.llm_url else { bail!("give --llm-url (an OpenAI-compatible server)") };
    if a.chat && a.mode == InjectMode::Continue {
        bail!("--mode continue needs /v1/completions: drop --chat");
    }
    let opts = HttpOptions {
        url: url.clone(),
        endpoint: if a.chat { Endpoint::Chat } else { Endpoint::Completions },
        model: a.model.clone(),
        api_key: std::env::var(&a.api_key_env).ok().filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(a.timeout_s),
        retries: a.retries,
        concurrency: a.concurrency,
        ..Default::default()
    };
    Ok(Box::new(HttpCompleter::new(opts)?))
}

fn inject(a: InjectArgs) -> anyhow::Result<()> {
    let completer = completer(&a)?;
    let template = match &a.prompt_file {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let input = read_input(&a.data, &InputOptions { format: a.format, first_turn_only: a.first_turn_only })?;
    eprintln!("{}: {} records ({:?})", a.data.display(), input.records.len(), input.format);
    if input.renamed_duplicates > 0 {
        eprintln!("  {} repeated ids got a ~n suffix", input.renamed_duplicates);
    }
    let (mut writer, reopened) = ResumableWriter::open(&a.out)?;
    if let Some(t) = &reopened.torn {
        eprintln!("{}: cut a torn last line {} ({} bytes: {})", a.out.display(), t.line, t.bytes, t.reason);
    }
    let opts = InjectOptions {
        mode: a.mode,
        template,
        vicuna: !a.chat && !a.raw,
        completion: CompletionOptions {
            temperature: a.temperature,
            top_p: a.top_p,
            max_tokens: a.max_tokens,
            stop: a.stop.clone(),
            seed: a.seed,
        },
        samples: a.samples,
        batch_size: a.batch,
        shard: a.shard.unwrap_or_default(),
        seed: a.seed.unwrap_or(0),
        progress: true,
        ..Default::default()
    };
    let counts = run_inject(input.records, completer.as_ref(), &opts, &mut writer)?;
    println!("{}", serde_json::to_string_pretty(&counts)?);
    if counts.records.failed > 0 {
        bail!(
            "{} records failed and were not written; run the same command again to retry them",
            counts.records.failed
        );
    }
    Ok(())
}
