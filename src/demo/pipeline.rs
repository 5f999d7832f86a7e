//! The demo's driver: the recipe (every setting of every stage), the per-seed pipeline, the SFT model cache, and
//! the final report over seeds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bootstrap::{self as boot, BootstrapFiles, BootstrapOptions, BootstrapStats, Chosen, NegativeForm};
use super::data::{World, WorldFiles};
use super::eval::{self, EvalScores};
use super::model::{init_model, ModelSpec};
use super::progress::Stages;
use super::report::Row;
use super::train::{self, PrefSettings, SftSettings};
use super::world::WorldConfig;
use crate::hash::stable_hash;
use crate::model::Vlm;
use crate::model::{LoadOptions, Pass, Runtime};
use crate::output::write_json;
use crate::text::Template;
use crate::{jsonl, Error, Result};

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
}

impl Recipe {
    pub fn standard() -> Self {
        Recipe {
            world: WorldConfig::standard(),
            model: ModelSpec::standard(),
            perception: None,
            lm: SftSettings { epochs: 2, batch: 64, lr: 2e-3, plain_text: true, train_vision: false },
            sft: SftSettings { epochs: 4, batch: 32, lr: 2e-3, plain_text: false, train_vision: false },
            bootstrap: BootstrapOptions {
                images: 2000,
                noise_step: 500,
                temperature: 1.0,
                batch: 64,
                seed: 0,
                negatives: NegativeForm::Add,
                chosen: Chosen::Annotation,
            },
            dpo: PrefSettings {
                epochs: 1,
                batch: 16,
                lr: 2e-3,
                beta: 0.1,
                rank: 8,
                alpha: 16.0,
                sft_weight: 0.5,
                train_projector: false,
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
    /// The runtime every stage uses: f32 on the CPU, with the fused kernels unless [`Recipe::generic_ops`].
    pub fn runtime(&self) -> Runtime {
        match self.generic_ops {
            true => Runtime::generic(candle_core::Device::Cpu, candle_core::DType::F32),
            false => Runtime::default(),
        }
    }

    fn env(&self, seed: u64) -> train::RunEnv {
        train::RunEnv { seed, runtime: self.runtime() }
    }

    fn load(&self) -> LoadOptions {
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

/// The demo's claims checked on the rows ([`super::report::acceptance`]), as text.
pub fn claim(rows: &[Row]) -> String {
    let roles =
        super::report::Roles { sft: ROWS[0].0, control: ROWS[1].0, bpo: ROWS[4].0, halves: &[ROWS[2].0, ROWS[3].0] };
    super::report::acceptance_text(&super::report::acceptance(rows, &roles))
}

/// The terminal table with [`claim`] below it.
pub fn results_text(rows: &[Row]) -> String {
    format!("{}\n\n{}", super::report::table(rows), claim(rows))
}

/// What one seed produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedResult {
    pub seed: u64,
    pub dir: PathBuf,
    pub model: PathBuf,
    /// Scores per row, in [`ROWS`] order.
    pub scores: Vec<EvalScores>,
    pub bootstrap: BootstrapStats,
    pub world_stats: serde_json::Value,
}

/// What the whole demo produced.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub rows: Vec<Row>,
    pub table: String,
    pub report: PathBuf,
    pub seeds: Vec<SeedResult>,
    /// (stage, seconds).
    pub timings: Vec<(String, f64)>,
    /// Wall-clock seconds of the seeds (seeds side by side overlap, so the stage times add up to more).
    pub wall: f64,
}

/// What a worker leaves for one seed: its result and its stage timings.
type SeedSlot = std::sync::Mutex<Option<(Result<SeedResult>, Vec<(String, f64)>)>>;

/// Runs the demo: every seed (`opts.jobs` at a time), then the report.
pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    crate::output::create_dir(&opts.out)?;
    let start = std::time::Instant::now();
    let mut stages = Stages::new(opts.progress);
    let n = opts.seeds.max(1);
    let seeds: Vec<u64> = (0..n as u64).map(|i| opts.seed + i).collect();
    // Each seed is independent: workers take the next seed until none is left (or one has failed).
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let done: Vec<SeedSlot> = seeds.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if i >= n || failed.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let seed = seeds[i];
        let mut own = stages.child(&format!("seed {seed}: "));
        own.note(&format!("seed {seed} ({} of {n})", i + 1));
        // A panic stops the other workers too, instead of surfacing only after every seed has run.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(opts, seed, &mut own)))
            .unwrap_or_else(|_| Err(Error::invalid(format!("seed {seed}: the pipeline panicked"))));
        if result.is_err() {
            failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        *done[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((result, own.timings));
    };
    // Each worker computes on a rayon pool of its own (candle's matmuls and convolutions run on the current pool),
    // of the threads `set_cpu_threads` gave each job.
    let threads = crate::model::runtime::cpu_threads();
    let worker = || match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    };
    std::thread::scope(|s| {
        for _ in 1..opts.jobs.clamp(1, n) {
            s.spawn(worker);
        }
        worker();
    });
    let mut results = Vec::new();
    for slot in done {
        if let Some((result, timings)) = slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            results.push(result?);
            stages.timings.extend(timings);
        }
    }
    let seeds = results;
    let rows: Vec<Row> = ROWS
        .iter()
        .enumerate()
        .map(|(r, (name, _))| Row { name: name.to_string(), runs: seeds.iter().map(|s| s.scores[r].clone()).collect() })
        .collect();
    let stage = stages.start("report", 0);
    let wall = start.elapsed().as_secs_f64();
    let report = super::summary::write_report(opts, &rows, &seeds, &stages.timings, wall)?;
    stages.finish(stage, "");
    let table = results_text(&rows);
    Ok(DemoSummary { rows, table, report, seeds, timings: stages.timings, wall })
}

/// The pipeline for one seed.
fn run_seed(opts: &DemoOptions, seed: u64, stages: &mut Stages) -> Result<SeedResult> {
    let r = &opts.recipe;
    let dir = opts.out.join(format!("seed-{seed}"));
    let stage = stages.start("world", r.world.train_images + r.world.eval_images);
    let world = World::generate(&r.world, seed);
    let files = world.write(&dir.join("world"), &stage)?;
    stages.finish(
        stage,
        &format!("{} corpus scenes, {} + {} images", world.corpus.len(), world.train.len(), world.eval.len()),
    );

    let model = sft_model(opts, seed, &files, stages)?;
    let vlm = Vlm::load(&model, &r.load(), Template::LlavaHf)?;
    let mut scores = vec![evaluate(opts, &vlm, &files, &dir.join("eval/sft"), "evaluate SFT", stages)?];

    let bfiles = BootstrapFiles::at(&dir.join("bootstrap"));
    let bstats = bootstrap(opts, seed, &vlm, &model, &world, &files, &bfiles, stages)?;
    drop(vlm);

    let env = r.env(seed);
    for (name, run) in ROWS.iter().skip(1) {
        let out = dir.join("runs").join(run);
        let stage = stages.start(&format!("train {name}"), 0);
        // Pair files are in `boot::VARIANTS` order: both negatives, weakening only, injection only.
        let pairs = |i: usize| bfiles.pairs[i].clone();
        match *run {
            "sft-chosen" => train::sft_on_chosen(&model, &bfiles.chosen, &files.images, &out, &r.dpo, &env, &stage)?,
            "weaken" => train::dpo(&model, &pairs(1), &files.images, &out, &r.dpo, &env, &stage)?,
            "inject" => train::dpo(&model, &pairs(2), &files.images, &out, &r.dpo, &env, &stage)?,
            _ => train::dpo(&model, &pairs(0), &files.images, &out, &r.dpo, &env, &stage)?,
        };
        stages.finish(stage, "");
        let vlm = Vlm::load(&out.join("model"), &r.load(), Template::LlavaHf)?;
        scores.push(evaluate(opts, &vlm, &files, &dir.join("eval").join(run), &format!("evaluate {name}"), stages)?);
    }
    let result = SeedResult { seed, dir: dir.clone(), model, scores, bootstrap: bstats, world_stats: world.stats() };
    jsonl::write(&dir.join("result.jsonl"), std::slice::from_ref(&result))?;
    Ok(result)
}

/// The SFT model of this recipe and seed: from the cache, or trained (corpus, then instruction data) into it.
fn sft_model(opts: &DemoOptions, seed: u64, files: &WorldFiles, stages: &mut Stages) -> Result<PathBuf> {
    let r = &opts.recipe;
    let dir = opts.out.join("models").join(format!("sft-{}", r.model_hash(seed)));
    let done = dir.join("recipe.json");
    if done.exists() {
        stages.note(&format!("  SFT model cached: {}", dir.display()));
        return Ok(dir);
    }
    let init = opts.out.join("models").join(format!("init-{}", r.model_hash(seed)));
    init_model(&init, &r.model, &super::data::tokenizer_words(), seed)?;
    if let Some(p) = &r.perception {
        let seen = opts.out.join("models").join(format!("perception-{}", r.model_hash(seed)));
        let stage = stages.start("perception pre-training", 0);
        let settings = SftSettings { train_vision: true, plain_text: false, ..p.clone() };
        train::sft(&init, &files.perception, &files.images, &seen, &settings, &r.env(seed), &stage)?;
        train::keep_vision_tower(&seen, &init)?;
        stages.finish(stage, "");
        std::fs::remove_dir_all(&seen).map_err(|e| Error::io(&seen, e))?;
    }
    let lm = opts.out.join("models").join(format!("lm-{}", r.model_hash(seed)));
    let stage = stages.start("pre-train LM on the corpus", 0);
    train::sft(&init, &files.corpus, &files.images, &lm, &r.lm, &r.env(seed), &stage)?;
    stages.finish(stage, "");
    let stage = stages.start("visual instruction tuning", 0);
    train::sft(&lm, &files.train, &files.images, &dir, &r.sft, &r.env(seed), &stage)?;
    stages.finish(stage, "");
    // Keep the LM stage's curve beside the model: the report plots both.
    let lm_metrics = lm.join("metrics.jsonl");
    crate::output::write_with(&dir.join("lm_metrics.jsonl"), |tmp| {
        std::fs::copy(&lm_metrics, tmp).map(drop).map_err(|e| Error::io(&lm_metrics, e))
    })?;
    for d in [&init, &lm] {
        std::fs::remove_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    // Written last and atomically: its presence marks the cached model complete.
    write_json(&done, &serde_json::json!({"seed": seed, "recipe": r}))?;
    Ok(dir)
}

fn evaluate(
    opts: &DemoOptions,
    vlm: &Vlm,
    files: &WorldFiles,
    out: &Path,
    name: &str,
    stages: &mut Stages,
) -> Result<EvalScores> {
    let stage = stages.start(name, eval::request_count(files)?);
    let ev = eval::evaluate(vlm, files, out, opts.recipe.eval_batch, Pass::INFER, &stage)?;
    let s = &ev.scores;
    stages.finish(
        stage,
        &format!(
            "CHAIR_i {:.1}  recall {:.1}  POPE-adv F1 {:.1}",
            100.0 * s.chair.chair_i,
            100.0 * s.chair.object_recall,
            100.0 * s.pope_f1("adversarial")
        ),
    );
    Ok(ev.scores)
}

/// Records, length matching, balancing and pair files for one seed.
#[allow(clippy::too_many_arguments)] // the demo's stage inputs, each a different kind of thing
fn bootstrap(
    opts: &DemoOptions,
    seed: u64,
    vlm: &Vlm,
    model: &Path,
    world: &World,
    files: &WorldFiles,
    out: &BootstrapFiles,
    stages: &mut Stages,
) -> Result<BootstrapStats> {
    let bo = BootstrapOptions { seed, ..opts.recipe.bootstrap.clone() };
    let dir = out.records.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let records = boot::gt_records(&world.train, bo.images, bo.chosen);
    let mut stats = BootstrapStats { records: records.len(), ..Default::default() };
    let stage = stages.start("bootstrap: weakened images", 0);
    let (records, weakened) =
        boot::weaken_negatives(vlm, records, &files.images, &dir.join("weakened.jsonl"), &bo, &stage)?;
    stats.weakened_answers = weakened;
    stages.finish(stage, &format!("{weakened} answers"));
    let stage = stages.start("bootstrap: continue injection", 0);
    let (captions, rest): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.prompt == super::world::DESCRIBE);
    let (captions, injected) =
        boot::inject_negatives(model, &opts.recipe.load(), captions, &dir.join("injected.jsonl"), &bo, &stage)?;
    stats.injected_answers = injected;
    stages.finish(stage, &format!("{injected} answers"));
    let records: Vec<_> = captions.into_iter().chain(rest).collect();
    jsonl::write(&out.raw, &records)?;
    let matched = boot::match_and_balance(&records, bo.negatives, seed, &mut stats);
    jsonl::write(&out.records, &matched)?;
    stats.pairs = boot::write_pairs(&matched, out)?;
    stages.note(&format!(
        "  pairs: {} BPO, {} weakening only, {} injection only; description negatives with more / fewer partner pairs than the truth: {} / {}",
        stats.pairs[0], stats.pairs[1], stats.pairs[2], stats.more_prior, stats.less_prior
    ));
    Ok(stats)
}
