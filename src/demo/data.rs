//! A generated world in memory ([`World`]) and on disk ([`WorldFiles`]): the text-only corpus and the grounded
//! instruction data as LLaVA conversation JSON, rendered PNGs, POPE question files (random / popular /
//! adversarial), CHAIR questions and ground truth, the synonym list of the world's vocabulary and a word-level
//! tokenizer. Every file is in a format the rest of bpo (and LLaVA's own scripts) already reads.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::conversation::{self, Turn};
use super::render::{render, Style};
use super::world::{self, cooccurrence, exists_question, Scene, WorldConfig, DESCRIBE, KINDS, SCENE_PROMPT};
use crate::eval::pope::{Label, PopeQuestion};
use crate::output::write_json;
use crate::progress::Events;
use crate::{jsonl, Error, Result};

/// POPE's three ways of choosing absent objects.
pub const POPE_SPLITS: [&str; 3] = ["random", "popular", "adversarial"];

/// One grounded training image: its scene and conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grounded {
    pub id: String,
    /// Path relative to the image folder.
    pub image: String,
    pub scene: Scene,
    pub turns: Vec<Turn>,
}

/// One evaluation image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalScene {
    pub image_id: usize,
    pub image: String,
    pub scene: Scene,
}

/// A whole world, generated from a config and a seed.
pub struct World {
    pub cfg: WorldConfig,
    pub seed: u64,
    pub corpus: Vec<Scene>,
    pub train: Vec<Grounded>,
    pub eval: Vec<EvalScene>,
}

/// Paths of everything [`World::write`] puts on disk.
#[derive(Debug, Clone)]
pub struct WorldFiles {
    pub dir: PathBuf,
    /// Image folder (`train/*.png`, `eval/*.png`).
    pub images: PathBuf,
    /// Text-only corpus: LLaVA JSON without images, each description the reply to an empty human turn (plain
    /// text under the `plain` template).
    pub corpus: PathBuf,
    /// Grounded instruction data, LLaVA JSON.
    pub train: PathBuf,
    /// Perception pre-training data, LLaVA JSON: each training image with its true object list (the scene's caption,
    /// never the prior-led annotation).
    pub perception: PathBuf,
    /// The grounded scenes behind `train` (ground truth for bootstrapping).
    pub train_scenes: PathBuf,
    pub eval_scenes: PathBuf,
    /// POPE question files, in [`POPE_SPLITS`] order.
    pub pope: Vec<PathBuf>,
    /// CHAIR description prompts (LLaVA question JSONL).
    pub describe: PathBuf,
    pub chair_truth: PathBuf,
    pub synonyms: PathBuf,
    /// Folder with `tokenizer.json` and `tokenizer_config.json`.
    pub tokenizer: PathBuf,
}

impl WorldFiles {
    pub fn at(dir: &Path) -> Self {
        let e = dir.join("eval");
        WorldFiles {
            dir: dir.into(),
            images: dir.join("images"),
            corpus: dir.join("corpus.json"),
            train: dir.join("train.json"),
            perception: dir.join("perception.json"),
            train_scenes: dir.join("train_scenes.jsonl"),
            eval_scenes: dir.join("eval_scenes.jsonl"),
            pope: POPE_SPLITS.iter().map(|s| e.join(format!("world_pope_{s}.jsonl"))).collect(),
            describe: e.join("describe.jsonl"),
            chair_truth: e.join("chair_ground_truth.jsonl"),
            synonyms: e.join("synonyms.txt"),
            tokenizer: dir.join("tokenizer"),
        }
    }

    /// Every file a complete world has (for checks and tests).
    pub fn all(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.corpus.clone(),
            self.train.clone(),
            self.perception.clone(),
            self.train_scenes.clone(),
            self.eval_scenes.clone(),
            self.describe.clone(),
            self.chair_truth.clone(),
            self.synonyms.clone(),
            self.tokenizer.join("tokenizer.json"),
            self.dir.join("world.json"),
        ];
        v.extend(self.pope.iter().cloned());
        v
    }
}

impl World {
    /// Draws the corpus, the grounded scenes with their conversations, and the evaluation scenes.
    pub fn generate(cfg: &WorldConfig, seed: u64) -> World {
        let weights = cfg.weights();
        let mut r = world::rng(seed, 1);
        let corpus =
            (0..cfg.corpus_scenes).map(|_| world::sample_scene(&cfg.corpus, &weights, cfg.look(), &mut r)).collect();
        let mut r = world::rng(seed, 2);
        let mut train: Vec<Grounded> = (0..cfg.train_images)
            .map(|i| {
                let scene = world::sample_scene(&cfg.grounded, &weights, cfg.look(), &mut r);
                let turns = conversation::conversation(&scene, cfg.yes_no, &weights, &mut r);
                Grounded { id: format!("t{i:06}"), image: format!("train/{i:06}.png"), scene, turns }
            })
            .collect();
        // Its own stream: a world without the annotation prior is the same world as before the option existed.
        let mut r = world::rng(seed, 4);
        for g in train.iter_mut() {
            if r.random_bool(cfg.annotation_prior.clamp(0.0, 1.0)) {
                if let Some((caption, added)) = conversation::prior_caption(&g.scene, &mut r) {
                    conversation::annotate_with_prior(&mut g.turns, caption, added, cfg.prior_questions);
                }
            }
        }
        let mut r = world::rng(seed, 3);
        let eval = (0..cfg.eval_images)
            .map(|i| EvalScene {
                image_id: i,
                image: format!("eval/{i:06}.png"),
                scene: world::sample_scene(&cfg.eval, &weights, cfg.look(), &mut r),
            })
            .collect();
        World { cfg: cfg.clone(), seed, corpus, train, eval }
    }

    /// Writes every file under `dir`, advancing `events` by one per image rendered.
    pub fn write(&self, dir: &Path, events: &dyn Events) -> Result<WorldFiles> {
        let f = WorldFiles::at(dir);
        for d in
            [dir.to_path_buf(), f.images.join("train"), f.images.join("eval"), dir.join("eval"), f.tokenizer.clone()]
        {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        self.write_text(&f)?;
        for (i, g) in self.train.iter().enumerate() {
            self.save_image(&g.scene, &f.images.join(&g.image), 1_000_000 + i as u64)?;
            events.advance(1);
        }
        for e in &self.eval {
            self.save_image(&e.scene, &f.images.join(&e.image), 2_000_000 + e.image_id as u64)?;
            events.advance(1);
        }
        write_json(&dir.join("world.json"), &json!({"seed": self.seed, "config": self.cfg, "stats": self.stats()}))?;
        Ok(f)
    }

    fn save_image(&self, scene: &Scene, path: &Path, stream: u64) -> Result<()> {
        let img = render(scene, Style::of(&self.cfg), &mut world::rng(self.seed, stream));
        let bad = |e: image::ImageError| Error::Image { path: path.into(), msg: e.to_string() };
        let format = image::ImageFormat::from_path(path).map_err(bad)?;
        crate::output::write_with(path, |tmp| img.save_with_format(tmp, format).map_err(bad))
    }

    fn write_text(&self, f: &WorldFiles) -> Result<()> {
        // Plain text for a base language model: an empty human turn, the description as the reply.
        let corpus: Vec<_> = self.corpus.iter().enumerate().map(|(i, s)| json!({"id": format!("c{i:06}"), "conversations": conversation_json(&[Turn { question: String::new(), answer: s.caption(), kind: "caption".into(), truth: None }], false)})).collect();
        write_json(&f.corpus, &serde_json::Value::Array(corpus))?;
        let perception: Vec<_> = self.train.iter().map(|g| json!({"id": format!("{}-p", g.id), "image": g.image, "conversations": conversation_json(&[Turn { question: DESCRIBE.into(), answer: g.scene.caption(), kind: "caption".into(), truth: None }], true)})).collect();
        write_json(&f.perception, &serde_json::Value::Array(perception))?;
        // Two conversations per image: the caption alone, and the questions (which must not see the caption).
        let train: Vec<_> = self
            .train
            .iter()
            .flat_map(|g| {
                let (caption, questions) = g.turns.split_at(1.min(g.turns.len()));
                [(format!("{}-d", g.id), caption), (format!("{}-q", g.id), questions)].into_iter().filter(|(_, t)| !t.is_empty()).map(move |(id, t)| json!({"id": id, "image": g.image, "conversations": conversation_json(t, true)}))
            })
            .chain(self.corpus.iter().take(self.cfg.text_conversations).enumerate().map(|(i, s)| {
                json!({"id": format!("s{i:06}"), "conversations": conversation_json(&[Turn { question: SCENE_PROMPT.into(), answer: s.caption(), kind: "caption".into(), truth: None }], false)})
            }))
            .collect();
        write_json(&f.train, &serde_json::Value::Array(train))?;
        jsonl::write(&f.train_scenes, &self.train)?;
        jsonl::write(&f.eval_scenes, &self.eval)?;
        let describe: Vec<_> = self
            .eval
            .iter()
            .map(|e| json!({"question_id": format!("describe-{}", e.image_id), "image": e.image, "text": DESCRIBE}))
            .collect();
        jsonl::write(&f.describe, &describe)?;
        let truth: Vec<_> =
            self.eval.iter().map(|e| json!({"image_id": e.image_id, "objects": e.scene.names()})).collect();
        jsonl::write(&f.chair_truth, &truth)?;
        let synonyms = KINDS.join("\n") + "\n";
        crate::output::write_bytes(&f.synonyms, synonyms.as_bytes())?;
        for (split, path) in POPE_SPLITS.iter().zip(&f.pope) {
            jsonl::write(path, &self.pope(split))?;
        }
        crate::text::tokenizer::write_word_level(&f.tokenizer, &tokenizer_words())
    }

    /// POPE questions of one split: per eval image, `pope_per_image` present kinds (label yes) and as many absent
    /// ones, chosen at random, by popularity in the grounded data, or by co-occurrence with the present kinds in
    /// the text corpus (the prior: absent partners of present objects first).
    pub fn pope(&self, split: &str) -> Vec<PopeQuestion> {
        let grounded: Vec<Scene> = self.train.iter().map(|g| g.scene.clone()).collect();
        let popularity = cooccurrence(&grounded);
        let prior = cooccurrence(&self.corpus);
        let stream = 10 + POPE_SPLITS.iter().position(|s| *s == split).unwrap_or(0) as u64;
        let mut r = world::rng(self.seed, stream);
        let n = self.cfg.pope_per_image;
        let mut out = Vec::new();
        for e in &self.eval {
            let mut present = e.scene.kinds();
            present.shuffle(&mut r);
            present.truncate(n);
            let mut absent: Vec<usize> = (0..KINDS.len()).filter(|&k| !e.scene.has(k)).collect();
            absent.shuffle(&mut r); // random order first, so that ties below break at random
            match split {
                "popular" => absent.sort_by_key(|&k| std::cmp::Reverse(popularity[k][k])),
                "adversarial" => {
                    // Rank by the strongest pull of any present kind: max over present p of P(k | p) in the corpus.
                    let pull = |k: usize| {
                        e.scene
                            .kinds()
                            .iter()
                            .map(|&p| prior[p][k] as f64 / prior[p][p].max(1) as f64)
                            .fold(0.0, f64::max)
                    };
                    absent.sort_by(|&a, &b| pull(b).total_cmp(&pull(a)));
                }
                _ => {}
            }
            absent.truncate(n);
            let rows = present.iter().map(|&k| (k, Label::Yes)).chain(absent.iter().map(|&k| (k, Label::No)));
            for (j, (k, label)) in rows.enumerate() {
                out.push(PopeQuestion {
                    question_id: format!("{split}-{}-{j}", e.image_id),
                    image: e.image.clone(),
                    text: exists_question(k),
                    label,
                    category: Some(split.to_string()),
                    origin: None,
                });
            }
        }
        out
    }

    /// Numbers that say how strong the prior is: partner rates and objects per scene, corpus vs grounded.
    pub fn stats(&self) -> serde_json::Value {
        let grounded: Vec<Scene> = self.train.iter().map(|g| g.scene.clone()).collect();
        json!({
            "corpus_partner_rate": world::partner_rate(&self.corpus),
            "grounded_partner_rate": world::partner_rate(&grounded),
            "corpus_objects_per_scene": world::objects_per_scene(&self.corpus),
            "grounded_objects_per_scene": world::objects_per_scene(&grounded),
            "descriptions_with_prior_object": self.train.iter().filter(|g| g.turns[0].truth.is_some()).count() as f64 / self.train.len().max(1) as f64,
        })
    }
}

/// LLaVA `conversations`: human/gpt turns, `<image>\n` opening the first human turn when `image`.
fn conversation_json(turns: &[Turn], image: bool) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(turns.len() * 2);
    for (i, t) in turns.iter().enumerate() {
        let q = if i == 0 && image { format!("<image>\n{}", t.question) } else { t.question.clone() };
        out.push(json!({"from": "human", "value": q}));
        out.push(json!({"from": "gpt", "value": t.answer}));
    }
    out
}

/// The tokenizer's words: the world's vocabulary plus the words of every chat template (so that any of them can
/// wrap the prompts).
pub fn tokenizer_words() -> Vec<String> {
    let mut words = world::vocabulary();
    for t in [crate::text::Template::VicunaV1, crate::text::Template::LlavaHf] {
        let text = crate::text::Chat::Builtin(t).render("", false).unwrap_or_default();
        words.extend(text.split_whitespace().map(str::to_string));
    }
    let mut seen = std::collections::HashSet::new();
    words.retain(|w| seen.insert(w.clone()));
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::chair::{Chair, GroundTruth};
    use crate::eval::words::Lemmatizer;

    #[test]
    fn a_written_world_is_complete_and_readable_by_the_eval_code() {
        let tmp = tempfile::tempdir().unwrap();
        let world = World::generate(&WorldConfig::quick(), 3);
        let seen = crate::progress::Recorder::default();
        let f = world.write(tmp.path(), &seen).unwrap();
        let images = world.cfg.train_images + world.cfg.eval_images;
        assert_eq!(seen.events(), vec![crate::progress::Event::Advance(1); images]);
        for p in f.all() {
            assert!(p.exists(), "{} missing", p.display());
        }
        let questions = crate::eval::pope::load_questions(&f.pope).unwrap();
        assert_eq!(questions.len(), 3 * world.eval.len() * 2 * world.cfg.pope_per_image);
        let synonyms = std::fs::read_to_string(&f.synonyms).unwrap();
        let chair = Chair::new(&synonyms, Lemmatizer::wordnet()).unwrap();
        let truth = GroundTruth::from_jsonl(&f.chair_truth, &chair).unwrap();
        assert_eq!(truth.objects.len(), world.eval.len());
        let tok = crate::text::Tokenizer::from_dir(&f.tokenizer, &[]).unwrap();
        let g = &world.train[0];
        let text = format!("{} {}", g.turns[0].question, g.turns[0].answer);
        assert!(!tok.encode(&text).unwrap().contains(&0), "unknown word in {text:?}");
        let train: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f.train).unwrap()).unwrap();
        assert!(train[0]["conversations"][0]["value"].as_str().unwrap().starts_with("<image>\n"));
        assert!(f.images.join(&g.image).exists());
    }

    #[test]
    fn chair_finds_every_kind_and_nothing_else() {
        let chair = Chair::new(&(KINDS.join("\n") + "\n"), Lemmatizer::wordnet()).unwrap();
        for k in KINDS {
            let m = chair.mentions(&format!("a red {k} and two {k}s"));
            assert_eq!(m.len(), 2, "{k}: {m:?}");
            assert!(m.iter().all(|m| m.category == k));
        }
        assert!(chair.mentions("is there a red thing in the top left ?").is_empty());
    }

    #[test]
    fn adversarial_negatives_are_the_absent_partners_first() {
        let world = World::generate(&WorldConfig::quick(), 5);
        let qs = world.pope("adversarial");
        let n = world.cfg.pope_per_image;
        let mut total_partners = 0;
        for e in &world.eval {
            let asked: Vec<usize> = qs
                .iter()
                .filter(|q| q.image == e.image && q.label == Label::No)
                .map(|q| KINDS.iter().position(|k| q.text.contains(&format!(" {k} "))).unwrap())
                .collect();
            assert_eq!(asked.len(), n);
            assert!(asked.iter().all(|&k| !e.scene.has(k)));
            let absent_partners = e.scene.kinds().iter().filter(|&&k| !e.scene.has(world::partner(k))).count();
            let partners_asked = asked.iter().filter(|&&k| e.scene.has(world::partner(k))).count();
            assert_eq!(partners_asked, absent_partners.min(n), "image {}", e.image);
            total_partners += partners_asked;
        }
        assert!(total_partners > 0);
    }
}
