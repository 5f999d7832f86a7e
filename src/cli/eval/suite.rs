//! `bpo eval suite`: one model through the benchmarks of a `suite.toml`, one run folder each, one table at
//! the end. The model is loaded once; answers already in a benchmark's folder (`answers.jsonl`) are reused, and
//! the judge's cache makes a re-run ask only what it had not asked, so a killed suite resumes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use bpo::eval::plan::Planned;
use bpo::eval::run::saved_answers;
use bpo::eval::suite::{self, SuiteConfig, SuiteInfo};
use bpo::eval::{Answers, Context};
use bpo::generate::{EngineOptions, SamplingParams};
use bpo::model::Vlm;

use super::judged::open_judge;
use super::{answering, finish, lock_run};
use crate::cli::{bars, ModelArgs};

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

pub fn run_suite(a: SuiteArgs) -> anyhow::Result<()> {
    let cfg = SuiteConfig::load(&a.config)?;
    let mut inputs: Vec<&Path> = cfg.paths().into_iter().map(|(_, p, _)| p).collect();
    inputs.extend([a.config.as_path(), &a.model.model]);
    let adapter = a.model.adapter()?;
    inputs.extend(adapter);
    let _lock = lock_run(&a.out, &inputs)?;
    let mut info = SuiteInfo {
        model: a.model.model.display().to_string(),
        adapter: adapter.map(|p| p.display().to_string()),
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
        if let Some(plan) = cfg.benchmark(name).with_context(|| format!("{}: [{section}]", a.config.display()))? {
            prepared.push(plan);
        }
    }
    let batch = EngineOptions::rows(cfg.batch_size.unwrap_or(8), None);
    let mut model = Lazy { args: &a.model, vlm: None };
    for plan in &prepared {
        let name = plan.name;
        run_one(plan, &cfg, &mut model, &batch, &a.out.join(name))?;
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

/// Runs a planned benchmark into its run folder `dir` (locked while it runs): answers an earlier run saved there are
/// reused, else the model answers.
fn run_one(
    plan: &Planned,
    cfg: &SuiteConfig,
    model: &mut Lazy,
    batch: &EngineOptions,
    dir: &Path,
) -> anyhow::Result<()> {
    let _lock = lock_run(dir, &[])?;
    outln!("\n== {}", plan.name);
    let judge = match (&plan.judge, &cfg.judge) {
        (Some((model, inputs)), Some(j)) => Some(open_judge(&j.options(model.as_deref(), dir, inputs)?)?),
        _ => None,
    };
    let answers = match saved_answers(dir)? {
        Some(rows) => {
            errln!("reusing {}", dir.join(bpo::eval::run::ANSWERS_FILE).display());
            Answers::Saved(rows)
        }
        None => {
            let params = SamplingParams { max_new_tokens: plan.max_new_tokens, ..Default::default() };
            let how = answering(model.args, &params, batch);
            Answers::Model { vlm: model.get()?, how }
        }
    };
    let scores =
        plan.bench.run(answers, &Context { judge: judge.as_ref().map(|j| j as _), out: Some(dir), events: &bars() })?;
    finish(&scores, Some(dir))
}
