//! `bpo eval mmvet / llava-bench / mmhal`: the judged benchmarks. Answers come from a file or from a model
//! (generated with the benchmark's own prompt, greedy, up to 1024 new tokens, as LLaVA's `model_vqa` and
//! MMHal-Bench's `model_vqa_mmhal` do); [`Benchmark::run`] has the judge grade them and the run folder gets
//! `scores.json`, `details.jsonl` (raw judge replies beside parsed scores), `answers.jsonl` when a model
//! answered, and the judge's reply cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args};

use bpo::eval::judge::{self, Judge, JudgeOptions};
use bpo::eval::llava_bench::LlavaBench;
use bpo::eval::mmhal::MmHal;
use bpo::eval::mmvet::MmVet;
use bpo::eval::{Answers, Benchmark, Context};
use bpo::generate::SamplingParams;

use super::{answering, finish, given};
use crate::cli::{bars, ModelArgs};

/// Where the judge is and how to talk to it.
#[derive(Args, Clone, Debug)]
pub struct JudgeArgs {
    /// OpenAI-compatible chat server: its root (http://127.0.0.1:8000), `.../v1`, or the full
    /// `/v1/chat/completions` URL. Plain http only.
    #[arg(long, value_name = "URL")]
    pub judge_url: String,
    /// Model name sent with every request. The official judges: gpt-4-0613 (MM-Vet), gpt-4-0314 (LLaVA-Bench,
    /// MMHal-Bench).
    #[arg(long, value_name = "NAME")]
    pub judge_model: String,
    /// Environment variable holding the API key, sent as a Bearer token and never written anywhere. Unset or
    /// empty: no key is sent; not UTF-8, or holding a line break: refused, naming the variable.
    #[arg(long, value_name = "VAR", default_value = "OPENAI_API_KEY")]
    pub judge_key_env: String,
    /// Judge requests in flight at once, at least 1.
    #[arg(long, default_value_t = 4, value_parser = crate::cli::range::at_least_one)]
    pub judge_concurrency: usize,
    /// Extra attempts after a connection error, timeout, HTTP 429 or 5xx, or a reply that is not chat JSON with a
    /// message (HTML, malformed, no `choices`, `null`, over 4 MiB).
    #[arg(long, default_value_t = 5)]
    pub judge_retries: u32,
    /// Seconds to wait before the first retry, in [0, 30], doubled for each further one (at most 30). A 429 or
    /// 503 reply that asks for a longer wait (Retry-After) gets it, up to 120 s.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = crate::cli::range::backoff)]
    pub judge_backoff: Duration,
    /// Total seconds allowed for one judge request attempt, in [1, 86400]: connecting (at most 10 s), sending and
    /// reading the whole reply.
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = crate::cli::range::timeout)]
    pub judge_timeout: Duration,
    /// Reply cache, shared by runs that should not ask twice (default: OUT/judge-cache.jsonl). Only a judge cache
    /// bpo wrote is appended to: any other file (one of the run's inputs, another JSON file) is refused unchanged.
    #[arg(long, value_name = "FILE")]
    pub judge_cache: Option<PathBuf>,
}

impl JudgeArgs {
    /// Opens the judge whose cache defaults to `out/judge-cache.jsonl` and may not be one of `inputs`.
    pub fn open(&self, out: &Path, inputs: &[&Path]) -> anyhow::Result<Judge> {
        let opts = JudgeOptions {
            url: self.judge_url.clone(),
            model: self.judge_model.clone(),
            api_key: bpo::http::api_key_from_env(&self.judge_key_env)?,
            concurrency: self.judge_concurrency,
            retries: self.judge_retries,
            backoff: self.judge_backoff,
            timeout: self.judge_timeout,
            cache: self.judge_cache.clone().unwrap_or_else(|| judge::cache_path(out)),
            inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
        };
        open_judge(&opts)
    }
}

/// Opens the judge of `opts` (a note about its cache printed as a warning) and checks that its server answers.
pub fn open_judge(opts: &JudgeOptions) -> anyhow::Result<Judge> {
    let (judge, note) = Judge::open(opts).context("judge")?;
    if let Some(note) = note {
        errln!("warning: {note}");
    }
    judge::check_reachable(&opts.url, Duration::from_secs(10))?;
    Ok(judge)
}

/// Generation settings when `--model` answers a judged benchmark.
#[derive(Args, Clone, Debug)]
pub struct JudgedGenArgs {
    /// Folder the benchmark's image file names are relative to.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    #[command(flatten)]
    pub batch: crate::cli::generate::BatchArgs,
    /// Most new tokens per answer, at least 1 (greedy; LLaVA's model_vqa allows 1024).
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::range::at_least_one)]
    pub max_new_tokens: usize,
}

impl JudgedGenArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams { max_new_tokens: self.max_new_tokens, ..Default::default() }
    }
}

/// What every judged command shares: a model that answers first (instead of an answers file; the benchmark's
/// own prompt, greedy), how it generates, the judge, and the run folder.
#[derive(Args)]
pub struct JudgedRun {
    #[command(flatten)]
    model: Option<ModelArgs>,
    #[command(flatten)]
    gen: JudgedGenArgs,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Run folder: scores.json, details.jsonl, judge-cache.jsonl (locked while a run uses it), and the answers
    /// when a model answered.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["answers", "model"])))]
pub struct MmVetArgs {
    /// mm-vet.json of the MM-Vet release: {"v1_0": {"imagename", "capability", "question", "answer"}, ...}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// Answers: the official results JSON ({"v1_0": "answer", ...}) or LLaVA answer JSONL (question_id "v1_0"
    /// or 0).
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    /// Gradings per answer, at least 1, averaged (the MM-Vet paper uses 5; its script's default is 1).
    #[arg(long, default_value_t = 5, value_parser = crate::cli::range::at_least_one)]
    runs: usize,
    #[command(flatten)]
    run: JudgedRun,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["answers", "model"])))]
pub struct LlavaBenchArgs {
    /// questions.jsonl of llava-bench-in-the-wild: {"question_id", "image", "text", "category"}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// context.jsonl: {"image", "caption"} (the judge's view of each image).
    #[arg(long, value_name = "FILE")]
    context: PathBuf,
    /// The reference answers the model is compared with: answers_gpt4.jsonl.
    #[arg(long, value_name = "FILE")]
    references: PathBuf,
    /// The model's answers (LLaVA answer JSONL, joined by question_id).
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    #[command(flatten)]
    run: JudgedRun,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["responses", "answers", "model"])))]
pub struct MmHalArgs {
    /// An official response file: the records of response_template.json with "model_answer" filled in; judged as
    /// they are.
    #[arg(long, value_name = "FILE")]
    responses: Option<PathBuf>,
    /// response_template.json of MMHal-Bench (with --answers or --model; a record's image is its image_path, else
    /// the file name at the end of its image_src, under --images).
    #[arg(long, value_name = "FILE")]
    questions: Option<PathBuf>,
    /// Answers as LLaVA answer JSONL whose question_id is the record's 0-based position.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    #[command(flatten)]
    run: JudgedRun,
}

impl JudgedRun {
    /// Checks, makes and locks the run folder (none of `inputs`, the images or the model), then opens the judge.
    fn start(&self, inputs: &[&Path]) -> anyhow::Result<(bpo::output::Lock, Judge)> {
        let mut all = inputs.to_vec();
        all.extend(self.gen.images.as_deref());
        all.extend(self.model.as_ref().map(|m| m.model.as_path()));
        let lock = super::lock_run(&self.out, &all)?;
        Ok((lock, self.judge.open(&self.out, inputs)?))
    }

    /// Runs `bench` on the answers of the file `answers`, else of the model (`missing`: the error without either),
    /// and prints the scores.
    fn run(&self, bench: &Benchmark, judge: &Judge, answers: Option<&Path>, missing: &str) -> anyhow::Result<()> {
        let vlm;
        let answers = match (answers, &self.model) {
            (Some(path), _) => given(bench, path)?,
            (None, Some(model)) => {
                vlm = model.load()?;
                Answers::Model { vlm: &vlm, how: answering(model, &self.gen.params(), &self.gen.batch.engine()) }
            }
            (None, None) => anyhow::bail!("{missing}"),
        };
        let scores = bench.run(answers, &Context { judge: Some(judge), out: Some(&self.out), events: &bars() })?;
        finish(&scores, Some(&self.out))
    }
}

pub fn run_mmvet(a: MmVetArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> = std::iter::once(a.questions.as_path()).chain(a.answers.as_deref()).collect();
    let (_lock, judge) = a.run.start(&inputs)?;
    let bench = Benchmark::MmVet(MmVet::load(&a.questions, a.run.gen.images.as_deref(), a.runs)?);
    a.run.run(&bench, &judge, a.answers.as_deref(), "give --answers FILE or --model DIR")
}

pub fn run_llava_bench(a: LlavaBenchArgs) -> anyhow::Result<()> {
    let mut inputs = vec![a.questions.as_path(), &a.context, &a.references];
    inputs.extend(a.answers.as_deref());
    let (_lock, judge) = a.run.start(&inputs)?;
    let images = a.run.gen.images.as_deref();
    let bench = Benchmark::LlavaBench(LlavaBench::load(&a.questions, &a.context, &a.references, images)?);
    a.run.run(&bench, &judge, a.answers.as_deref(), "give --answers FILE or --model DIR")
}

pub fn run_mmhal(a: MmHalArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> =
        [&a.responses, &a.questions, &a.answers].into_iter().flatten().map(|p| p.as_path()).collect();
    let (_lock, judge) = a.run.start(&inputs)?;
    match (&a.responses, &a.questions) {
        (Some(path), None) => {
            let (bench, rows) = MmHal::from_responses(path)?;
            let answers = Answers::Given { rows, from: path.display().to_string() };
            let ctx = Context { judge: Some(&judge), out: Some(&a.run.out), events: &bars() };
            finish(&Benchmark::MmHal(bench).run(answers, &ctx)?, Some(&a.run.out))
        }
        (None, Some(questions)) => {
            let bench = Benchmark::MmHal(MmHal::load(questions, a.run.gen.images.as_deref())?);
            a.run.run(&bench, &judge, a.answers.as_deref(), "give --answers FILE or --model DIR with --questions")
        }
        (Some(_), Some(_)) => anyhow::bail!("give either --responses FILE or --questions FILE, not both"),
        (None, None) => anyhow::bail!("--answers and --model need --questions response_template.json"),
    }
}
