//! The demo's recipe (every setting of every stage, and the key of the cached SFT model), what `bpo demo` is asked
//! to do, the experiment's rows and what a seed produces.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::bootstrap::{BootstrapOptions, BootstrapStats, Chosen, NegativeForm};
use super::eval::EvalScores;
use super::model::ModelSpec;
use super::report::Row;
use super::train::{PrefSettings, RunEnv, SftSettings};
use super::world::WorldConfig;
use crate::hash::stable_hash;
use crate::model::{LoadOptions, Runtime};
use crate::train::dpo::MdpoConfig;
use crate::{Error, Result};

/// Bumped when a change to the code makes cached SFT models stale.
const RECIPE_VERSION: u32 = 2;

/// Every setting of every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub world: WorldConfig,
    pub model: ModelSpec,
    /// Perception pre-training (none when absent): vision tower, projector and a throw-away language model trained
    /// to list each training image's objects; only the vision tower is kept, frozen from then on, as LLaVA starts
    /// from a pretrained CLIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perception: Option<SftSettings>,
    /// Language-model pre-training on the text-only corpus.
    pub lm: SftSettings,
    /// Visual instruction tuning of the whole model.
    pub sft: SftSettings,
    pub bootstrap: BootstrapOptions,
    /// LoRA runs on the bootstrapped pairs: DPO for the three BPO rows, and the same settings for the control
    /// (supervised training on the chosen answers, one example per pair, so it sees the same prompts as often).
    pub dpo: PrefSettings,
    pub eval_batch: usize,
    /// Every stage on candle's device-generic ops (what CUDA runs) instead of the fused f32 CPU kernels: the same
    /// math, rounded differently. The demo's claims are checked under this perturbation too (docs/demo.md). Part of
    /// the SFT model's cache key when on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generic_ops: bool,
    /// The rows past the paper ([`PAST_ROWS`]); absent (`bpo demo --paper-only`): the paper's rows only. Not part
    /// of the SFT model's cache key, and computed after every other row, so those rows stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_the_paper: Option<PastThePaper>,
}

/// Settings of the rows past the paper. "BPO, round 2" bootstraps again from the BPO row's merged model with the
/// recipe's bootstrap settings and trains a new LoRA DPO run on it (policy and reference: that merged model, as
/// `bpo loop` does); "BPO + image-side preference" is the BPO row's run with mDPO's terms added.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PastThePaper {
    pub mdpo: MdpoConfig,
}

impl PastThePaper {
    /// mDPO's released weights, with the corrupted image at diffusion step `noise_step` (the demo's: its image
    /// weakening's).
    pub fn new(noise_step: usize) -> Self {
        PastThePaper { mdpo: MdpoConfig { noise_step, ..MdpoConfig::default() } }
    }
}

impl Recipe {
    pub fn standard() -> Self {
        let bootstrap = BootstrapOptions {
            images: 2000,
            noise_step: 500,
            temperature: 1.0,
            batch: 64,
            seed: 0,
            negatives: NegativeForm::Add,
            chosen: Chosen::Annotation,
        };
        Recipe {
            world: WorldConfig::standard(),
            model: ModelSpec::standard(),
            perception: None,
            lm: SftSettings { epochs: 2, batch: 64, lr: 2e-3, plain_text: true, train_vision: false },
            sft: SftSettings { epochs: 4, batch: 32, lr: 2e-3, plain_text: false, train_vision: false },
            // mDPO's corrupted image is made like the weakened images.
            past_the_paper: Some(PastThePaper::new(bootstrap.noise_step)),
            bootstrap,
            dpo: PrefSettings {
                epochs: 1,
                batch: 16,
                lr: 2e-3,
                beta: 0.1,
                rank: 8,
                alpha: 16.0,
                sft_weight: 0.5,
                train_projector: false,
                mdpo: None,
            },
            eval_batch: 64,
            generic_ops: false,
        }
    }

    /// A few seconds of everything, for tests.
    pub fn quick() -> Self {
        let s = Recipe::standard();
        Recipe {
            world: WorldConfig::quick(),
            model: ModelSpec::quick(),
            perception: s.perception.map(|p| SftSettings { epochs: 1, batch: 16, ..p }),
            lm: SftSettings { epochs: 1, batch: 32, ..s.lm },
            sft: SftSettings { epochs: 1, batch: 16, ..s.sft },
            bootstrap: BootstrapOptions { images: 12, batch: 16, ..s.bootstrap },
            dpo: PrefSettings { epochs: 1, batch: 4, ..s.dpo },
            eval_batch: 16,
            generic_ops: s.generic_ops,
            past_the_paper: s.past_the_paper,
        }
    }

    /// `self` with the keys of `overrides` (a JSON object, possibly partial and nested) replaced.
    pub fn with_overrides(&self, overrides: &serde_json::Value) -> Result<Recipe> {
        let mut base = serde_json::to_value(self).map_err(Error::invalid)?;
        merge_json(&mut base, overrides);
        serde_json::from_value(base).map_err(|e| Error::invalid(format!("recipe: {e}")))
    }

    /// The part of the recipe (and the seed) that decides the SFT model: its cache key.
    pub fn model_hash(&self, seed: u64) -> String {
        let mut key = serde_json::json!({"v": RECIPE_VERSION, "world": self.world, "model": self.model, "lm": self.lm, "sft": self.sft, "seed": seed});
        if let Some(p) = &self.perception {
            key["perception"] = serde_json::json!(p);
        }
        if self.generic_ops {
            key["generic_ops"] = serde_json::json!(true);
        }
        format!("{:016x}", stable_hash(&[&key.to_string()]))
    }
}

impl Recipe {
    /// The experiment's rows, in table order: [`ROWS`], then [`PAST_ROWS`] when [`Recipe::past_the_paper`].
    pub fn rows(&self) -> Vec<(&'static str, &'static str)> {
        let past: &[(&str, &str)] = if self.past_the_paper.is_some() { &PAST_ROWS } else { &[] };
        ROWS.iter().chain(past).copied().collect()
    }

    /// The runtime every stage uses: f32 on the CPU, with the fused kernels unless [`Recipe::generic_ops`].
    pub fn runtime(&self) -> Runtime {
        match self.generic_ops {
            true => Runtime::generic(candle_core::Device::Cpu, candle_core::DType::F32),
            false => Runtime::default(),
        }
    }

    pub(super) fn env(&self, seed: u64) -> RunEnv {
        RunEnv { seed, runtime: self.runtime() }
    }

    pub(super) fn load(&self) -> LoadOptions {
        LoadOptions::new(&self.runtime())
    }
}

/// Replaces the values of `base` by those of `top`, recursing into objects.
fn merge_json(base: &mut serde_json::Value, top: &serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(b), serde_json::Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, t) => *b = t.clone(),
    }
}

/// What `bpo demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// First seed; seed `i` of `seeds` is `seed + i`.
    pub seed: u64,
    pub seeds: usize,
    /// Seeds run side by side (each best on one CPU thread: `set_cpu_threads`).
    pub jobs: usize,
    pub recipe: Recipe,
    /// Show stage progress on stderr.
    pub progress: bool,
}

/// The rows of the experiment, in table order: (name, run folder name).
pub const ROWS: [(&str, &str); 5] = [
    ("SFT", "sft"),
    ("SFT on chosen", "sft-chosen"),
    ("BPO weakening only", "weaken"),
    ("BPO injection only", "inject"),
    ("BPO", "bpo"),
];

/// The rows past the paper, after [`ROWS`] (left out by `bpo demo --paper-only`): (name, run folder name).
pub const PAST_ROWS: [(&str, &str); 2] = [("BPO, round 2", "bpo-round-2"), ("BPO + image-side preference", "bpo-mdpo")];

/// The demo's claims checked on the rows ([`super::report::acceptance`]), as text.
pub fn claim(rows: &[Row]) -> String {
    let roles =
        super::report::Roles { sft: ROWS[0].0, control: ROWS[1].0, bpo: ROWS[4].0, halves: &[ROWS[2].0, ROWS[3].0] };
    super::report::acceptance_text(&super::report::acceptance(rows, &roles))
}

/// [`claim`], then the gains of the rows past the paper that `rows` holds.
pub fn verdict(rows: &[Row]) -> String {
    let past = gains_text(rows, &PAST_ROWS.map(|r| r.0), &[ROWS[0].0, ROWS[4].0]);
    match past.is_empty() {
        true => claim(rows),
        false => format!("{}\n\n{past}", claim(rows)),
    }
}

/// The paired gains (as [`super::report::acceptance`] computes them) of each row named in `treated` against each
/// row named in `bases`, on the prior's metrics, CHAIR_i and recall; empty when `rows` holds none of `treated`.
fn gains_text(rows: &[Row], treated: &[&str], bases: &[&str]) -> String {
    use super::report::{column, Effect};
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    let mut t = String::new();
    for new in treated.iter().filter_map(|n| row(n)) {
        for base in bases.iter().filter_map(|n| row(n)) {
            let gains: Vec<String> = [("partner", 1), ("F1 adv", 2), ("CHAIR_i", 2), ("recall", 1)]
                .iter()
                .map(|&(col, digits)| {
                    let c = column(col);
                    let e = Effect::paired(&c.values(base), &c.values(new), c.lower_better);
                    format!("{col} {:+.digits$}±{:.digits$}", e.mean, e.sd)
                })
                .collect();
            t.push_str(&format!("  {} vs {}: {}\n", new.name, base.name, gains.join(", ")));
        }
    }
    if t.is_empty() {
        return t;
    }
    format!("past the paper, gains paired by seed:\n{t}gain: improvement in points (partner and CHAIR_i down, F1 and recall up) against the same seed's row, mean±sd")
}

/// The terminal table with [`verdict`] below it.
pub fn results_text(rows: &[Row]) -> String {
    format!("{}\n\n{}", super::report::table(rows), verdict(rows))
}

/// What one seed produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedResult {
    pub seed: u64,
    pub dir: PathBuf,
    pub model: PathBuf,
    /// Scores per row, in [`Recipe::rows`] order.
    pub scores: Vec<EvalScores>,
    pub bootstrap: BootstrapStats,
    /// Round 2's bootstrap ("BPO, round 2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round2: Option<BootstrapStats>,
    pub world_stats: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rows_past_the_paper_follow_the_others_and_leave_the_sft_model_key_alone() {
        let on = Recipe::standard();
        let off = Recipe { past_the_paper: None, ..on.clone() };
        assert_eq!(on.rows()[..ROWS.len()], ROWS[..]);
        assert_eq!(on.rows()[ROWS.len()..], PAST_ROWS[..]);
        assert_eq!(off.rows(), ROWS.to_vec());
        assert_eq!(on.model_hash(3), off.model_hash(3));
        assert_ne!(on.model_hash(3), on.model_hash(4));
        // The recipe without them prints as it did before they existed.
        assert!(!serde_json::to_string(&off).unwrap().contains("past_the_paper"));
        assert_eq!(on.with_overrides(&serde_json::json!({"past_the_paper": null})).unwrap(), off);
    }
}
