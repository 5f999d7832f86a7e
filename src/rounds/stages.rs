//! The stages of one round, each through the library call its own command makes, and the `done.json` record of
//! the stages complete.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::{round_dir, Next, Plan, Stage, DONE_FILE};
use crate::bootstrap::{run_inject, run_weaken};
use crate::data::pairs::{read_record_shards, write_pairs};
use crate::data::{expand, read_input, InputFormat, InputOptions, Record, ResumableWriter, RunCounts, Shape};
use crate::eval::plan::{LazyModel, Planned};
use crate::eval::suite::{self, SuiteInfo};
use crate::progress::Events;
use crate::train::checkpoint::checkpoints;
use crate::train::{dpo, Hooks};
use crate::{bail, output, Error, Result};

/// `done.json`: the stages of a round whose outputs are complete.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Done {
    stages: Vec<Stage>,
}

/// A loop at work: the plan, its output folder, where it reports.
pub(super) struct Round<'p, 'a> {
    pub plan: &'p Plan<'a>,
    pub out: &'p Path,
    pub events: &'p dyn Events,
    pub prepared: Option<&'p [Planned]>,
    pub stop: Option<&'p AtomicBool>,
}

impl Round<'_, '_> {
    /// Runs the stages of round `r` not yet done (round 0: the starting model's evaluation). False when `stop` was
    /// set: training stops after its step with a checkpoint, another stage is finished first.
    pub fn round(&self, r: usize, hooks: &mut dyn Hooks) -> Result<bool> {
        let dir = round_dir(self.out, r);
        output::create_dir(&dir)?;
        let done_path = dir.join(DONE_FILE);
        let mut done: Done = if done_path.exists() { crate::jsonl::read_json(&done_path)? } else { Done::default() };
        let policy = self.policy(r);
        for stage in Stage::ALL {
            let wanted = match stage {
                Stage::Weaken => self.plan.weaken.is_some(),
                Stage::Inject => self.plan.inject.is_some(),
                Stage::Eval => self.plan.eval.is_some(),
                _ => r > 0,
            };
            if !wanted || (r == 0 && stage != Stage::Eval) || done.stages.contains(&stage) {
                continue;
            }
            if self.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                return Ok(false);
            }
            self.events.message(&format!("round {r}/{}: {}", self.plan.rounds, stage.name()));
            match stage {
                Stage::Weaken => self.weaken(&dir, &policy),
                Stage::Inject => self.inject(&dir, &policy),
                Stage::Pairs => self.pairs(&dir),
                Stage::Train => {
                    if !self.train(r, &dir, &policy, hooks)? {
                        return Ok(false);
                    }
                    Ok(())
                }
                Stage::Merge => self.merge(&dir, &policy),
                Stage::Eval => self.eval(r, &dir, &if r == 0 { policy.clone() } else { dir.join("model") }),
            }
            .map_err(|e| Error::invalid(format!("round {r}, {}: {e}", stage.name())))?;
            done.stages.push(stage);
            output::write_json(&done_path, &done)?;
        }
        Ok(true)
    }

    /// The model round `r` bootstraps from: the starting model, then the last round's merged model.
    fn policy(&self, r: usize) -> PathBuf {
        match r {
            0 | 1 => self.plan.model.clone(),
            _ => round_dir(self.out, r - 1).join("model"),
        }
    }

    /// The records the bootstrap stages leave: the inject output, else the weaken output.
    fn records(&self, dir: &Path) -> PathBuf {
        dir.join(if self.plan.inject.is_some() { "records.jsonl" } else { "weaken.jsonl" })
    }

    fn weaken(&self, dir: &Path, policy: &Path) -> Result<()> {
        let Some(w) = &self.plan.weaken else { return Ok(()) };
        w.options.validate()?;
        let records = read_input(&self.plan.data, &self.plan.input)?.records;
        let (mut writer, _) = ResumableWriter::open_as(&dir.join("weaken.jsonl"), Shape::RECORDS, &[&self.plan.data])?;
        let vlm = (w.load)(policy)?;
        let counts = run_weaken(&vlm, records, &w.options, &mut writer, self.events)?;
        self.written("weaken", &counts.records, counts.added, &counts.errors, "because their image could not be read")
    }

    fn inject(&self, dir: &Path, policy: &Path) -> Result<()> {
        let Some(i) = &self.plan.inject else { return Ok(()) };
        let records: Vec<Record> = if self.plan.weaken.is_some() {
            let opts = InputOptions { format: InputFormat::Records, first_turn_only: false };
            read_input(&dir.join("weaken.jsonl"), &opts)?.records
        } else {
            read_input(&self.plan.data, &self.plan.input)?.records
        };
        let (mut writer, _) = ResumableWriter::open_as(&dir.join("records.jsonl"), Shape::RECORDS, &[&self.plan.data])?;
        let llm = (i.llm)(policy)?;
        let counts = run_inject(records, llm.as_ref(), &i.options, &mut writer, self.events)?;
        self.written("inject", &counts.records, counts.added, &counts.errors, "because they failed")
    }

    /// Reports what a bootstrap stage wrote; records it could not finish fail the stage (a re-run retries them).
    fn written(&self, stage: &str, records: &RunCounts, added: usize, errors: &[String], why: &str) -> Result<()> {
        self.events.message(&format!("{stage}: {} records written, {added} negatives added", records.written));
        if records.failed > 0 {
            bail!(
                "{} records were not written {why} (first: {})",
                records.failed,
                errors.first().map(String::as_str).unwrap_or("?")
            );
        }
        Ok(())
    }

    /// The pairs of the round's records, in the order of the record ids: the records files hold records in the
    /// order they were finished, which a resumed run changes.
    fn pairs(&self, dir: &Path) -> Result<()> {
        let mut records = read_record_shards(&[self.records(dir)])?;
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let (format, opts) = &self.plan.pairs;
        let (pairs, stats) = expand(&records, opts);
        self.events.message(&format!("{stats}"));
        write_pairs(&dir.join("pairs.jsonl"), &pairs, *format)
    }

    /// The model round `r` trains (and merges into): the policy, or with [`Next::Adapter`] the starting model.
    fn base(&self, policy: &Path) -> PathBuf {
        match self.plan.next {
            Next::Merged => policy.to_path_buf(),
            Next::Adapter => self.plan.model.clone(),
        }
    }

    /// DPO on the round's pairs into `train/`, continuing its newest checkpoint; a run folder without one (killed
    /// before its first checkpoint) starts again. False when stopped.
    fn train(&self, r: usize, dir: &Path, policy: &Path, hooks: &mut dyn Hooks) -> Result<bool> {
        let mut cfg = self.plan.train.clone();
        cfg.data = dir.join("pairs.jsonl");
        cfg.setup.model = self.base(policy);
        cfg.setup.init_adapter = match self.plan.next {
            Next::Adapter if r > 1 => Some(round_dir(self.out, r - 1).join("train")),
            _ => None,
        };
        let run = dir.join("train");
        let resume = run.is_dir() && !checkpoints(&run)?.is_empty();
        if run.exists() && !resume {
            std::fs::remove_dir_all(&run).map_err(|e| Error::io(&run, e))?;
        }
        let report = dpo::train(&cfg, &run, resume, self.stop, hooks, self.events)?;
        Ok(!report.summary.interrupted)
    }

    /// The adapter folded into the model it was trained on, written as `model/` in one rename.
    fn merge(&self, dir: &Path, policy: &Path) -> Result<()> {
        let base = self.base(policy);
        let adapter = dir.join("train");
        output::write_dir(&dir.join("model"), |tmp| crate::train::merge(&base, &adapter, tmp).map(|_| ()))
    }

    /// The suite of `model` into `eval/`, reusing what an interrupted run saved there.
    fn eval(&self, r: usize, dir: &Path, model: &Path) -> Result<()> {
        let (Some(e), Some(prepared)) = (&self.plan.eval, self.prepared) else { return Ok(()) };
        let out = dir.join("eval");
        output::create_dir(&out)?;
        let info = suite::read_info(&out)?.unwrap_or_else(|| SuiteInfo {
            model: model.display().to_string(),
            adapter: None,
            benchmarks: Vec::new(),
        });
        let load = || (e.load)(model);
        e.suite.run(
            prepared,
            &mut LazyModel::new(&load),
            &format!("round-{r}"),
            info,
            &out,
            self.events,
            &mut |_, _, _| {},
        )
    }
}
