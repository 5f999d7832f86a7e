//! `bpo eval ...`: score answers for hallucination (POPE, CHAIR / Object HalBench), the judged benchmarks
//! (MM-Vet, LLaVA-Bench, MMHal-Bench: [`judged`]), and compare runs.
//!
//! Answers come from `--answers` files, or from a model (`--model`): `pope` then answers the questions first and
//! `caption` describes a folder of images, writing `answers.jsonl` into `--out`. Every command builds a
//! [`Benchmark`], runs it through [`Benchmark::run`] and prints what it returns ([`finish`]).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{ArgGroup, Args, Subcommand};

use bpo::eval::answer::Answering;
use bpo::eval::captions::{image_files, Captions, Truth};
use bpo::eval::pope::{self, Pope};
use bpo::eval::report::{self, Scores};
use bpo::eval::{inputs, Answers, Benchmark, Context};
use bpo::generate::{EngineOptions, SamplingParams};

use super::{bars, ModelArgs};

mod judged;
pub(super) mod suite;

#[derive(Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    action: EvalAction,
}

#[derive(Subcommand)]
enum EvalAction {
    /// Score yes/no answers to POPE questions: accuracy, precision, recall, F1 and yes-ratio per split.
    ///
    /// Answers are parsed as the official POPE script does (text before the first '.', ',' removed, split on
    /// spaces; a token `No`, `no` or `not` means no, anything else yes) and joined to questions by
    /// question_id. Unanswered questions and answers without a question are reported, not dropped.
    Pope(PopeArgs),
    /// Score descriptions with CHAIR / Object HalBench: which COCO objects each caption mentions and which of
    /// them are not in the image.
    ///
    /// Image of an answer: its `image_id`, else its `image` (digits at the end of the file name), else
    /// `metadata.image_id` / `metadata.image`, else the image of its row in --questions, else its
    /// question_id.
    Chair(ChairArgs),
    /// Describe every image of a folder with a model (Object HalBench's eight instructions, rotating, or your own
    /// prompts) and score the descriptions with CHAIR in one go.
    Caption(CaptionArgs),
    /// Print two runs (folders holding scores.json) side by side with their differences, or suites (folders
    /// written by `bpo eval suite`) as one table, a row per suite (e.g. base, SFT on chosen, BPO).
    Compare(CompareArgs),
    /// MM-Vet: an LLM judge grades each answer 0.0-1.0 against the ground truth (the official grader's few-shot
    /// prompt, parsing and retry rule, --runs repetitions); totals per capability and capability combination.
    Mmvet(judged::MmVetArgs),
    /// LLaVA-Bench (in the wild): an LLM judge scores the model's answer and GPT-4's reference 1-10 from the
    /// image captions (LLaVA's review prompt); relative score = model / reference x 100, per category.
    LlavaBench(judged::LlavaBenchArgs),
    /// MMHal-Bench: an LLM judge rates each answer 0-6 from the image's object labels and a human answer;
    /// average score, hallucination rate (ratings below 3) and per-question-type averages.
    Mmhal(judged::MmHalArgs),
    /// Generate and score a list of benchmarks with one model (POPE, Object HalBench, and MM-Vet, LLaVA-Bench and
    /// MMHal-Bench when the config has a [judge]); one run folder each and one table.
    Suite(suite::SuiteArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["answers", "model"])))]
pub struct PopeArgs {
    /// Answers JSONL in LLaVA's model_vqa format: {"question_id", "prompt", "text", "answer_id",
    /// "model_id", "metadata"}.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    /// Answer the questions with this model first (greedy); answers.jsonl goes into --out.
    #[command(flatten)]
    model: Option<ModelArgs>,
    #[command(flatten)]
    gen: GenArgs,
    /// Question files, JSON Lines (the official coco_pope_*.json are): {"question_id", "text", "label":
    /// "yes"|"no"} with an optional "category". Without one, the split comes from the file name
    /// (coco_pope_adversarial.json -> adversarial).
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    questions: Vec<PathBuf>,
    /// Pair the k-th answer with the k-th question (the question files concatenated in the order given),
    /// reproducing the official script instead of joining by question_id.
    #[arg(long)]
    positional: bool,
    /// Write scores.json and details.jsonl (one row per scored question) into this folder.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("truth").required(true).args(["coco", "ground_truth"])))]
pub struct ChairArgs {
    /// Answers JSONL (LLaVA model_vqa format, optionally with "image_id" or "image").
    #[arg(long, value_name = "FILE")]
    answers: PathBuf,
    /// Folder with COCO 2014 annotations: every instances_*.json and captions_*.json in it is read (ground
    /// truth = instance categories ∪ objects named in the reference captions).
    #[arg(long, value_name = "DIR")]
    coco: Option<PathBuf>,
    /// Ground truth as JSON Lines, one image per line: {"image_id": 42, "objects": ["dog", "sofa"]} (any
    /// synonym; each maps to its COCO category).
    #[arg(long, value_name = "FILE")]
    ground_truth: Option<PathBuf>,
    /// Question JSONL ({"question_id", "image" or "image_id"}) giving the image of answers that lack one.
    #[arg(long, value_name = "FILE")]
    questions: Option<PathBuf>,
    /// Replace the built-in COCO synonym list: one category per line, entries separated by ", ", the first
    /// entry is the category name.
    #[arg(long, value_name = "FILE")]
    synonyms: Option<PathBuf>,
    /// Write scores.json and details.jsonl (one row per caption: mentions, hallucinations, ground truth).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Generation settings when `--model` answers.
#[derive(Args)]
pub struct GenArgs {
    /// Folder the questions' image paths are relative to.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    #[command(flatten)]
    batch: super::generate::BatchArgs,
    /// Most new tokens per answer, at least 1 (greedy decoding, as LLaVA's evaluation scripts).
    #[arg(long, default_value_t = 128, value_parser = super::range::at_least_one)]
    max_new_tokens: usize,
}

#[derive(Args)]
#[command(group(ArgGroup::new("caption_truth").required(true).args(["coco", "ground_truth"])))]
pub struct CaptionArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder of images to describe (jpg, jpeg, png, webp; sorted by name).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// `object-halbench` (the eight built-in instructions, used in turn) or a file with one prompt per line.
    #[arg(long, default_value = "object-halbench")]
    prompts: String,
    /// Describe at most this many images, at least 1.
    #[arg(long, value_parser = super::range::at_least_one)]
    limit: Option<usize>,
    /// COCO 2014 annotation folder (see `bpo eval chair`).
    #[arg(long, value_name = "DIR")]
    coco: Option<PathBuf>,
    /// Ground-truth JSONL (see `bpo eval chair`); image ids are the file names' trailing digits, else their stems.
    #[arg(long, value_name = "FILE")]
    ground_truth: Option<PathBuf>,
    /// Replace the built-in COCO synonym list.
    #[arg(long, value_name = "FILE")]
    synonyms: Option<PathBuf>,
    #[command(flatten)]
    batch: super::generate::BatchArgs,
    /// Most new tokens per description, at least 1.
    #[arg(long, default_value_t = 512, value_parser = super::range::at_least_one)]
    max_new_tokens: usize,
    /// Output folder: answers.jsonl, scores.json, details.jsonl.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
pub struct CompareArgs {
    /// Two runs (folders with scores.json, or the files; differences are the second minus the first), or two or
    /// more suite folders.
    #[arg(required = true, num_args = 2..)]
    runs: Vec<PathBuf>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.action {
        EvalAction::Pope(a) => run_pope(a),
        EvalAction::Chair(a) => run_chair(a),
        EvalAction::Caption(a) => run_caption(a),
        EvalAction::Compare(a) => run_compare(a),
        EvalAction::Mmvet(a) => judged::run_mmvet(a),
        EvalAction::LlavaBench(a) => judged::run_llava_bench(a),
        EvalAction::Mmhal(a) => judged::run_mmhal(a),
        EvalAction::Suite(a) => suite::run_suite(a),
    }
}

/// Checks the run folder `out` (none of `inputs`), makes it and locks it until the lock is dropped: a second run
/// on the same folder stops with one line naming the first, instead of both writing and the last one winning.
pub fn lock_run(out: &Path, inputs: &[&Path]) -> anyhow::Result<bpo::output::Lock> {
    bpo::output::check_dir(out, inputs)?;
    bpo::output::create_dir(out)?;
    Ok(bpo::output::Lock::dir(out)?)
}

fn run_pope(args: PopeArgs) -> anyhow::Result<()> {
    let mut inputs: Vec<&Path> = args.questions.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.answers.as_deref());
    inputs.extend(args.gen.images.as_deref());
    let _lock = args.out.as_deref().map(|out| lock_run(out, &inputs)).transpose()?;
    let bench = Benchmark::Pope(Pope {
        questions: pope::load_questions(&args.questions)?,
        images: args.gen.images.clone(),
        suffix: pope::SHORT_ANSWER.into(),
        pairing: if args.positional { pope::Pairing::Positional } else { pope::Pairing::ById },
    });
    let params = SamplingParams { max_new_tokens: args.gen.max_new_tokens, ..Default::default() };
    let vlm;
    let answers = match (&args.answers, &args.model) {
        (Some(path), _) => given(&bench, path)?,
        (None, Some(model)) => {
            vlm = model.load()?;
            Answers::Model { vlm: &vlm, how: answering(model, &params, &args.gen.batch.engine()) }
        }
        (None, None) => anyhow::bail!("give --answers FILE or --model DIR"),
    };
    let scores = bench.run(answers, &Context { judge: None, out: args.out.as_deref(), events: &bars() })?;
    finish(&scores, args.out.as_deref())
}

/// The rows of an answers file, in the benchmark's format.
pub fn given(bench: &Benchmark, path: &Path) -> anyhow::Result<Answers<'static>> {
    Ok(Answers::Given { rows: bench.read_answers(path, &bars())?, from: path.display().to_string() })
}

fn run_chair(args: ChairArgs) -> anyhow::Result<()> {
    let inputs: Vec<&Path> =
        [Some(&args.answers), args.coco.as_ref(), args.ground_truth.as_ref(), args.questions.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
    let _lock = args.out.as_deref().map(|out| lock_run(out, &inputs)).transpose()?;
    let chair = Captions::chair(args.synonyms.as_deref())?;
    let question_images = args.questions.as_deref().map(inputs::load_question_images).transpose()?;
    let truth = truth(args.coco.as_deref(), args.ground_truth.as_deref())?;
    let bench = Benchmark::Captions(Captions { chair, truth, question_images, asks: Vec::new() });
    let answers = given(&bench, &args.answers)?;
    let scores = bench.run(answers, &Context { judge: None, out: args.out.as_deref(), events: &bars() })?;
    finish(&scores, args.out.as_deref())
}

/// Ground truth from COCO annotations or a JSONL file.
fn truth(coco: Option<&Path>, ground_truth: Option<&Path>) -> anyhow::Result<Truth> {
    Ok(match (coco, ground_truth) {
        (Some(dir), _) => Truth::Coco(dir.to_path_buf()),
        (None, Some(path)) => Truth::Jsonl(path.to_path_buf()),
        (None, None) => anyhow::bail!("give --coco DIR or --ground-truth FILE"),
    })
}

/// How `model` answers: `params`, batched by `batch`, its adapters, its name in the rows.
pub fn answering(model: &ModelArgs, params: &SamplingParams, batch: &EngineOptions) -> Answering {
    Answering { params: params.clone(), batch: batch.clone(), pass: model.pass(), model_id: model.model_id() }
}

fn run_caption(args: CaptionArgs) -> anyhow::Result<()> {
    let chair = Captions::chair(args.synonyms.as_deref())?;
    let instructions: Vec<String> = if args.prompts == "object-halbench" {
        bpo::eval::object_halbench_prompts().into_iter().map(String::from).collect()
    } else {
        let text = std::fs::read_to_string(&args.prompts).with_context(|| format!("reading {}", args.prompts))?;
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    };
    anyhow::ensure!(!instructions.is_empty(), "no prompts in {}", args.prompts);
    let files = image_files(&args.images, args.limit)?;
    let inputs: Vec<&Path> =
        [Some(&args.images), args.coco.as_ref(), args.ground_truth.as_ref(), Some(&args.model.model)]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
    let _lock = lock_run(&args.out, &inputs)?;
    let params = SamplingParams { max_new_tokens: args.max_new_tokens, ..Default::default() };
    let truth = truth(args.coco.as_deref(), args.ground_truth.as_deref())?;
    let asks = Captions::describe(&files, &instructions);
    let bench = Benchmark::Captions(Captions { chair, truth, question_images: None, asks });
    let vlm = args.model.load()?;
    let answers = Answers::Model { vlm: &vlm, how: answering(&args.model, &params, &args.batch.engine()) };
    let scores = bench.run(answers, &Context { judge: None, out: Some(&args.out), events: &bars() })?;
    finish(&scores, Some(&args.out))
}

/// Prints the table and warnings, and where the run folder was written.
pub fn finish(scores: &Scores, out: Option<&Path>) -> anyhow::Result<()> {
    outln!("{}", scores.table());
    for w in scores.warnings() {
        errln!("warning: {w}");
    }
    if let Some(dir) = out {
        outln!("wrote {}/{{{}, {}}}", dir.display(), report::SCORES_FILE, report::DETAILS_FILE);
    }
    Ok(())
}

fn run_compare(args: CompareArgs) -> anyhow::Result<()> {
    let suites = args.runs.iter().map(|r| bpo::eval::suite::read_info(r)).collect::<bpo::Result<Vec<_>>>()?;
    if suites.iter().all(Option::is_some) {
        let mut rows = Vec::new();
        for run in &args.runs {
            let label =
                run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| run.display().to_string());
            rows.push((label, bpo::eval::suite::suite_headlines(run)?));
        }
        outln!("{}", bpo::eval::suite::table(&rows));
        return Ok(());
    }
    if let Some(i) = suites.iter().position(Option::is_some) {
        let other = args.runs.iter().zip(&suites).find(|(_, s)| s.is_none()).map(|(r, _)| r);
        anyhow::bail!(
            "{} is a suite folder ({}) but {} is not: compare suites with suites, or two runs",
            args.runs[i].display(),
            bpo::eval::suite::SUITE_FILE,
            other.map_or(String::new(), |r| r.display().to_string())
        );
    }
    for run in &args.runs {
        anyhow::ensure!(
            !run.is_dir() || run.join(report::SCORES_FILE).is_file(),
            "{}: neither a run folder ({}) nor a suite folder ({})",
            run.display(),
            report::SCORES_FILE,
            bpo::eval::suite::SUITE_FILE
        );
    }
    let [run_a, run_b] = &args.runs[..] else {
        anyhow::bail!("compare takes two runs, or two or more suite folders (with suite.json)");
    };
    let a = report::read_scores(run_a)?;
    let b = report::read_scores(run_b)?;
    let names = (run_a.display().to_string(), run_b.display().to_string());
    outln!("{}", report::compare(&a, &b, &names.0, &names.1)?);
    Ok(())
}
