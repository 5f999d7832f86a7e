//! Argument parsing and dispatch. Each subcommand lives in its own file and turns its arguments into one library
//! call; this file holds only the options several subcommands share.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// `outln!` that never stops the work: see [`out`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::out::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `errln!` that never panics: a closed or full stderr loses the message, nothing else.
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cli::out::eprint(format_args!("{}\n", format_args!($($arg)*))) };
}

mod bench;
mod bootstrap;
mod demo;
mod distort;
mod eval;
mod generate;
mod merge;
mod pairs;
mod rounds;
mod score;
mod serve;
mod serve_bench;
mod sft;
mod train;

#[derive(Parser)]
#[command(
    name = "bpo",
    version,
    about = "Bootstrapped Preference Optimization: make multimodal LLMs look at the image",
    long_about = "Bootstrapped Preference Optimization (Pi et al., ECCV 2024) end to end: bootstrap negatives from the model itself (noised-image answers, error injection), pair them with ground truth, train with DPO + LoRA, and measure hallucination (POPE, CHAIR). Models are Hugging Face folders (LLaVA-1.5 in llava-hf layout, or Llama); nothing is downloaded."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for the model's math (matmuls, fused kernels). Default: RAYON_NUM_THREADS when set, else one
    /// per physical core. Small models (the demo's, `bench --size tiny`) gain nothing from a second thread.
    #[arg(long, global = true, value_name = "N", value_parser = range::at_least_one)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt or a question file with a model.
    Generate(generate::Args),
    /// Summed log-probability of responses given image and prompt.
    Score(score::Args),
    /// Make negatives for BPO records: answers to noised images (weaken) and rewritten ground truth (inject).
    Bootstrap(bootstrap::BootstrapArgs),
    /// Turn BPO records into preference pairs (bpo, TRL or LLaMA-Factory layout).
    ///
    /// Every two completions of a record with different scores give a pair, the higher score chosen (ground
    /// truth over negatives); ties are skipped. Records with a response longer than --max-words words are
    /// dropped. Prints what was kept and dropped, by reason.
    Pairs(pairs::PairsArgs),
    /// Write what the model sees of a diffusion-noised image (BPO's image weakening) as a PNG.
    ///
    /// The image is preprocessed as for LLaVA-1.5, noised by forward diffusion on the normalised pixel tensor
    /// (VCD's schedule, T = 1000: step 0 is almost clean, BPO's release uses 900, VCD and POVID 500), then
    /// de-normalised for viewing. Use it to judge how much an image-weakened negative still shows.
    Distort(distort::Args),
    /// Train with DPO on preference pairs (LoRA on the language model, the projector trainable).
    ///
    /// Chosen = ground truth, rejected = bootstrapped negative. The policy is the model with LoRA adapters on the
    /// language model (and the projector trained fully); the reference is the same weights with the adapters off
    /// and a frozen copy of the starting projector (BPO's released code let the reference's projector drift with
    /// training: --drifting-ref-projector reproduces that). With --init-adapter the reference is the starting
    /// policy, as in TRL, computed once before training. Defaults are the paper's recipe. --objective mdpo adds
    /// mDPO's image-side pair (the chosen answer given the image over the same answer given a diffusion-noised
    /// copy) and anchor (docs/train.md).
    ///
    /// The run folder gets a PEFT adapter (adapter_config.json, adapter_model.safetensors, loadable by peft),
    /// projector.safetensors, train_config.json, metrics.jsonl (TRL's metric names) and checkpoint-N folders.
    /// Ctrl-C (or SIGTERM, as `docker stop`, Slurm and Kubernetes send it) finishes the current step, saves a
    /// checkpoint and exits with status 130 (143 for SIGTERM); --resume continues exactly where it stopped. A NaN
    /// or infinite loss or gradient norm stops the run before its update (status 3).
    Train(train::Args),
    /// Supervised training on LLaVA conversations (cross-entropy on the assistant turns), LoRA or full.
    ///
    /// Data: LLaVA instruct JSON (an array or one sample per line) of {id, image?, conversations: [{from:
    /// human|gpt, value}]}; only the assistant turns carry labels (questions, system text and image positions do
    /// not). LoRA by default (the run folder is then a PEFT adapter); --full trains every language-model weight and
    /// the projector and writes a model folder that --model accepts. Ctrl-C, SIGTERM and --resume work as in `bpo
    /// train`.
    Sft(sft::Args),
    /// Fold a LoRA adapter (a training run folder) into its base model: a plain model folder.
    ///
    /// Every adapted linear becomes W + (alpha / r) B A and the adapter's projector (if it saved one) replaces the
    /// base projector. The output is a model folder in llava-hf layout (config, tokenizer and image-processor files
    /// copied) that bpo and transformers load without peft.
    Merge(merge::Args),
    /// BPO in rounds (iterative DPO): bootstrap, pairs, train, merge and evaluate, again from the merged model.
    ///
    /// One config file holds the number of rounds, the starting model, the data (prompts with ground truth,
    /// bootstrapped again every round) and one section per stage whose keys are that command's flags ([weaken]:
    /// `bpo bootstrap weaken`, [inject]: `bpo bootstrap inject`, [pairs], [train], [eval]: `bpo eval suite` with
    /// its suite inline). Round N+1 bootstraps from, trains and is measured against round N's merged model
    /// (`next = "adapter"` trains its adapter further instead). Each round keeps its records, pairs, run folder,
    /// merged model and evaluation in OUT/round-N/; the table across rounds (round 0: the starting model) is
    /// printed and written to OUT/rounds.txt. Killed or stopped (Ctrl-C: training saves a checkpoint), the same
    /// command continues from the interrupted stage and ends with the same files. docs/train.md has an example.
    Loop(rounds::Args),
    /// Hallucination evaluation: score answers with POPE or CHAIR / Object HalBench, compare runs.
    Eval(eval::EvalArgs),
    /// Serve a model and its adapters with an OpenAI-compatible API (for lmms-eval, VLMEvalKit, --llm-url, --judge-url).
    ///
    /// POST /v1/chat/completions (text and base64 image parts, streaming), POST /v1/completions, GET /v1/models,
    /// GET /health, GET /metrics. Prompts are built as `bpo generate` builds them, so a greedy answer equals its
    /// answer. Each --adapter NAME=DIR is another model id over the one copy of the base weights. Ctrl-C or SIGTERM
    /// stops accepting and lets running requests finish. docs/serve.md has the harness commands.
    Serve(serve::Args),
    /// Benchmarks: time pipeline stages on synthetic inputs and random-weight models.
    Bench(bench::BenchArgs),
    /// The whole BPO pipeline on a synthetic world, from nothing to a report (about 9 minutes on 2 cores).
    ///
    /// Builds a world of coloured shapes whose text-only corpus carries a strong language prior (partner objects
    /// nearly always mentioned together), trains a tiny LLaVA from scratch on it (language model on the corpus,
    /// then projector and language model on rendered images and text-only conversations), bootstraps negatives (answers to noised images; ground truths
    /// continued by the model's own language model), trains LoRA adapters with DPO, and evaluates the SFT model,
    /// BPO, BPO with each kind of negative alone, and SFT on the chosen answers with POPE and CHAIR. Prints the
    /// table and writes OUT/report/report.html (self-contained; open it in a browser). docs/demo.md describes the
    /// world and what it shows.
    Demo(demo::Args),
}

/// Standard output for every command: what is asked is finished whatever happens to stdout. A reader that goes
/// away (`bpo eval pope ... | head -1`) is a broken pipe: later lines are dropped and the command goes on to write
/// its files and exits 0, as ripgrep does. Another write error (a full disk behind a redirect) is kept and
/// reported once the work is done ([`out::failure`]), with status 1.
pub mod out {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static GONE: AtomicBool = AtomicBool::new(false);
    static FAILED: Mutex<Option<String>> = Mutex::new(None);

    /// Writes to stdout (flushed, so a line is out before slow work starts), unless it is gone.
    pub fn print(args: std::fmt::Arguments) {
        if GONE.load(Ordering::Relaxed) {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
            GONE.store(true, Ordering::Relaxed);
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                if let Ok(mut failed) = FAILED.lock() {
                    failed.get_or_insert(e.to_string());
                }
            }
        }
    }

    /// Writes to stderr; a failure has nowhere to be reported, so it is dropped.
    pub fn eprint(args: std::fmt::Arguments) {
        let _ = std::io::stderr().lock().write_fmt(args);
    }

    /// The first stdout failure other than a broken pipe, if any.
    pub fn failure() -> Option<String> {
        FAILED.lock().ok().and_then(|f| f.clone())
    }
}

/// Exit status of a run stopped by Ctrl-C after saving a checkpoint (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit status of a run stopped by SIGTERM after saving a checkpoint (128 + SIGTERM).
pub const EXIT_TERMINATED: u8 = 143;
/// Exit status of a training run stopped by a NaN or infinite loss, gradient norm or weight.
pub const EXIT_NON_FINITE: u8 = 3;

/// Runs the command line; the status to exit with when it succeeded (README, "Exit codes").
pub fn run() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    bpo::model::set_cpu_threads(cli.threads);
    let done = match cli.command {
        Command::Train(a) => return train::run(a),
        Command::Sft(a) => return sft::run(a),
        Command::Loop(a) => return rounds::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Bootstrap(args) => bootstrap::run(args),
        Command::Pairs(args) => pairs::run(args),
        Command::Distort(args) => distort::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => demo::run(args, cli.threads.is_some()),
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}

/// [`run`], then the stdout failure it may have met ([`out`]): the status to exit with.
pub fn main() -> std::process::ExitCode {
    let done = run().and_then(|code| match out::failure() {
        Some(e) => Err(anyhow::anyhow!("standard output: {e}")),
        None => Ok(code),
    });
    done.unwrap_or_else(|e| {
        errln!("error: {}", error_line(&e));
        exit_code(&e)
    })
}

/// Exit status of a setting outside its range (clap's own status for a flag out of range).
pub const EXIT_USAGE: u8 = 2;

/// The status for an error: [`EXIT_NON_FINITE`] when training diverged, [`EXIT_USAGE`] for a setting out of its
/// range (a config file's key, as clap does for a flag), else 1.
pub fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    let code = e.chain().find_map(|c| match c.downcast_ref::<bpo::Error>() {
        Some(bpo::Error::NonFinite(_)) => Some(EXIT_NON_FINITE),
        Some(bpo::Error::Range(_)) => Some(EXIT_USAGE),
        _ => None,
    });
    std::process::ExitCode::from(code.unwrap_or(1))
}

/// An error and its causes on one line, each cause once: a message that already ends with its cause's text (as
/// `path: OS error` does) does not repeat it.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Precision of the weights and activations.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

const DEVICE_HELP: &str = "Device: cpu, cuda (GPU 0) or cuda:N. Default: GPU 0 when this bpo was built with CUDA (scripts/build-cuda.sh) and a GPU answers, else the CPU";
const DTYPE_HELP: &str = "Precision of the frozen weights and the activations (trainable weights are always kept in f32). Default: bf16 on a GPU, f32 on the CPU (candle widens bf16 to f32 there, slowly)";

/// Where a model runs and in which precision, for commands that run a model without [`ModelArgs`].
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    #[arg(long, help = DEVICE_HELP)]
    pub device: Option<String>,
    #[arg(long, value_enum, help = DTYPE_HELP)]
    pub dtype: Option<Dtype>,
}

impl RuntimeArgs {
    pub fn runtime(&self) -> anyhow::Result<bpo::model::Runtime> {
        Ok(bpo::model::Runtime::resolve(self.device.as_deref(), self.dtype.map(Dtype::candle))?)
    }
}

/// Where the model comes from and how prompts are built: shared by every subcommand that runs a model. (It
/// flattens nothing: clap leaves an optional flattened struct unset when it has a flattened member.)
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder: config.json, *.safetensors, tokenizer.json (llava-hf layout, original LLaVA, or a Llama model).
    #[arg(long)]
    pub model: PathBuf,
    /// Load weights (model or adapter) even if some are NaN or infinite; by default such a file is refused, naming
    /// the tensor. The outputs of such a model are not meaningful.
    #[arg(long)]
    pub allow_non_finite: bool,
    #[arg(long, help = DEVICE_HELP)]
    pub device: Option<String>,
    #[arg(long, value_enum, help = DTYPE_HELP)]
    pub dtype: Option<Dtype>,
    /// Chat template wrapped around each prompt: vicuna-v1 (LLaVA-1.5's training format, BPO's; the default),
    /// llava-hf, plain, or model: the folder's own chat template (chat_template.jinja, chat_template.json or
    /// tokenizer_config.json), the default with --prompt-style trl, as in TRL.
    #[arg(long, value_enum)]
    pub template: Option<bpo::text::Template>,
    /// How a non-square image becomes square: `pad` (LLaVA-1.5's training setting) or `square` (stretch by the crop).
    #[arg(long, value_enum, default_value = "pad")]
    pub aspect: bpo::vision::AspectMode,
    /// Apply this LoRA adapter without merging: a `bpo train` / `bpo sft` run folder or any PEFT adapter folder
    /// (adapter_config.json + adapter_model.safetensors; its projector copy, if saved, replaces the model's).
    /// `bpo serve` takes several, as NAME=DIR, each served as model NAME over the one base model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<PathBuf>,
    /// Largest image accepted, in pixels of the square it is padded to (--aspect pad; the image itself with
    /// square), read from the file's header before anything is decoded: a bigger image fails with one line.
    /// Default: Pillow's MAX_IMAGE_PIXELS (a 9459x9459 square, about 270 MB as RGB).
    #[arg(long, value_name = "N", default_value_t = bpo::vision::DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<bpo::model::Vlm> {
        self.load_styled(bpo::text::PromptStyle::Llava)
    }

    /// [`ModelArgs::load`] with the tokenisation conventions of `style`.
    pub fn load_styled(&self, style: bpo::text::PromptStyle) -> anyhow::Result<bpo::model::Vlm> {
        let opts = bpo::model::LoadOptions {
            allow_non_finite: self.allow_non_finite,
            ..bpo::model::LoadOptions::new(&self.runtime()?)
        };
        let mut vlm = bpo::model::Vlm::load(&self.model, &opts, self.template(style))
            .with_context(|| format!("loading {}", self.model.display()))?;
        vlm.aspect = self.aspect;
        vlm.style = style;
        if let Some(p) = vlm.processor.as_mut() {
            p.max_pixels = self.max_image_pixels;
        }
        if let Some(dir) = self.adapter()? {
            let adapter = bpo::train::checkpoint::load_adapter_with(&mut vlm.model, dir, self.allow_non_finite);
            adapter.with_context(|| format!("adapter {}", dir.display()))?;
        }
        Ok(vlm)
    }

    /// The one --adapter, if given (only `bpo serve` takes several).
    pub fn adapter(&self) -> anyhow::Result<Option<&std::path::Path>> {
        match self.adapter.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            more => anyhow::bail!("--adapter is given {} times: only `bpo serve` takes several", more.len()),
        }
    }

    /// The chat template: --template, else the default of the prompt style (TRL renders the model's own).
    pub fn template(&self, style: bpo::text::PromptStyle) -> bpo::text::Template {
        use bpo::text::{PromptStyle, Template};
        self.template.unwrap_or(match style {
            PromptStyle::Llava => Template::VicunaV1,
            PromptStyle::Trl => Template::Model,
        })
    }

    /// The runtime chosen by --device and --dtype.
    pub fn runtime(&self) -> anyhow::Result<bpo::model::Runtime> {
        RuntimeArgs { device: self.device.clone(), dtype: self.dtype }.runtime()
    }

    /// How to run the model: with its adapters when it has any.
    pub fn pass(&self) -> bpo::model::Pass {
        bpo::model::Pass::INFER
    }

    /// The name answer files record as `model_id`: the model folder's name.
    pub fn model_id(&self) -> String {
        self.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// What the commands show of a library run: a bar per stage on stderr with its name, rate and ETA (left drawn when
/// the stage ends), the loss beside a training bar, messages on stderr.
pub fn bars() -> bpo::progress::Bars {
    bpo::progress::Bars::new("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}", true)
}

/// Value parsers for numeric options, shared by every subcommand: each parses the text and checks it against one of
/// [`bpo::range`]'s ranges, which the config files and the library check too (clap then prints the flag, the value
/// and the range, and exits with status 2). NaN is outside every range.
pub mod range {
    use std::num::ParseFloatError;
    use std::str::FromStr;
    use std::time::Duration;

    /// f32 or f64.
    pub trait Float: FromStr<Err = ParseFloatError> + Into<f64> + Copy {}
    impl Float for f32 {}
    impl Float for f64 {}

    fn number<T: Float>(s: &str, ok: fn(f64) -> Result<f64, String>) -> Result<T, String> {
        let v: T = s.trim().parse().map_err(|e: ParseFloatError| e.to_string())?;
        ok(v.into()).map(|_| v)
    }

    /// A finite number > 0.
    pub fn positive<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::positive)
    }

    /// A finite number >= 0.
    pub fn non_negative<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::non_negative)
    }

    /// A number in [0, 1].
    pub fn fraction<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::fraction)
    }

    /// A number in [0, 1): a dropout probability.
    pub fn below_one<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::below_one)
    }

    /// A number in (0, 1]: a nucleus-sampling mass.
    pub fn top_p<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::top_p)
    }

    /// A number in [0, 0.5): a label-flip probability.
    pub fn below_half<T: Float>(s: &str) -> Result<T, String> {
        number(s, bpo::range::below_half)
    }

    /// A count of at least 1.
    pub fn at_least_one(s: &str) -> Result<usize, String> {
        bpo::range::at_least_one(s.trim().parse::<usize>().map_err(|e| e.to_string())?)
    }

    /// The first wait before retrying an HTTP request, in seconds.
    pub fn backoff(s: &str) -> Result<Duration, String> {
        bpo::range::backoff(s.trim().parse().map_err(|e: ParseFloatError| e.to_string())?)
    }

    /// The time limit of one HTTP request attempt, in whole seconds.
    pub fn timeout(s: &str) -> Result<Duration, String> {
        bpo::range::timeout(s.trim().parse::<u64>().map_err(|e| e.to_string())?)
    }

    /// A string that is not empty.
    pub fn not_empty(s: &str) -> Result<String, String> {
        bpo::range::not_empty(s).map(String::from)
    }
}
