//! `bpo eval ...`: score answers for hallucination (POPE, CHAIR / Object HalBench) and compare two runs.
//!
//! Extension point: answers come from `--answers` files today. When generation is wired in, a model option
//! group can produce `Vec<Answer>` in memory and hand it to the same library calls
//! (`pope::score`, `inputs::captions_from_answers` + `Chair::score`) and to [`finish`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;

use bpo::eval::chair::{Chair, GroundTruth};
use bpo::eval::words::Lemmatizer;
use bpo::eval::report::{self, Scores};
use bpo::eval::{inputs, load_answers, pope};

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
    /// Print two runs (folders holding scores.json) side by side with their differences.
    Compare(CompareArgs),
}

#[derive(Args)]
pub struct PopeArgs {
    /// Answers JSONL in LLaVA's model_vqa format: {"question_id", "prompt", "text", "answer_id",
    /// "model_id", "metadata"}.
    #[arg(long, value_name = "FILE")]
    answers: PathBuf,
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

#[derive(Args)]
pub struct CompareArgs {
    /// First run: a folder with scores.json (or the file itself).
    run_a: PathBuf,
    /// Second run; differences are B - A.
    run_b: PathBuf,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.action {
        EvalAction::Pope(a) => run_pope(a),
        EvalAction::Chair(a) => run_chair(a),
        EvalAction::Compare(a) => run_compare(a),
    }
}

fn run_pope(args: PopeArgs) -> anyhow::Result<()> {
    let questions = pope::load_questions(&args.questions)?;
    let answers = load_answers(&args.answers)?;
    let pairing = if args.positional { pope::Pairing::Positional } else { pope::Pairing::ById };
    let out = pope::score(&questions, &answers, pairing)?;
    finish(&Scores::Pope(out.report), &out.details, args.out.as_deref())
}

fn run_chair(args: ChairArgs) -> anyhow::Result<()> {
    let chair = match &args.synonyms {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Chair::new(&text, Lemmatizer::wordnet()).with_context(|| format!("{}", path.display()))?
        }
        None => Chair::builtin()?,
    };
    let answers = load_answers(&args.answers)?;
    let question_images = args.questions.as_deref().map(inputs::load_question_images).transpose()?;
    let captions = inputs::captions_from_answers(&answers, question_images.as_ref())?;
    let truth = match (&args.coco, &args.ground_truth) {
        (Some(dir), _) => {
            let images: HashSet<String> = captions.iter().map(|c| c.image_id.clone()).collect();
            let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("reading {}", dir.display()));
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            let truth = GroundTruth::from_coco(dir, &chair, &images);
            spinner.finish_and_clear();
            truth?
        }
        (None, Some(path)) => GroundTruth::from_jsonl(path, &chair)?,
        (None, None) => anyhow::bail!("give --coco DIR or --ground-truth FILE"),
    };
    let out = chair.score(&captions, &truth)?;
    finish(&Scores::Chair(out.report), &out.details, args.out.as_deref())
}

/// Prints the table and warnings, and writes the run folder when asked. Shared by every way of producing
/// scores (files today, in-memory generation later).
pub fn finish<D: Serialize>(scores: &Scores, details: &[D], out: Option<&Path>) -> anyhow::Result<()> {
    println!("{}", scores.table());
    let warnings = match scores {
        Scores::Pope(r) => &r.warnings,
        Scores::Chair(r) => &r.warnings,
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if let Some(dir) = out {
        report::write_run(dir, scores, details)?;
        println!("wrote {}/{{{}, {}}}", dir.display(), report::SCORES_FILE, report::DETAILS_FILE);
    }
    Ok(())
}

fn run_compare(args: CompareArgs) -> anyhow::Result<()> {
    let a = report::read_scores(&args.run_a)?;
    let b = report::read_scores(&args.run_b)?;
    let names = (args.run_a.display().to_string(), args.run_b.display().to_string());
    println!("{}", report::compare(&a, &b, &names.0, &names.1)?);
    Ok(())
}
