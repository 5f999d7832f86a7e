//! Assembles the demo report from what the stages left on disk: training curves (`metrics.jsonl` of every run),
//! metric bars over seeds, and a gallery of scenes (what BPO trained on; what changed on evaluation images).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::bootstrap::BootstrapFiles;
use super::data::{EvalScene, WorldFiles};
use super::plot::{self, Bar, Series};
use super::recipe::{results_text, verdict, DemoOptions, Recipe, SeedResult};
use super::render::upscale;
use super::report::{self, Column, Figure, GalleryItem, Report, Row, COLUMNS};
use crate::data::{CompletionType, Record};
use crate::eval::chair::CaptionDetail;
use crate::eval::pope::PopeDetail;
use crate::output::write_json;
use crate::vision::{AspectMode, ImageProcessor};
use crate::{jsonl, Error, Result};

/// Pixels of a scene picture in the report (world images are enlarged with nearest-neighbour).
const SCENE_PX: u32 = 144;

/// Writes `report/` (report.html, plots, results.json, table.txt) and returns the path of report.html.
pub fn write_report(
    opts: &DemoOptions,
    rows: &[Row],
    seeds: &[SeedResult],
    timings: &[(String, f64)],
    wall: f64,
) -> Result<PathBuf> {
    let dir = opts.out.join("report");
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let figures = figures(&opts.recipe, rows, seeds.first())?;
    for f in &figures {
        let path = dir.join(&f.file);
        crate::output::write_bytes(&path, &f.png)?;
    }
    let gallery = match seeds.first() {
        Some(s) => gallery(s)?,
        None => Vec::new(),
    };
    let r = Report {
        title: "BPO on a synthetic world: does preference training make the model look?".into(),
        intro: match opts.recipe.past_the_paper {
            Some(_) => format!("{INTRO} {PAST_INTRO}"),
            None => INTRO.into(),
        },
        rows: rows.to_vec(),
        verdict: verdict(rows),
        figures,
        gallery,
        facts: facts(opts, seeds, timings, wall),
    };
    let html = dir.join("report.html");
    report::write_html(&html, &r)?;
    write_text(&dir.join("table.txt"), &(results_text(rows) + "\n"))?;
    let results =
        serde_json::json!({"rows": rows, "seeds": seeds, "timings": timings, "wall_seconds": wall, "jobs": opts.jobs});
    write_json(&dir.join("results.json"), &results)?;
    Ok(html)
}

const INTRO: &str = "A tiny LLaVA-architecture model (CLIP vision tower, MLP projector, Llama language model) is trained from \
scratch: its language model first reads a text-only corpus in which partner objects (a circle with a square, a ring with a \
diamond, ...) nearly always appear together, then the model learns from images whose partners co-occur little more than \
chance. But the images' annotations carry the prior, as GPT-written instruction data names objects that are not there: 90% of \
the training descriptions add the absent partner of a present object, and answer yes when asked about it. So the SFT model \
learns to name absent partners in pictures it sees clearly. BPO's chosen answers are the instruction data's own, as the \
paper takes the dataset's responses; its negatives are the model's own errors (answers to diffusion-noised images; chosen \
descriptions cut and continued by the model's own language model), each made into the chosen answer plus the one object the \
model added, which carry the prior further than the annotations do. LoRA adapters are trained with DPO (plus the chosen \
answers' NLL). More supervised training on the same answers (the control) keeps their prior; the preference removes it. The table compares \
the SFT model, BPO and its two halves, and the paper's control: the same LoRA training on the chosen answers only. It leads \
with the prior's own metrics: the share of descriptions naming an absent partner, and POPE-adversarial F1 (whose absent \
objects are the partners); CHAIR, recall and objects per description stay beside them, so that nobody wins by saying less.";

const PAST_INTRO: &str = "The last two rows go past the paper: BPO in a second round (bootstrapped again from BPO's merged \
model, which is policy and reference of a new DPO run), and BPO with mDPO's image-side pair (the chosen answer given the \
image over the same answer given a noised image) and anchor; their gains against the SFT model and BPO are below the checks.";

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::output::write_bytes(path, text.as_bytes())
}

/// (step, value) of `key` in a metrics file; missing files give nothing.
fn curve(path: &Path, key: &str) -> Vec<(f64, f64)> {
    let rows: Vec<Value> = jsonl::read(path).unwrap_or_default();
    rows.iter()
        .enumerate()
        .filter_map(|(i, r)| Some((r.get("step").and_then(Value::as_f64).unwrap_or(i as f64), r.get(key)?.as_f64()?)))
        .collect()
}

/// Exponential moving average, for noisy per-step curves.
fn smooth(points: Vec<(f64, f64)>, keep: f64) -> Vec<(f64, f64)> {
    let mut avg = None;
    points
        .into_iter()
        .map(|(x, y)| {
            let a = avg.map_or(y, |a: f64| keep * a + (1.0 - keep) * y);
            avg = Some(a);
            (x, a)
        })
        .collect()
}

/// Training curves (first seed) and metric bars (all seeds).
fn figures(recipe: &Recipe, rows: &[Row], first: Option<&SeedResult>) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    if let Some(s) = first {
        training_figures(recipe, s, &mut out)?;
    }
    metric_figures(rows, &mut out)?;
    Ok(out)
}

/// The plot `png` as `plots/<file>` under `caption`.
fn figure(file: &str, caption: &str, png: Vec<u8>) -> Figure {
    Figure { file: format!("plots/{file}"), caption: caption.into(), png }
}

/// One seed's training curves: SFT, the DPO runs' loss, margins, accuracy and chosen log-probabilities, the control.
fn training_figures(recipe: &Recipe, s: &SeedResult, out: &mut Vec<Figure>) -> Result<()> {
    let mut add = |file: &str, caption: &str, png: Vec<u8>| out.push(figure(file, caption, png));
    let sft = vec![
        Series {
            name: "language model on the corpus".into(),
            points: smooth(curve(&s.model.join("lm_metrics.jsonl"), "loss"), 0.9),
        },
        Series {
            name: "whole model on the instruction data".into(),
            points: smooth(curve(&s.model.join("metrics.jsonl"), "loss"), 0.9),
        },
    ];
    add("sft_loss.png", "SFT: cross-entropy per answer token", plot::lines("SFT loss", "step", "loss", &sft)?);
    let runs: Vec<(&str, PathBuf)> = recipe
        .rows()
        .iter()
        .skip(1)
        .map(|(name, run)| (*name, s.dir.join("runs").join(run).join("adapter/metrics.jsonl")))
        .collect();
    let dpo_runs: Vec<&(&str, PathBuf)> = runs.iter().filter(|(n, _)| n.starts_with("BPO")).collect();
    for (key, file, title, caption) in [
        ("loss", "dpo_loss.png", "DPO loss", "DPO loss (sigmoid, beta 0.1)"),
        (
            "rewards/margins",
            "dpo_margins.png",
            "Reward margin",
            "Reward margin: beta x (log-ratio chosen - log-ratio rejected)",
        ),
        (
            "rewards/accuracies",
            "dpo_accuracy.png",
            "Reward accuracy",
            "Share of pairs whose chosen answer has the larger reward",
        ),
    ] {
        let series: Vec<Series> =
            dpo_runs.iter().map(|(n, p)| Series { name: n.to_string(), points: smooth(curve(p, key), 0.8) }).collect();
        add(file, caption, plot::lines(title, "step", key, &series)?);
    }
    let chosen: Vec<Series> = dpo_runs
        .iter()
        .map(|(n, p)| Series { name: n.to_string(), points: smooth(curve(p, "logps/chosen"), 0.8) })
        .collect();
    add(
        "chosen_logps.png",
        "Log-probability of the chosen answers during DPO (falling means the model unlearns the truth too)",
        plot::lines("log p(chosen)", "step", "logps/chosen", &chosen)?,
    );
    let control = vec![Series { name: "SFT on chosen".into(), points: smooth(curve(&runs[0].1, "loss"), 0.8) }];
    add(
        "control_loss.png",
        "The control: cross-entropy per token of the chosen answers",
        plot::lines("SFT on chosen: loss", "step", "loss", &control)?,
    );
    Ok(())
}

/// Bars of every row's CHAIR and POPE metrics, mean and spread over the seeds.
fn metric_figures(rows: &[Row], out: &mut Vec<Figure>) -> Result<()> {
    let mut add = |file: &str, caption: &str, png: Vec<u8>| out.push(figure(file, caption, png));
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let bars_of = |cols: &[&str]| -> (Vec<String>, Vec<Vec<Bar>>) {
        let picked: Vec<&Column> = COLUMNS.iter().filter(|c| cols.contains(&c.name)).collect();
        let values = rows
            .iter()
            .map(|r| {
                picked
                    .iter()
                    .map(|c| {
                        let (mean, spread) = c.stats(r);
                        Bar { mean, spread }
                    })
                    .collect()
            })
            .collect();
        (picked.iter().map(|c| c.name.to_string()).collect(), values)
    };
    let (groups, values) = bars_of(&["CHAIR_i", "CHAIR_s", "partner"]);
    add(
        "chair_bars.png",
        "Hallucination in descriptions (%; lower is better)",
        plot::bars("CHAIR (lower is better)", &groups, &names, &values)?,
    );
    let (groups, values) = bars_of(&["recall", "F1 rand", "F1 pop", "F1 adv"]);
    add(
        "pope_bars.png",
        "Object recall and POPE F1 (%; higher is better)",
        plot::bars("Recall and POPE F1 (higher is better)", &groups, &names, &values)?,
    );
    Ok(())
}

/// The two gallery sections, from one seed.
fn gallery(s: &SeedResult) -> Result<Vec<(String, String, Vec<GalleryItem>)>> {
    let files = WorldFiles::at(&s.dir.join("world"));
    let processor = ImageProcessor::from_model_dir(&s.model)?;
    let trained = training_items(s, &files, &processor)?;
    let changed = eval_items(s, &files)?;
    Ok(vec![
        ("What BPO trains on".into(), "Bootstrapped pairs: the instruction data's answer (chosen; where the annotations carry the prior, it names an absent partner too) against the model's own errors, each made into the chosen answer plus one object the model added (\"model said\": the answer as sampled). Left: the image; right: the weakened image the model answered from (diffusion noise at the recipe's step).".into(), trained),
        ("What changed".into(), "Evaluation images the SFT model described wrongly, with the SFT and BPO descriptions (red: names an object that is not there) and their POPE adversarial answers.".into(), changed),
    ])
}

fn load_png(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path).map_err(|e| Error::Image { path: path.into(), msg: e.to_string() })?.to_rgb8())
}

fn scene_png(img: &image::RgbImage) -> Result<Vec<u8>> {
    plot::png(&upscale(img, (SCENE_PX / img.width().max(1)).max(1)))
}

/// Up to 4 description records and 2 yes/no records of the bootstrap, with the image and its weakened view.
fn training_items(s: &SeedResult, files: &WorldFiles, processor: &ImageProcessor) -> Result<Vec<GalleryItem>> {
    let b = BootstrapFiles::at(&s.dir.join("bootstrap"));
    let records: Vec<Record> = jsonl::read(&b.records)?;
    let raw: HashMap<String, Record> = jsonl::read::<Record>(&b.raw)?.into_iter().map(|r| (r.id.clone(), r)).collect();
    let is_caption = |r: &&Record| r.prompt == super::world::DESCRIBE;
    let both = |r: &&Record| {
        r.completions.iter().any(|c| c.kind == CompletionType::MllmHal)
            && r.completions.iter().any(|c| c.kind == CompletionType::LlmHal)
    };
    let mut picked: Vec<&Record> = records.iter().filter(is_caption).filter(both).take(4).collect();
    picked.extend(
        records
            .iter()
            .filter(|r| !is_caption(r) && (r.completions[0].response == "yes" || r.completions[0].response == "no"))
            .take(2),
    );
    let mut items = Vec::new();
    for r in picked {
        let Some(rel) = &r.image else { continue };
        let path = files.images.join(rel);
        let pixels = processor.load(&path, AspectMode::Pad)?;
        let weak = crate::vision::weaken(&pixels, s_noise(s), super::bootstrap::weakened_seed(s.seed, &r.id))?;
        let mut lines = vec![
            ("prompt".to_string(), r.prompt.clone(), String::new()),
            ("chosen".into(), r.completions[0].response.clone(), "good".into()),
        ];
        for c in &r.completions[1..] {
            let how = if c.kind == CompletionType::MllmHal { "weakened image" } else { "injection" };
            let said = raw
                .get(&r.id)
                .and_then(|x| x.completions.iter().find(|k| k.kind == c.kind))
                .map(|k| k.response.clone())
                .unwrap_or_default();
            if said != c.response {
                lines.push((format!("model said ({how})"), said, String::new()));
            }
            lines.push((format!("rejected ({how})"), c.response.clone(), "bad".into()));
        }
        items.push(GalleryItem {
            title: rel.clone(),
            images: vec![
                ("image".into(), scene_png(&load_png(&path)?)?),
                ("weakened".into(), scene_png(&processor.denormalize(&weak)?)?),
            ],
            lines,
        });
    }
    Ok(items)
}

/// The noise step the seed's bootstrap used (from the recipe stored with the model).
fn s_noise(s: &SeedResult) -> usize {
    let path = s.model.join("recipe.json");
    let v: Value =
        std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
    v["recipe"]["bootstrap"]["noise_step"].as_u64().unwrap_or(900) as usize
}

/// Up to 6 evaluation images whose SFT description hallucinates, with the BPO description beside it.
fn eval_items(s: &SeedResult, files: &WorldFiles) -> Result<Vec<GalleryItem>> {
    let details = |run: &str| -> Result<HashMap<String, CaptionDetail>> {
        Ok(jsonl::read::<CaptionDetail>(&s.dir.join("eval").join(run).join("chair/details.jsonl"))?
            .into_iter()
            .map(|d| (d.image_id.clone(), d))
            .collect())
    };
    let pope = |run: &str| -> Result<Vec<PopeDetail>> {
        jsonl::read(&s.dir.join("eval").join(run).join("pope/details.jsonl"))
    };
    let (sft, bpo) = (details("sft")?, details("bpo")?);
    let (sft_pope, bpo_pope) = (pope("sft")?, pope("bpo")?);
    let scenes: Vec<EvalScene> = jsonl::read(&files.eval_scenes)?;
    let mut items = Vec::new();
    for e in &scenes {
        let key = e.image_id.to_string();
        let (Some(a), Some(b)) = (sft.get(&key), bpo.get(&key)) else { continue };
        if a.hallucinated.is_empty() {
            continue;
        }
        let class = |d: &CaptionDetail| if d.hallucinated.is_empty() { "good" } else { "bad" }.to_string();
        let pope_line = |rows: &[PopeDetail]| {
            let mine: Vec<&PopeDetail> = rows
                .iter()
                .filter(|p| p.split == "adversarial" && p.question_id.starts_with(&format!("adversarial-{key}-")))
                .collect();
            format!("{}/{} right", mine.iter().filter(|p| p.label == p.prediction).count(), mine.len())
        };
        let lines = vec![
            ("ground truth".to_string(), e.scene.caption(), String::new()),
            ("SFT".into(), a.caption.clone(), class(a)),
            ("BPO".into(), b.caption.clone(), class(b)),
            (
                "POPE adv. SFT / BPO".into(),
                format!("{} / {}", pope_line(&sft_pope), pope_line(&bpo_pope)),
                String::new(),
            ),
        ];
        items.push(GalleryItem {
            title: e.image.clone(),
            images: vec![("image".into(), scene_png(&load_png(&files.images.join(&e.image))?)?)],
            lines,
        });
        if items.len() == 6 {
            break;
        }
    }
    Ok(items)
}

/// Settings, world statistics and stage times for the report's last table.
fn facts(opts: &DemoOptions, seeds: &[SeedResult], timings: &[(String, f64)], wall: f64) -> Vec<(String, String)> {
    let mut f = vec![("seeds".to_string(), seeds.iter().map(|s| s.seed.to_string()).collect::<Vec<_>>().join(", "))];
    f.extend(recipe_facts(&opts.recipe));
    for s in seeds {
        f.extend(seed_facts(s));
    }
    let total: f64 = timings.iter().map(|t| t.1).sum();
    f.push((
        "time".into(),
        format!(
            "{wall:.0} s wall clock, {} seed(s) at a time, {} CPU thread(s) each; stage times add up to {total:.0} s",
            opts.jobs,
            crate::model::runtime::cpu_threads()
        ),
    ));
    for (name, secs) in timings {
        f.push((format!("  {name}"), format!("{secs:.1} s")));
    }
    f
}

/// The recipe's settings, one line per stage.
fn recipe_facts(r: &Recipe) -> Vec<(String, String)> {
    let mut f = vec![
        (
            "world".into(),
            format!(
                "{} corpus scenes, {} training images, {} evaluation images ({} px); annotations naming an absent partner: {:.0}%{}",
                r.world.corpus_scenes,
                r.world.train_images,
                r.world.eval_images,
                r.world.image_size,
                100.0 * r.world.annotation_prior,
                if r.world.prior_questions { " (and affirming it when asked)" } else { "" }
            ),
        ),
        (
            "model".into(),
            format!(
                "CLIP {} px, patch {}, {} layers x {}; Llama {} layers x {}",
                r.model.image_size,
                r.model.patch_size,
                r.model.vision_layers,
                r.model.vision_hidden,
                r.model.layers,
                r.model.hidden
            ),
        ),
        (
            "SFT".into(),
            format!(
                "LM {} epochs x {} per step (lr {}), visual {} epochs x {} per step (lr {}), vision tower {}",
                r.lm.epochs,
                r.lm.batch,
                r.lm.lr,
                r.sft.epochs,
                r.sft.batch,
                r.sft.lr,
                if r.sft.train_vision { "trained" } else { "frozen" }
            ),
        ),
        (
            "DPO".into(),
            format!(
                "LoRA r {} alpha {}, {} epochs x {} pairs per step, lr {}, beta {}, SFT weight {}",
                r.dpo.rank, r.dpo.alpha, r.dpo.epochs, r.dpo.batch, r.dpo.lr, r.dpo.beta, r.dpo.sft_weight
            ),
        ),
        (
            "bootstrap".into(),
            format!(
                "{} training images' conversations, noise step {}, temperature {}, description negatives: {:?}, chosen answers: {:?}",
                r.bootstrap.images,
                r.bootstrap.noise_step,
                r.bootstrap.temperature,
                r.bootstrap.negatives,
                r.bootstrap.chosen
            ),
        ),
    ];
    if let Some(p) = &r.past_the_paper {
        let m = &p.mdpo;
        f.push((
            "past the paper".into(),
            format!(
                "round 2: bootstrapped again from BPO's merged model, DPO as above on it; mDPO: conditional weight {}, anchor weight {}, anchor delta {}, corrupted image at noise step {}",
                m.loss.conditional_weight, m.loss.anchor_weight, m.loss.anchor_delta, m.noise_step
            ),
        ));
    }
    f
}

/// One seed's world statistics and bootstrap counts.
fn seed_facts(s: &SeedResult) -> Vec<(String, String)> {
    let mut f = Vec::new();
    let w = |k: &str| s.world_stats.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    f.push((
        format!("seed {} world", s.seed),
        format!(
            "partner present beside an object: {:.0}% of corpus scenes, {:.0}% of training images; objects per scene {:.2} / {:.2}",
            100.0 * w("corpus_partner_rate"),
            100.0 * w("grounded_partner_rate"),
            w("corpus_objects_per_scene"),
            w("grounded_objects_per_scene")
        ),
    ));
    let b = &s.bootstrap;
    let pairs = b.pairs.iter().map(usize::to_string).collect::<Vec<_>>().join(" / ");
    f.push((
        format!("seed {} bootstrap", s.seed),
        format!(
            "{} records; {} weakened and {} injected answers; kept {} + {} negatives ({} not usable, {} dropped to balance yes/no); description negatives with more / fewer partner pairs than their ground truth: {} / {}; pairs BPO / weakening / injection: {pairs}",
            b.records, b.weakened_answers, b.injected_answers, b.kept_weaken, b.kept_inject, b.dropped, b.dropped_for_balance, b.more_prior, b.less_prior
        ),
    ));
    f
}
