//! `bpo eval suite`: one model through the benchmarks of a `suite.toml`, one run folder each, one table at
//! the end. The model is loaded once; answers already in a benchmark's folder (`answers.jsonl`) are reused, and
//! the judge's cache makes a re-run ask only what it had not asked, so a killed suite resumes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use bpo::eval::plan::LazyModel;
use bpo::eval::suite::{self, SuiteConfig, SuiteInfo};

use bpo::eval::report::Scores;

use super::{finish, lock_run};
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

impl SuiteArgs {
    /// How the model is loaded.
    pub fn model(&self) -> &ModelArgs {
        &self.model
    }

    /// The suite file.
    pub fn config(&self) -> &Path {
        &self.config
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
    let prepared = cfg.prepare().with_context(|| a.config.display().to_string())?;
    let load = || a.model.load().map_err(|e| bpo::Error::invalid(crate::cli::error_line(&e)));
    let mut scored = |name: &str, scores: &Scores, dir: &Path| {
        outln!("\n== {name}");
        // Printing never fails: finish only prints.
        let _ = finish(scores, Some(dir));
    };
    cfg.run(&prepared, &mut LazyModel::new(&load), &a.model.model_id(), info, &a.out, &bars(), &mut scored)?;
    let label = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    outln!("\n{}", suite::table(&[(label, suite::suite_headlines(&a.out)?)]));
    Ok(())
}
