//! BPO's bootstrapping on the demo world: prompts from the grounded instruction data become BPO records; the
//! SFT model answers them from weakened images (`mllm-hal`, [`crate::bootstrap::run_weaken`]) and its own
//! language model continues cut ground truths (`llm-hal`, injection mode `continue`,
//! [`crate::bootstrap::run_inject`] with [`crate::bootstrap::LocalCompleter`]) — the same library calls as
//! `bpo bootstrap weaken` and `bpo bootstrap inject --mode continue`.
//!
//! The chosen answers are the instruction data's own ([`Chosen::Annotation`], as BPO takes the dataset's responses),
//! or the true ones ([`Chosen::Truth`]) where the annotations carry the prior. Then the demo applies the
//! prototype's lessons (demo-world.md) before pairing:
//! - one hallucination per negative (lesson 2): a description negative is *spliced* ([`super::negatives::splice`]): one object it
//!   names that the ground truth lacks (the partner of a ground-truth object when there is one) is added to the
//!   ground truth ([`NegativeForm::Add`], the recipe's) or replaces one of its objects ([`NegativeForm::Swap`]), so
//!   chosen and rejected differ in that object alone; a short-answer negative must have the ground truth's word
//!   count;
//! - balanced yes/no pairs (lesson 3): as many chosen "yes" as chosen "no".

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::data::Grounded;
use crate::bootstrap::{
    run_inject, run_weaken, CompletionOptions, InjectMode, InjectOptions, LocalCompleter, WeakenOptions,
};
use crate::data::records::turn_id;
use crate::data::{expand, Completion, CompletionType, Pair, PairFormat, PairOptions, Record, ResumableWriter};
use crate::model::LoadOptions;
use crate::model::Vlm;
use crate::progress::Events;
use crate::{jsonl, Error, Result};

/// How [`super::negatives::splice`] makes a description negative from the ground truth and one object the model hallucinated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NegativeForm {
    /// The hallucination replaces one ground-truth object: chosen and rejected have the same length. DPO on these
    /// also teaches which of two look-alikes is there, and in a world whose annotations add absent partners it
    /// traded the partners it removed for look-alike swaps (docs/demo.md, run K).
    #[default]
    Swap,
    /// The hallucination is added to the ground truth (at a place hashed from the two answers): the rejected
    /// answer is the chosen one plus one object that is not there, the error a prior-led model makes.
    Add,
}

/// Which answer of a training turn bootstrapping takes as the chosen one, where the instruction data's annotation
/// says something else than the scene ([`super::world::WorldConfig::annotation_prior`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chosen {
    /// The instruction data's own answer, as BPO takes the dataset's responses: the control (more SFT on them) keeps
    /// the prior they carry, and only the preference can remove it.
    #[default]
    Annotation,
    /// The true answer ([`super::conversation::Turn::true_answer`]): the control is then SFT on corrected data, which
    /// removes the annotations' prior by itself (docs/demo.md, run T).
    Truth,
}

/// Bootstrapping settings.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BootstrapOptions {
    /// Grounded images whose conversations become records.
    pub images: usize,
    /// Diffusion step of the weakened images (BPO's release: 900; the demo's recipe: 500, docs/demo.md).
    pub noise_step: usize,
    /// Sampling temperature of both kinds of negatives.
    pub temperature: f32,
    pub batch: usize,
    pub seed: u64,
    /// How description negatives are made ([`super::negatives::splice`]).
    #[serde(default)]
    pub negatives: NegativeForm,
    /// The chosen answers ([`gt_records`]).
    #[serde(default)]
    pub chosen: Chosen,
}

/// Which negatives a pair set uses: the experiment's rows.
pub const VARIANTS: [(&str, &[&str]); 3] =
    [("bpo", &["mllm-hal", "llm-hal"]), ("weaken", &["mllm-hal"]), ("inject", &["llm-hal"])];

/// Counts of one bootstrap run.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct BootstrapStats {
    pub records: usize,
    pub weakened_answers: usize,
    pub injected_answers: usize,
    /// Negatives kept after length matching, by type.
    pub kept_weaken: usize,
    pub kept_inject: usize,
    /// Negatives dropped: not a hallucination (no absent object / the right answer), or not length-matchable.
    pub dropped: usize,
    /// Kept description negatives whose objects hold more partner pairs than their ground truth's: they carry more
    /// of the prior.
    #[serde(default)]
    pub more_prior: usize,
    /// Kept description negatives with fewer partner pairs than their ground truth's: DPO on them would prefer the
    /// prior ([`super::negatives::splice`] makes none).
    #[serde(default)]
    pub less_prior: usize,
    /// Yes/no records dropped to balance chosen yes and chosen no.
    pub dropped_for_balance: usize,
    /// Pairs per variant, in [`VARIANTS`] order.
    pub pairs: Vec<usize>,
}

/// Files one bootstrap run writes.
pub struct BootstrapFiles {
    /// Records as the model made them.
    pub raw: PathBuf,
    /// Length-matched, balanced records.
    pub records: PathBuf,
    /// Pair files per variant, in [`VARIANTS`] order.
    pub pairs: Vec<PathBuf>,
    /// LLaVA JSON of the chosen answers (the "SFT on chosen" control).
    pub chosen: PathBuf,
}

impl BootstrapFiles {
    pub fn at(dir: &Path) -> Self {
        BootstrapFiles {
            raw: dir.join("records_raw.jsonl"),
            records: dir.join("records.jsonl"),
            pairs: VARIANTS.iter().map(|(v, _)| dir.join(format!("pairs_{v}.jsonl"))).collect(),
            chosen: dir.join("chosen.json"),
        }
    }
}

/// Records with only their ground truth (the annotation or the true answer, per `chosen`), one per turn of the first
/// `n` grounded conversations.
pub fn gt_records(train: &[Grounded], n: usize, chosen: Chosen) -> Vec<Record> {
    train
        .iter()
        .take(n)
        .flat_map(|g| {
            g.turns.iter().enumerate().map(move |(i, t)| Record {
                id: turn_id(&g.id, i),
                prompt: t.question.clone(),
                image: Some(g.image.clone()),
                completions: vec![Completion::gt(match chosen {
                    Chosen::Annotation => t.answer.clone(),
                    Chosen::Truth => t.true_answer().to_string(),
                })],
            })
        })
        .collect()
}

/// Adds one answer per record sampled from its weakened image, through [`run_weaken`] (noise and sampling seeded
/// per record id); the records come back from `out`.
pub fn weaken_negatives(
    vlm: &Vlm,
    records: Vec<Record>,
    images: &Path,
    out: &Path,
    opts: &BootstrapOptions,
    events: &dyn Events,
) -> Result<(Vec<Record>, usize)> {
    let weaken = WeakenOptions {
        images: images.to_path_buf(),
        noise_step: opts.noise_step,
        temperature: opts.temperature,
        top_p: 0.95,
        max_new_tokens: 40,
        batch_size: opts.batch,
        seed: opts.seed,
        ..Default::default()
    };
    let _ = std::fs::remove_file(out);
    let (mut writer, _) = ResumableWriter::open(out)?;
    let order: std::collections::HashMap<String, usize> =
        records.iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
    let counts = run_weaken(vlm, records, &weaken, &mut writer, events)?;
    drop(writer);
    // Records are written as they finish; the stages after this one keep the input's order.
    let mut done: Vec<Record> = jsonl::read(out)?;
    done.sort_by_key(|r| order.get(&r.id).copied().unwrap_or(usize::MAX));
    Ok((done, counts.added))
}

/// The seed [`run_weaken`] noised record `id`'s image with (for showing the weakened image).
pub fn weakened_seed(opts_seed: u64, id: &str) -> u64 {
    crate::bootstrap::weaken::noise_seed(opts_seed, id, 0)
}

/// Adds `continue`-mode injected answers to the description records: the model's own language model (loaded
/// without its vision tower, [`LocalCompleter`]) continues each ground truth cut at a word boundary, through
/// [`run_inject`]. Returns the records and how many answers were added.
pub fn inject_negatives(
    model: &Path,
    load: &LoadOptions,
    records: Vec<Record>,
    out: &Path,
    opts: &BootstrapOptions,
    events: &dyn Events,
) -> Result<(Vec<Record>, usize)> {
    let completer = LocalCompleter::load(model, load, opts.batch)?;
    let _ = std::fs::remove_file(out);
    let (mut writer, _) = ResumableWriter::open(out)?;
    let inject = InjectOptions {
        mode: InjectMode::Continue,
        vicuna: false,
        completion: CompletionOptions {
            temperature: opts.temperature,
            top_p: 0.95,
            max_tokens: 40,
            stop: Vec::new(),
            seed: Some(opts.seed),
        },
        batch_size: opts.batch,
        seed: opts.seed,
        ..Default::default()
    };
    let counts = run_inject(records, &completer, &inject, &mut writer, events)?;
    drop(writer);
    Ok((jsonl::read(out)?, counts.added))
}

/// Pairs of one variant: only negatives of the given types.
pub fn variant_pairs(records: &[Record], types: &[&str]) -> Vec<Pair> {
    let filtered: Vec<Record> = records
        .iter()
        .map(|r| Record {
            completions: r
                .completions
                .iter()
                .filter(|c| c.kind == CompletionType::Gt || types.contains(&c.kind.as_str()))
                .cloned()
                .collect(),
            ..r.clone()
        })
        .collect();
    expand(&filtered, &PairOptions::default()).0
}

/// Writes the pair files of every variant and the LLaVA JSON of the chosen answers; returns pair counts.
pub fn write_pairs(records: &[Record], files: &BootstrapFiles) -> Result<Vec<usize>> {
    let mut counts = Vec::new();
    for ((_, types), path) in VARIANTS.iter().zip(&files.pairs) {
        let pairs = variant_pairs(records, types);
        let rows: Vec<serde_json::Value> = pairs.iter().map(|p| p.to_row(PairFormat::Bpo)).collect();
        jsonl::write(path, &rows)?;
        counts.push(pairs.len());
    }
    // The control trains on what BPO prefers, once per pair (so both see the same prompts as often).
    let pairs = variant_pairs(records, VARIANTS[0].1);
    let chosen: Vec<serde_json::Value> = pairs
        .iter()
        .map(|p| serde_json::json!({"id": p.id, "image": p.image, "conversations": [{"from": "human", "value": format!("<image>\n{}", p.prompt)}, {"from": "gpt", "value": p.chosen}]}))
        .collect();
    let text = serde_json::to_string(&chosen).map_err(|e| Error::parse(&files.chosen, None, e))?;
    crate::output::write_bytes(&files.chosen, text.as_bytes())?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::world::{self, DESCRIBE};

    #[test]
    fn chosen_answers_are_the_annotations_or_the_truth() {
        let turns = vec![
            crate::demo::conversation::Turn {
                question: DESCRIBE.into(),
                answer: "a red circle and a blue square".into(),
                kind: "caption".into(),
                truth: Some("a red circle".into()),
            },
            crate::demo::conversation::Turn {
                question: world::exists_question(2),
                answer: "yes".into(),
                kind: "no".into(),
                truth: Some("no".into()),
            },
            crate::demo::conversation::Turn {
                question: world::exists_question(0),
                answer: "yes".into(),
                kind: "yes".into(),
                truth: None,
            },
        ];
        let g = Grounded { id: "t0".into(), image: "t0.png".into(), scene: world::Scene { objects: vec![] }, turns };
        let answers = |chosen| -> Vec<String> {
            gt_records(std::slice::from_ref(&g), 1, chosen)
                .iter()
                .map(|r| r.ground_truth().unwrap().response.clone())
                .collect()
        };
        assert_eq!(answers(Chosen::Annotation), ["a red circle and a blue square", "yes", "yes"]);
        assert_eq!(answers(Chosen::Truth), ["a red circle", "no", "yes"]);
        assert!(gt_records(std::slice::from_ref(&g), 0, Chosen::Truth).is_empty());
    }
}
