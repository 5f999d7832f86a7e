//! `bpo bootstrap ...`: make negatives for BPO records. `weaken` has the MLLM answer from noised images
//! (`mllm-hal`); `inject` rewrites ground-truth answers with a text-only LLM, run in-process (`--llm DIR`) or
//! behind an OpenAI-compatible server (`--llm-url`) (`llm-hal`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bpo::bootstrap::{
    run_inject, run_weaken, Completer, CompletionOptions, DecodeMode, Endpoint, HttpCompleter, HttpOptions, InjectMode,
    InjectOptions, LocalCompleter, WeakenOptions,
};
use bpo::data::{read_input, InputFormat, InputOptions, Record, ResumableWriter, Shape, Shard};
use clap::{Args, Subcommand};

use super::{ModelArgs, RuntimeArgs};

#[derive(Args)]
pub struct BootstrapArgs {
    #[command(subcommand)]
    command: BootstrapCommand,
}

#[derive(Subcommand)]
enum BootstrapCommand {
    /// Image weakening: the MLLM answers each prompt while seeing its image noised by forward diffusion
    /// (step --noise-step of 1000 on the normalised pixels); the answers are `mllm-hal` negatives.
    ///
    /// Reads LLaVA instruct JSON, plain JSONL ({prompt, image, answer, id?}) or BPO records, and appends one BPO
    /// record per prompt to --out with --samples new answers each (empty answers, the ground truth and repeats
    /// are dropped and counted). Text-only prompts are passed through unchanged. Noise and sampling are seeded
    /// by (--seed, record id, sample), so a re-run gives the same answers. Resumable and shardable like inject.
    Weaken(Box<WeakenArgs>),
    /// Error injection: a text-only LLM rewrites each ground-truth answer, adding, removing or changing
    /// objects and attributes while keeping it plausible; the results are `llm-hal` negatives.
    ///
    /// Reads LLaVA instruct JSON, plain JSONL ({prompt, image, answer, id?}) or BPO records (to add more
    /// negatives), and appends one BPO record per prompt to --out. The output is resumable: run the same
    /// command again after an interruption and it continues where it stopped (records whose requests failed
    /// are retried). Split a large run with --shard 1/4 ... 4/4 and merge the outputs with `bpo pairs`.
    Inject(Box<InjectArgs>),
}

/// How the next token is chosen from the noisy (and clean) image's logits.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Decode {
    /// Sample from the model given the noised image (the paper's intent).
    Noisy,
    /// Amplify the language prior: (1 + a) * logit(noisy) - a * logit(clean), a = --contrast-alpha.
    PriorContrast,
    /// The released script's VCD sampler: (1 + alpha) * logit(clean) - alpha * logit(noisy), tokens below
    /// --vcd-beta times the clean top probability cut; for comparison.
    Vcd,
}

impl Decode {
    /// The decoding mode with its parameters: `a` for prior-contrast, `alpha` and `beta` for vcd.
    pub(super) fn mode(self, a: f32, alpha: f32, beta: f32) -> DecodeMode {
        match self {
            Decode::Noisy => DecodeMode::Noisy,
            Decode::PriorContrast => DecodeMode::PriorContrast { a },
            Decode::Vcd => DecodeMode::Vcd { alpha, beta },
        }
    }
}

/// Input records and the resumable output file, shared by both bootstrap steps.
#[derive(Args)]
pub struct RecordsIo {
    /// Input: LLaVA instruct JSON, plain JSONL or BPO records JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Input format: auto (detect from the content), llava, jsonl or records.
    #[arg(long, default_value = "auto")]
    format: InputFormat,
    /// LLaVA input: use only the first question/answer of each conversation.
    #[arg(long)]
    first_turn_only: bool,
    /// Output BPO records (JSONL, appended; existing ids are skipped, a torn last line is cut). A link is
    /// followed; one process at a time (a lock file beside it names the holder); the input is refused as output.
    #[arg(long)]
    out: PathBuf,
}

impl RecordsIo {
    fn open(&self) -> anyhow::Result<(Vec<bpo::data::Record>, ResumableWriter)> {
        open(&self.data, self.format, self.first_turn_only, &self.out)
    }
}

#[derive(Args)]
pub struct WeakenArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    io: RecordsIo,
    /// Folder that the records' image paths are relative to.
    #[arg(long)]
    images: PathBuf,
    /// Answers per prompt, each from its own noise, at least 1.
    #[arg(long, default_value_t = 1, value_parser = super::range::at_least_one)]
    samples: usize,
    /// Diffusion step of the noise, 0..=999 (BPO's release: 900; VCD and POVID: 500). See `bpo distort`.
    #[arg(long, default_value_t = 900, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=999))]
    noise_step: usize,
    /// Decoding: noisy, prior-contrast or vcd (the contrast modes also run the clean image, twice the work).
    #[arg(long, value_enum, default_value = "noisy")]
    decode: Decode,
    /// a of prior-contrast.
    #[arg(long, default_value_t = 1.0)]
    contrast_alpha: f32,
    /// alpha of vcd.
    #[arg(long, default_value_t = 1.0)]
    vcd_alpha: f32,
    /// Plausibility cut-off of vcd, in (0, 1].
    #[arg(long, default_value_t = 0.2, value_parser = super::range::top_p::<f32>)]
    vcd_beta: f32,
    /// Sampling temperature, >= 0; 0 means greedy (then --samples differ by their noise only).
    #[arg(long, default_value_t = 0.2, value_parser = super::range::non_negative::<f32>)]
    temperature: f32,
    /// Nucleus sampling mass, in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::range::top_p::<f32>)]
    top_p: f32,
    /// Most new tokens per answer (cut to what the model's context leaves), at least 1.
    #[arg(long, default_value_t = 1024, value_parser = super::range::at_least_one)]
    max_new_tokens: usize,
    /// Answers generated together at most, at least 1 (1 = no batching; continuous batching: an answer that ends
    /// leaves at once and the next one takes its row).
    #[arg(long, default_value_t = 8, value_parser = super::range::at_least_one)]
    batch_size: usize,
    /// Token budget of the KV cache shared by the answers in progress (each holds its prompt and
    /// --max-new-tokens, twice with a contrast mode); an answer waits until it fits. Default: never binding.
    #[arg(long, value_parser = super::range::at_least_one)]
    max_batch_tokens: Option<usize>,
    /// Process only shard i of n (1-based, e.g. 2/4); shards split the ids by a stable hash.
    #[arg(long)]
    shard: Option<Shard>,
    /// Seed of the noise and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct InjectArgs {
    /// Local model folder to run in-process: a LLaVA folder (its language model, without the image: BPO's
    /// default, the MLLM's own LLM) or a Llama folder. Prompts are wrapped in Vicuna-v1 unless --raw.
    #[arg(long, conflicts_with_all = ["llm_url", "chat", "server_model"])]
    llm: Option<PathBuf>,
    /// Where --llm runs and in which precision.
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// OpenAI-compatible server: root (http://127.0.0.1:8080), .../v1, or the full endpoint URL.
    /// llama.cpp's llama-server, vLLM and Ollama work; https too.
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
    server_model: Option<String>,
    /// Environment variable holding an API key, sent as a Bearer token if set.
    #[arg(long, default_value = "BPO_LLM_API_KEY")]
    api_key_env: String,
    #[command(flatten)]
    io: RecordsIo,
    /// Prompt: description (zero-shot rewrite), qa (six-shot, question and response), or continue (cut the
    /// answer at a random word and let the LLM finish it from its own prior; needs /v1/completions).
    #[arg(long, default_value = "description")]
    mode: InjectMode,
    /// Replace the built-in prompt with this file's text; placeholders {answer} (required) and {question}.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Sampling temperature, >= 0.
    #[arg(long, default_value_t = 0.8, value_parser = super::range::non_negative::<f32>)]
    temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 0.95, value_parser = super::range::top_p::<f32>)]
    top_p: f32,
    /// Most new tokens per answer, at least 1.
    #[arg(long, default_value_t = 1024, value_parser = super::range::at_least_one)]
    max_tokens: usize,
    /// Extra stop string (repeatable; not empty); `</s>` and the mode's own are always used.
    #[arg(long, value_parser = super::range::not_empty)]
    stop: Vec<String>,
    /// Negatives asked per prompt, at least 1.
    #[arg(long, default_value_t = 1, value_parser = super::range::at_least_one)]
    samples: usize,
    /// Requests in flight at once, at least 1.
    #[arg(long, default_value_t = 4, value_parser = super::range::at_least_one)]
    concurrency: usize,
    /// Records per batch, at least 1 (each record is written when its batch is done); with --llm also the most
    /// prompts generated together (continuous batching within each batch of records).
    #[arg(long, default_value_t = 32, value_parser = super::range::at_least_one)]
    batch: usize,
    /// With --llm: token budget of the KV cache shared by the prompts in progress (each holds its prompt and
    /// --max-tokens); a prompt waits until it fits. Default: never binding.
    #[arg(long, requires = "llm", value_parser = super::range::at_least_one)]
    max_batch_tokens: Option<usize>,
    /// Total time limit of one request attempt, in seconds, in [1, 86400]: connecting (at most 10 s), sending and
    /// reading the whole reply. A slow server or a long --max-tokens may need more; each retry gets the same again.
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = super::range::timeout)]
    timeout_s: Duration,
    /// Retries of a request after a connection error, timeout, 5xx, 429, or a reply that is not the endpoint's
    /// JSON with a non-empty text (HTML, malformed, no `choices`, `null`, over 4 MiB); exponential back-off from
    /// 1 s. A request that still fails leaves its record unwritten: the run ends with an error and a rerun
    /// retries it.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Process only shard i of n (1-based, e.g. 2/4); shards split the ids by a stable hash.
    #[arg(long)]
    shard: Option<Shard>,
    /// Seed: sent to the server or used by --llm (sample s uses seed + s), and for the `continue` cut points.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    match args.command {
        BootstrapCommand::Weaken(a) => weaken(*a),
        BootstrapCommand::Inject(a) => inject(*a),
    }
}

/// The text LLM to use.
fn completer(a: &InjectArgs) -> anyhow::Result<Box<dyn Completer>> {
    if let Some(dir) = &a.llm {
        return local_llm(a, dir);
    }
    let Some(url) = &a.llm_url else {
        bail!("give --llm DIR (a local model folder) or --llm-url URL (an OpenAI-compatible server)")
    };
    if a.chat && a.mode == InjectMode::Continue {
        bail!("--mode continue needs /v1/completions: drop --chat");
    }
    let opts = HttpOptions {
        url: url.clone(),
        endpoint: if a.chat { Endpoint::Chat } else { Endpoint::Completions },
        model: a.server_model.clone(),
        api_key: bpo::http::api_key_from_env(&a.api_key_env)?,
        timeout: a.timeout_s,
        retries: a.retries,
        concurrency: a.concurrency,
        ..Default::default()
    };
    Ok(Box::new(HttpCompleter::new(opts)?))
}

/// `dir` run in-process as the text LLM, on --device, batched by --batch and --max-batch-tokens.
fn local_llm(a: &InjectArgs, dir: &std::path::Path) -> anyhow::Result<Box<dyn Completer>> {
    let opts = bpo::model::LoadOptions::new(&a.runtime.runtime()?);
    let mut local = LocalCompleter::load(dir, &opts, a.batch).with_context(|| format!("loading {}", dir.display()))?;
    local.batch.max_batch_tokens = a.max_batch_tokens;
    Ok(Box::new(local))
}

impl InjectArgs {
    /// The options of the run (the --prompt-file read).
    pub(super) fn options(&self) -> anyhow::Result<InjectOptions> {
        let template = match &self.prompt_file {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(InjectOptions {
            mode: self.mode,
            template,
            vicuna: !self.chat && !self.raw,
            completion: CompletionOptions {
                temperature: self.temperature,
                top_p: self.top_p,
                max_tokens: self.max_tokens,
                stop: self.stop.clone(),
                seed: self.seed,
            },
            samples: self.samples,
            batch_size: self.batch,
            shard: self.shard.unwrap_or_default(),
            seed: self.seed.unwrap_or(0),
            ..Default::default()
        })
    }

    /// The text LLM of `bpo loop`'s rounds: --llm or --llm-url when given, else the round's `policy` folder (BPO's
    /// default: the MLLM's own language model).
    pub(super) fn completer_for(&self, policy: &std::path::Path) -> anyhow::Result<Box<dyn Completer>> {
        match (&self.llm, &self.llm_url) {
            (None, None) => local_llm(self, policy),
            _ => completer(self),
        }
    }
}

fn inject(a: InjectArgs) -> anyhow::Result<()> {
    let completer = completer(&a)?;
    let opts = a.options()?;
    let (records, mut writer) = a.io.open()?;
    let counts = run_inject(records, completer.as_ref(), &opts, &mut writer, &records_bar())?;
    outln!("{}", serde_json::to_string_pretty(&counts)?);
    if let (Some(dir), true) = (&a.llm, counts.unparseable > 0) {
        errln!(
            "{} prompts did not fit the context of {}: try a shorter --prompt-file, or --raw",
            counts.unparseable,
            dir.display()
        );
    }
    if counts.records.failed > 0 {
        for e in counts.errors.iter().skip(1) {
            errln!("  failed: {e}");
        }
        bail!(
            "{} records failed and were not written (first: {}); {} were written; run the same command again to \
             retry the failed ones",
            counts.records.failed,
            counts.errors.first().map(String::as_str).unwrap_or("?"),
            counts.records.written
        );
    }
    Ok(())
}

/// Reads the input and opens the resumable output, telling the user what was found.
fn open(
    data: &std::path::Path,
    format: InputFormat,
    first_turn_only: bool,
    out: &std::path::Path,
) -> anyhow::Result<(Vec<Record>, ResumableWriter)> {
    bpo::output::check(out, &[data])?;
    let input = read_input(data, &InputOptions { format, first_turn_only })?;
    errln!("{}: {} records ({:?})", data.display(), input.records.len(), input.format);
    if input.renamed_duplicates > 0 {
        errln!("  {} repeated ids got a ~n suffix", input.renamed_duplicates);
    }
    let (writer, reopened) = ResumableWriter::open_as(out, Shape::RECORDS, &[data])?;
    if let Some(t) = &reopened.torn {
        errln!("{}: cut a torn last line {} ({} bytes: {})", out.display(), t.line, t.bytes, t.reason);
    }
    Ok((input.records, writer))
}

impl WeakenArgs {
    /// The options of the run.
    pub(super) fn options(&self) -> WeakenOptions {
        WeakenOptions {
            images: self.images.clone(),
            samples: self.samples,
            noise_step: self.noise_step,
            decode: self.decode.mode(self.contrast_alpha, self.vcd_alpha, self.vcd_beta),
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            shard: self.shard.unwrap_or_default(),
            seed: self.seed,
            ..Default::default()
        }
    }

    /// How the answering model is loaded.
    pub(super) fn model(&self) -> &ModelArgs {
        &self.model
    }
}

fn weaken(a: WeakenArgs) -> anyhow::Result<()> {
    let opts = a.options();
    opts.validate()?;
    let (records, mut writer) = a.io.open()?;
    let vlm = a.model.load()?;
    let counts = run_weaken(&vlm, records, &opts, &mut writer, &records_bar())?;
    outln!("{}", serde_json::to_string_pretty(&counts)?);
    if counts.records.failed > 0 {
        bail!(
            "{} records were not written because their image could not be read (first: {}); fix --images or \
             the data and run the same command again",
            counts.records.failed,
            counts.errors.first().map(String::as_str).unwrap_or("?")
        );
    }
    Ok(())
}

/// The bootstrap commands' bar: elapsed time, records done, rate and ETA; cleared when the run ends.
fn records_bar() -> bpo::progress::Bars {
    bpo::progress::Bars::new("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}, {per_sec}, ETA {eta}", false)
}
