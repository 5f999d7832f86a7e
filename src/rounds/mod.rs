//! `bpo loop`: BPO in rounds, as iterative DPO runs it. Each round bootstraps negatives from the current policy
//! (image weakening, error injection), pairs them with the ground truth, trains with DPO, folds the adapter into a
//! model folder and evaluates it; the next round starts from that merged model, as policy and as reference.
//!
//! Everything a round makes stays in its own folder of the loop's output:
//!
//! ```text
//! OUT/loop.json                 the settings the loop runs with (a restart with others is refused)
//! OUT/round-0/eval/             the starting model's suite (bpo eval suite's folder)
//! OUT/round-N/weaken.jsonl      records with mllm-hal negatives (bpo bootstrap weaken)
//! OUT/round-N/records.jsonl     ... and llm-hal negatives (bpo bootstrap inject)
//! OUT/round-N/pairs.jsonl       preference pairs (bpo pairs)
//! OUT/round-N/train/            the DPO run folder (bpo train)
//! OUT/round-N/model/            the merged model (bpo merge): the next round's policy and reference
//! OUT/round-N/eval/             its suite
//! OUT/round-N/done.json         the stages of the round that are complete
//! OUT/rounds.txt                one row per round, the suites' headline numbers
//! ```
//!
//! Resuming: every stage writes its outputs atomically or resumably (the record files skip ids already written,
//! training continues from its newest checkpoint, a suite reuses saved answers), and a stage is recorded in
//! `done.json` (replaced atomically) only once its outputs are complete. A run killed at any point and started
//! again skips the stages recorded and redoes at most the interrupted one, from where its own resume logic
//! allows, so it ends with the same files as a run never interrupted.

mod stages;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::bootstrap::{Completer, InjectOptions, WeakenOptions};
use crate::data::{InputOptions, PairFormat, PairOptions};
use crate::eval::suite::{self, SuiteConfig};
use crate::model::Vlm;
use crate::progress::Events;
use crate::train::{DpoConfig, Hooks};
use crate::{output, Error, Result};

/// Loads a model folder as a stage runs it (template, aspect, device and precision decided by the caller).
pub type Loader<'a> = &'a dyn Fn(&Path) -> Result<Vlm>;

/// The text LLM that injects errors, given the round's policy folder (BPO's default LLM is the MLLM's own).
pub type LlmFor<'a> = &'a dyn Fn(&Path) -> Result<Box<dyn Completer>>;

/// Image weakening: `bpo bootstrap weaken` with these options, the round's policy answering.
pub struct Weaken<'a> {
    pub options: WeakenOptions,
    pub load: Loader<'a>,
}

/// Error injection: `bpo bootstrap inject` with these options.
pub struct Inject<'a> {
    pub options: InjectOptions,
    pub llm: LlmFor<'a>,
}

/// Evaluation: a suite (`bpo eval suite`'s config) answered by the round's model.
pub struct Eval<'a> {
    pub suite: SuiteConfig,
    pub load: Loader<'a>,
}

/// What round N ≥ 2 trains from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Next {
    /// Round N-1's merged model is the policy and the reference; fresh LoRA adapters (iterative DPO).
    #[default]
    Merged,
    /// The starting model with round N-1's adapter as the initial adapter (`--init-adapter`): the reference is the
    /// starting policy (round N-1's model), the adapters keep their rank.
    Adapter,
}

/// Everything a loop runs: the stages' own options, with the paths each round sets left to the loop.
pub struct Plan<'a> {
    pub rounds: usize,
    /// Round 1's policy and reference.
    pub model: PathBuf,
    /// Prompts with their ground truth, bootstrapped again every round (LLaVA instruct JSON, JSONL, records).
    pub data: PathBuf,
    pub input: InputOptions,
    pub next: Next,
    /// At least one of weaken and inject.
    pub weaken: Option<Weaken<'a>>,
    pub inject: Option<Inject<'a>>,
    pub pairs: (PairFormat, PairOptions),
    /// `bpo train`'s options; the loop sets the model, the initial adapter and the data of each round.
    pub train: DpoConfig,
    pub eval: Option<Eval<'a>>,
    /// What decides the outputs, as the caller spells it (the config file): recorded in `loop.json`; a restart
    /// with other settings is refused.
    pub settings: serde_json::Value,
}

/// A stage of a round, in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Weaken,
    Inject,
    Pairs,
    Train,
    Merge,
    Eval,
}

impl Stage {
    pub const ALL: [Stage; 6] = [Stage::Weaken, Stage::Inject, Stage::Pairs, Stage::Train, Stage::Merge, Stage::Eval];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Weaken => "weaken",
            Stage::Inject => "inject",
            Stage::Pairs => "pairs",
            Stage::Train => "train",
            Stage::Merge => "merge",
            Stage::Eval => "eval",
        }
    }
}

/// How a loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every round done: the table across rounds (also in `OUT/rounds.txt`); empty without evaluation.
    Done(String),
    /// Stopped by `stop` (training after a checkpoint, another stage once finished); running the loop again
    /// continues it.
    Stopped { round: usize },
}

/// The settings file of a loop folder.
pub const SETTINGS_FILE: &str = "loop.json";
/// The stages done, in each round's folder.
pub const DONE_FILE: &str = "done.json";
/// The table across rounds.
pub const TABLE_FILE: &str = "rounds.txt";

/// The folder of round `r` (0: the starting model's evaluation).
pub fn round_dir(out: &Path, r: usize) -> PathBuf {
    out.join(format!("round-{r}"))
}

/// Runs (or continues) the loop of `plan` in `out`, locked while it runs. Each stage that starts is announced
/// through `events.say` as `round R/N: STAGE`; training reports to `hooks`. When `stop` is set, training stops
/// after its step with a checkpoint, another stage when it is done.
pub fn run(
    plan: &Plan,
    out: &Path,
    stop: Option<&AtomicBool>,
    events: &dyn Events,
    hooks: &mut dyn Hooks,
) -> Result<Outcome> {
    if plan.rounds == 0 {
        return Err(Error::Range("rounds = 0: must be at least 1".into()));
    }
    if plan.weaken.is_none() && plan.inject.is_none() {
        crate::bail!("a loop needs a bootstrap stage: weaken, inject or both");
    }
    let mut inputs = vec![plan.model.as_path(), &plan.data];
    inputs.extend(plan.train.images.as_deref());
    output::check_dir(out, &inputs)?;
    output::create_dir(out)?;
    let _lock = output::Lock::dir(out)?;
    check_settings(out, &plan.settings)?;
    let prepared = plan.eval.as_ref().map(|e| e.suite.prepare()).transpose()?;
    let run = stages::Round { plan, out, events, prepared: prepared.as_deref(), stop };
    let first = if plan.eval.is_some() { 0 } else { 1 };
    for r in first..=plan.rounds {
        if !run.round(r, hooks)? {
            return Ok(Outcome::Stopped { round: r });
        }
    }
    let table = table(plan, out)?;
    if !table.is_empty() {
        output::write_bytes(&out.join(TABLE_FILE), format!("{table}\n").as_bytes())?;
    }
    Ok(Outcome::Done(table))
}

/// Records `settings` in `out/loop.json`, or checks them against those recorded there.
fn check_settings(out: &Path, settings: &serde_json::Value) -> Result<()> {
    let path = out.join(SETTINGS_FILE);
    if !path.exists() {
        return output::write_json(&path, settings);
    }
    let old: serde_json::Value = crate::jsonl::read_json(&path)?;
    let differ = crate::train::setup::differing_keys(&old, settings);
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} holds a loop with other settings ({} differ{}); give another output folder",
        out.display(),
        differ.join(", "),
        if differ.len() == 1 { "s" } else { "" }
    )))
}

/// One row per evaluated round (`round 0` is the starting model), one column per headline number.
pub fn table(plan: &Plan, out: &Path) -> Result<String> {
    if plan.eval.is_none() {
        return Ok(String::new());
    }
    let mut rows = Vec::new();
    for r in 0..=plan.rounds {
        rows.push((format!("round {r}"), suite::suite_headlines(&round_dir(out, r).join("eval"))?));
    }
    Ok(suite::table(&rows))
}
