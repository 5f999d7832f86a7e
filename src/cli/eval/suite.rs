//! `bpo eval suite`: one model through the benchmarks of a `suite.toml`, one run folder each, one table at
//! the end. The model is loaded once; answers already in a benchmark's folder (`answers.jsonl`) are reused, and
//! the judge's cache makes a re-run ask only what it had not asked, so a killed suite resumes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use bpo::eval::chair::{Chair, GroundTruth};
use bpo::eval::report::Scores;
use bpo::eval::suite::{self, SuiteConfig, SuiteInfo};
use bpo::eval::{inputs, mmhal, mmvet, pope, Answer};
use bpo::generate::{EngineOptions, SamplingParams};
use bpo::model::Vlm;

use bpo::eval::judge::Judge;

use super::judged::{self, JudgeArgs, JudgedGenArgs, LlavaFiles};
use super::{caption_answers, finish, image_files, load_truth, lock_run, pope_answers, save_answers};
use crate::cli::ModelArgs;

#[derive(Args)]
pub struct SuiteArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The suite: which benchmarks, their files, and the judge (see docs/eval.md).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Suite folder: suite.json and one run folder per benchmark.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// The model, loaded on first use.
struct Lazy<'a> {
    args: &'a ModelArgs,
    vlm: Option<Vlm>,
}

impl Lazy<'_> {
    fn get(&mut self) -> anyhow::Result<&Vlm> {
        if self.vlm.is_none() {
            self.vlm = Some(self.args.load()?);
        }
        self.vlm.as_ref().context("model not loaded")
    }
}

/// Answers saved in `dir` by an earlier run of this suite, or new ones from `make` (saved there).
fn answers(dir: &Path, make: impl FnOnce() -> anyhow::Result<Vec<Answer>>) -> anyhow::Result<Vec<Answer>> {
    let path = dir.join("answers.jsonl");
    if path.is_file() {
        errln!("reusing {}", path.display());
        return Ok(bpo::eval::load_answers(&path)?);
    }
    let answers = make()?;
    save_answers(Some(dir), &answers)?;
    Ok(answers)
}

fn gen(images: &Option<PathBuf>, batch: &EngineOptions, max_new_tokens: Option<usize>) -> JudgedGenArgs {
    let batch =
        crate::cli::generate::BatchArgs { batch_size: batch.max_rows, max_batch_tokens: batch.max_batch_tokens };
    JudgedGenArgs { images: images.clone(), batch, max_new_tokens: max_new_tokens.unwrap_or(1024) }
}

/// A benchmark's inputs, read before the first benchmark runs (or the model loads), so that a bad file stops the
/// suite at once, naming its section.
enum Inputs {
    Pope(Vec<pope::PopeQuestion>),
    ObjectHalBench(Vec<PathBuf>),
    MmVet(Vec<mmvet::Question>),
    LlavaBench(LlavaFiles),
    MmHal(Vec<mmhal::Record>),
}

/// The inputs of benchmark `name` if the config has it (and a judge where it needs one).
fn prepare(name: &str, cfg: &SuiteConfig) -> anyhow::Result<Option<Inputs>> {
    let judged = cfg.judge.is_some();
    let inputs = match name {
        "pope" => cfg.pope.as_ref().map(|c| pope::load_questions(&c.questions).map(Inputs::Pope)),
        "object-halbench" => {
            let c = cfg.object_halbench.as_ref();
            return c.map(|c| image_files(&c.images, c.limit).map(Inputs::ObjectHalBench)).transpose();
        }
        "mmvet" => {
            cfg.mmvet.as_ref().filter(|_| judged).map(|c| mmvet::load_questions(&c.questions).map(Inputs::MmVet))
        }
        "llava-bench" => {
            let c = cfg.llava_bench.as_ref().filter(|_| judged);
            return c
                .map(|c| LlavaFiles::load(&c.questions, &c.context, &c.references).map(Inputs::LlavaBench))
                .transpose();
        }
        "mmhal" => cfg.mmhal.as_ref().filter(|_| judged).map(|c| mmhal::load_records(&c.questions).map(Inputs::MmHal)),
        other => anyhow::bail!("unknown benchmark {other}"),
    };
    Ok(inputs.transpose()?)
}

pub fn run_suite(a: SuiteArgs) -> anyhow::Result<()> {
    let cfg = SuiteConfig::load(&a.config)?;
    let mut inputs: Vec<&Path> = cfg.paths().into_iter().map(|(_, p, _)| p).collect();
    inputs.extend([a.config.as_path(), &a.model.model]);
    inputs.extend(a.model.adapter.as_deref());
    let _lock = lock_run(&a.out, &inputs)?;
    let mut info = SuiteInfo {
        model: a.model.model.display().to_string(),
        adapter: a.model.adapter.as_ref().map(|p| p.display().to_string()),
        benchmarks: Vec::new(),
    };
    if let Some(old) = suite::read_info(&a.out)? {
        anyhow::ensure!(
            (&old.model, &old.adapter) == (&info.model, &info.adapter),
            "{} holds a suite of {}{}; give another --out",
            a.out.display(),
            old.model,
            old.adapter.as_ref().map_or(" without an adapter".to_string(), |a| format!(" with adapter {a}"))
        );
        info.benchmarks = old.benchmarks;
    }
    let judged = cfg.mmvet.is_some() || cfg.llava_bench.is_some() || cfg.mmhal.is_some();
    match &cfg.judge {
        None if judged => {
            errln!("warning: {}: no [judge], so MM-Vet, LLaVA-Bench and MMHal-Bench are skipped", a.config.display())
        }
        Some(j) if judged => bpo::eval::judge::check_reachable(&j.url, std::time::Duration::from_secs(10))?,
        _ => {}
    }
    // Every benchmark's files are read before the first one runs.
    let mut prepared = Vec::new();
    for name in suite::BENCHMARKS {
        let section = name.replace('-', "_");
        if let Some(inputs) = prepare(name, &cfg).with_context(|| format!("{}: [{section}]", a.config.display()))? {
            prepared.push((name, inputs));
        }
    }
    let batch = EngineOptions::rows(cfg.batch_size.unwrap_or(8), None);
    let mut model = Lazy { args: &a.model, vlm: None };
    for (name, inputs) in &prepared {
        run_one(name, inputs, &cfg, &mut model, &batch, &a.out.join(name))?;
        if !info.benchmarks.iter().any(|b| b == name) {
            info.benchmarks.push(name.to_string());
        }
        let text = serde_json::to_value(&info).context("suite.json")?;
        bpo::output::write_json(&a.out.join(suite::SUITE_FILE), &text)?;
    }
    let label = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    outln!("\n{}", suite::table(&[(label, suite::suite_headlines(&a.out)?)]));
    Ok(())
}

/// The judge of a judged benchmark (`model_override`: its `judge_model`), its cache in `dir`.
fn judge(cfg: &SuiteConfig, model_override: &Option<String>, dir: &Path, inputs: &[&Path]) -> anyhow::Result<Judge> {
    let j = cfg.judge.as_ref().context("no [judge]")?;
    let args = JudgeArgs {
        judge_url: j.url.clone(),
        judge_model: model_override.clone().unwrap_or_else(|| j.model.clone()),
        judge_key_env: j.api_key_env.clone(),
        judge_concurrency: j.concurrency,
        judge_retries: j.retries,
        judge_backoff: j.backoff()?,
        judge_timeout: j.timeout()?,
        judge_cache: None,
    };
    args.open(dir, inputs)
}

/// Runs benchmark `name` on its prepared inputs into its run folder `dir` (locked while it runs).
fn run_one(
    name: &str,
    inputs: &Inputs,
    cfg: &SuiteConfig,
    model: &mut Lazy,
    batch: &EngineOptions,
    dir: &Path,
) -> anyhow::Result<()> {
    let _lock = lock_run(dir, &[])?;
    let margs = model.args;
    outln!("\n== {name}");
    match inputs {
        Inputs::Pope(questions) => {
            let c = cfg.pope.as_ref().context("[pope]")?;
            let params = SamplingParams { max_new_tokens: c.max_new_tokens.unwrap_or(128), ..Default::default() };
            let answers =
                answers(dir, || pope_answers(model.get()?, margs, questions, c.images.as_ref(), &params, batch))?;
            // By position: the answers are in question order, and the official split files each number their
            // questions from 1, so ids repeat across splits.
            let out = pope::score(questions, &answers, pope::Pairing::Positional)?;
            finish(&Scores::Pope(out.report), &out.details, Some(dir))?;
        }
        Inputs::ObjectHalBench(files) => {
            let c = cfg.object_halbench.as_ref().context("[object_halbench]")?;
            let chair = Chair::builtin()?;
            let instructions: Vec<String> =
                bpo::eval::object_halbench_prompts().into_iter().map(String::from).collect();
            let params = SamplingParams { max_new_tokens: c.max_new_tokens.unwrap_or(512), ..Default::default() };
            let answers = answers(dir, || caption_answers(model.get()?, margs, files, &instructions, &params, batch))?;
            let captions = inputs::captions_from_answers(&answers, None)?;
            let truth: GroundTruth = load_truth(&chair, &captions, c.coco.as_deref(), c.ground_truth.as_deref())?;
            let out = chair.score(&captions, &truth)?;
            finish(&Scores::Chair(out.report), &out.details, Some(dir))?;
        }
        Inputs::MmVet(questions) => {
            let c = cfg.mmvet.as_ref().context("[mmvet]")?;
            let judge = judge(cfg, &c.judge_model, dir, &[&c.questions])?;
            let g = gen(&c.images, batch, c.max_new_tokens);
            let got = judged::by_id(answers(dir, || {
                judged::generate(model.get()?, margs, &g, &judged::mmvet_items(questions), dir)
            })?);
            let predictions = judged::require(&got, questions.iter().map(|q| q.id.as_str()), "the saved answers")?;
            judged::grade_mmvet(&judge, questions, &predictions, c.runs.unwrap_or(5), dir)?;
        }
        Inputs::LlavaBench(files) => {
            let c = cfg.llava_bench.as_ref().context("[llava_bench]")?;
            let judge = judge(cfg, &c.judge_model, dir, &[&c.questions, &c.context, &c.references])?;
            let g = gen(&c.images, batch, c.max_new_tokens);
            let got = judged::by_id(answers(dir, || {
                judged::generate(model.get()?, margs, &g, &judged::llava_items(&files.questions), dir)
            })?);
            files.review(&judge, &got, "the saved answers", dir)?;
        }
        Inputs::MmHal(records) => {
            let c = cfg.mmhal.as_ref().context("[mmhal]")?;
            let judge = judge(cfg, &c.judge_model, dir, &[&c.questions])?;
            let g = gen(&c.images, batch, c.max_new_tokens);
            let got = answers(dir, || judged::generate(model.get()?, margs, &g, &judged::mmhal_items(records), dir))?;
            let texts = judged::mmhal_responses(records, got, dir)?;
            judged::judge_mmhal(&judge, records, &texts, dir)?;
        }
    }
    Ok(())
}
