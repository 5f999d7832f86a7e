//! The demo's driver: the per-seed pipeline ([`super::recipe`] has its settings), the SFT model cache, and the
//! final report over seeds.

use std::path::{Path, PathBuf};

use super::bootstrap::{self as boot, BootstrapFiles, BootstrapOptions, BootstrapStats};
use super::data::{World, WorldFiles};
use super::eval::{self, EvalScores};
use super::model::init_model;
use super::progress::{Stage, Stages};
use super::recipe::{results_text, DemoOptions, SeedResult, PAST_ROWS, ROWS};
use super::report::Row;
use super::train::{self, PrefSettings, SftSettings};
use crate::model::Pass;
use crate::model::Vlm;
use crate::output::write_json;
use crate::text::Template;
use crate::{jsonl, Error, Result};

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
    let rows: Vec<Row> = opts
        .recipe
        .rows()
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
    for &(name, run) in ROWS.iter().skip(1) {
        // Pair files are in `boot::VARIANTS` order: both negatives, weakening only, injection only.
        let pairs = |i: usize| bfiles.pairs[i].clone();
        let train = |out: &Path, stage: &Stage| match run {
            "sft-chosen" => train::sft_on_chosen(&model, &bfiles.chosen, &files.images, out, &r.dpo, &env, stage),
            "weaken" => train::dpo(&model, &pairs(1), &files.images, out, &r.dpo, &env, stage),
            "inject" => train::dpo(&model, &pairs(2), &files.images, out, &r.dpo, &env, stage),
            _ => train::dpo(&model, &pairs(0), &files.images, out, &r.dpo, &env, stage),
        };
        scores.push(train_and_evaluate(opts, &dir, &files, (name, run), stages, train)?);
    }
    let round2 = match past_rows(opts, seed, &dir, &model, &world, &files, stages)? {
        Some((past, stats)) => {
            scores.extend(past);
            Some(stats)
        }
        None => None,
    };
    let result =
        SeedResult { seed, dir: dir.clone(), model, scores, bootstrap: bstats, round2, world_stats: world.stats() };
    jsonl::write(&dir.join("result.jsonl"), std::slice::from_ref(&result))?;
    Ok(result)
}

/// Trains the row `(name, run)` of the seed folder `dir` into `dir/runs/<run>` with `train` (which leaves the
/// merged model in `<out>/model`), then evaluates that model into `dir/eval/<run>`.
fn train_and_evaluate(
    opts: &DemoOptions,
    dir: &Path,
    files: &WorldFiles,
    (name, run): (&str, &str),
    stages: &mut Stages,
    train: impl FnOnce(&Path, &Stage) -> Result<PathBuf>,
) -> Result<EvalScores> {
    let out = dir.join("runs").join(run);
    let stage = stages.start(&format!("train {name}"), 0);
    train(&out, &stage)?;
    stages.finish(stage, "");
    let vlm = Vlm::load(&out.join("model"), &opts.recipe.load(), Template::LlavaHf)?;
    evaluate(opts, &vlm, files, &dir.join("eval").join(run), &format!("evaluate {name}"), stages)
}

/// The rows past the paper ([`PAST_ROWS`]) of one seed, after every other row (whose files and random streams they
/// leave as they were); none unless the recipe asks for them. "BPO, round 2": the BPO row's merged model
/// bootstraps again (same settings and seed, into `bootstrap-round-2/`) and is policy and reference of a new LoRA
/// DPO run on both negatives, as `bpo loop` does. "BPO + image-side preference": the BPO row's run (SFT model, the
/// same pairs) with mDPO's terms. Returns their scores and round 2's bootstrap counts.
fn past_rows(
    opts: &DemoOptions,
    seed: u64,
    dir: &Path,
    model: &Path,
    world: &World,
    files: &WorldFiles,
    stages: &mut Stages,
) -> Result<Option<(Vec<EvalScores>, BootstrapStats)>> {
    let r = &opts.recipe;
    let Some(past) = r.past_the_paper else { return Ok(None) };
    let env = r.env(seed);
    let merged = dir.join("runs").join(ROWS[4].1).join("model");
    let vlm = Vlm::load(&merged, &r.load(), Template::LlavaHf)?;
    let round2 = BootstrapFiles::at(&dir.join("bootstrap-round-2"));
    let prefix = stages.prefix.clone();
    stages.prefix.push_str("round 2, ");
    let stats = bootstrap(opts, seed, &vlm, &merged, world, files, &round2, stages);
    stages.prefix = prefix;
    let stats = stats?;
    drop(vlm);
    let images = &files.images;
    let mut scores = vec![train_and_evaluate(opts, dir, files, PAST_ROWS[0], stages, |out, stage| {
        train::dpo(&merged, &round2.pairs[0], images, out, &r.dpo, &env, stage)
    })?];
    let round1 = BootstrapFiles::at(&dir.join("bootstrap"));
    let settings = PrefSettings { mdpo: Some(past.mdpo), ..r.dpo.clone() };
    scores.push(train_and_evaluate(opts, dir, files, PAST_ROWS[1], stages, |out, stage| {
        train::dpo(model, &round1.pairs[0], images, out, &settings, &env, stage)
    })?);
    Ok(Some((scores, stats)))
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
    let matched = super::negatives::match_and_balance(&records, bo.negatives, seed, &mut stats);
    jsonl::write(&out.records, &matched)?;
    stats.pairs = boot::write_pairs(&matched, out)?;
    stages.note(&format!(
        "  pairs: {} BPO, {} weakening only, {} injection only; description negatives with more / fewer partner pairs than the truth: {} / {}",
        stats.pairs[0], stats.pairs[1], stats.pairs[2], stats.more_prior, stats.less_prior
    ));
    Ok(stats)
}
