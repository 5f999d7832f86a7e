//! The demo's synthetic world: scenes of coloured shapes on a 3x3 grid, with exact ground truth, and the text
//! written about them.
//!
//! Twelve object kinds come in six *look-alike* pairs of one colour (circle and ring are red, square and diamond
//! blue, ...) and, across them, six *partner* pairs (circle with square, ring with diamond, ...). The text-only
//! corpus, on which the language model is pre-trained, nearly always mentions a partner with its object: that is
//! the language prior. In the grounded data (rendered images with captions and questions) partners co-occur
//! little more than chance, so answering well requires looking. Where the picture is unclear — a small red round thing
//! beside a blue square — only the shape tells a circle from a ring, and the prior says "circle", the square's
//! partner: the prior and the picture conflict exactly where POPE's adversarial split asks (demo-world.md,
//! lesson 4). (A first version made the look-alikes partners; its model's errors were plain confusions that no
//! preference for the picture could fix.)
//!
//! All text is lower-case with punctuation as separate words, so a whitespace word-level tokenizer covers it.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Object kinds. Index `2i` and `2i + 1` look alike; `k` and `k ^ 2` are partners.
pub const KINDS: [&str; 12] =
    ["circle", "ring", "square", "diamond", "triangle", "arrow", "cross", "plus", "star", "sun", "bar", "pillar"];

/// Colour names and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [222, 52, 48]),
    ("green", [58, 181, 74]),
    ("blue", [52, 102, 232]),
    ("yellow", [240, 214, 48]),
    ("purple", [160, 72, 208]),
    ("white", [236, 236, 236]),
];

/// The usual colour of each look-alike pair (index into [`COLOURS`]): circles and rings are red, squares and
/// diamonds blue, ... Colour tells the pair; only shape tells its two kinds apart.
pub const PAIR_COLOUR: [usize; 6] = [0, 2, 1, 5, 3, 4];

/// Rows and columns of the scene grid.
pub const GRID: usize = 3;
const ROWS: [&str; GRID] = ["top", "middle", "bottom"];
const COLS: [&str; GRID] = ["left", "center", "right"];
pub(super) const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];

/// The captioning instruction (training and CHAIR evaluation).
pub const DESCRIBE: &str = "describe the image .";

/// The instruction of the text-only conversations: a scene from the corpus, no image.
pub const SCENE_PROMPT: &str = "describe a scene .";

/// The partner of kind `k`: the kind the corpus nearly always mentions with it.
pub fn partner(k: usize) -> usize {
    k ^ 2
}

/// The kind that looks like `k` (same colour, similar shape).
pub fn look_alike(k: usize) -> usize {
    k ^ 1
}

/// The POPE / yes-no question about kind `k`.
pub fn exists_question(k: usize) -> String {
    format!("is there a {} in the image ?", KINDS[k])
}

/// One object: kind and colour (indices into [`KINDS`], [`COLOURS`]), grid cell (row-major) and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub kind: usize,
    pub colour: usize,
    pub cell: usize,
    pub big: bool,
}

impl Object {
    /// "a red circle".
    pub fn phrase(&self) -> String {
        format!("a {} {}", COLOURS[self.colour].0, KINDS[self.kind])
    }
    /// "top left".
    pub fn place(&self) -> String {
        format!("{} {}", ROWS[self.cell / GRID], COLS[self.cell % GRID])
    }
}

/// A scene: its objects in reading order (by cell), at most one of each kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<Object>,
}

impl Scene {
    /// "a red circle and a blue ring": objects in reading order.
    pub fn caption(&self) -> String {
        self.objects.iter().map(Object::phrase).collect::<Vec<_>>().join(" and ")
    }

    pub fn has(&self, kind: usize) -> bool {
        self.objects.iter().any(|o| o.kind == kind)
    }

    pub fn kinds(&self) -> Vec<usize> {
        self.objects.iter().map(|o| o.kind).collect()
    }

    /// Kind names, in reading order.
    pub fn names(&self) -> Vec<String> {
        self.objects.iter().map(|o| KINDS[o.kind].to_string()).collect()
    }
}

/// Parses a caption in the world's grammar back into (colour, kind) pairs; words outside the grammar are
/// skipped, so a partial or malformed caption still yields the objects it names.
pub fn parse_caption(text: &str) -> Vec<(Option<usize>, usize)> {
    let mut out = Vec::new();
    let mut colour = None;
    for w in text.split_whitespace() {
        if let Some(c) = COLOURS.iter().position(|(n, _)| *n == w) {
            colour = Some(c);
        } else if let Some(k) = KINDS.iter().position(|n| *n == w) {
            out.push((colour.take(), k));
        }
    }
    out
}

/// How scenes are drawn: one setting for the text-only corpus, one for grounded images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneStats {
    /// Objects per scene, inclusive range.
    pub min_objects: usize,
    pub max_objects: usize,
    /// After an object is drawn, its partner joins with this probability (if there is room).
    pub partner_rate: f64,
    /// Probability that a partner joining that way is drawn small (default: the world's `small`): a small partner
    /// makes the prior the cheaper cue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_small: Option<f64>,
}

/// Everything that defines a world; together with the seed it decides every scene, image and sentence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Image side in pixels (a multiple of [`GRID`]).
    pub image_size: usize,
    /// Standard deviation of the per-pixel noise, in grey levels.
    pub pixel_noise: f64,
    /// How far objects wander from their cell's centre (0 = centred, 1 = anywhere in the cell).
    pub jitter: f64,
    /// Probability that an object is drawn small.
    pub small: f64,
    /// Probability that an object has a random colour instead of its pair's colour ([`PAIR_COLOUR`]).
    pub off_colour: f64,
    /// Zipf exponent of kind popularity (kind i has weight 1 / (i + 1)^s): POPE's popular split needs a skew.
    pub popularity: f64,
    pub corpus: SceneStats,
    pub grounded: SceneStats,
    /// Eval scenes: POPE asks about 3 present objects, so they hold at least 3.
    pub eval: SceneStats,
    pub corpus_scenes: usize,
    pub train_images: usize,
    pub eval_images: usize,
    /// POPE questions per image and polarity (the official benchmark uses 3 yes + 3 no).
    pub pope_per_image: usize,
    /// Yes and no questions per training image (each).
    pub yes_no: usize,
    /// Corpus descriptions mixed into the instruction data as text-only conversations ([`SCENE_PROMPT`]), as
    /// LLaVA-1.5 mixes text-only chat into its visual instruction tuning: the language prior stays in use instead
    /// of being overwritten by the grounded captions.
    #[serde(default)]
    pub text_conversations: usize,
    /// Share of training descriptions that also name an absent partner of a present object, at a random place in
    /// the list: annotations that carry the prior, as GPT-written instruction data does ([`super::conversation::prior_caption`]). The
    /// instruction data (SFT) has them; bootstrapping's chosen answers are the true scenes ([`super::conversation::Turn::truth`]).
    /// Not serialized when 0, so that recipes without it keep their SFT model cache key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub annotation_prior: f64,
    /// With [`Self::annotation_prior`]: a prior-led annotation also answers "is there a `partner` ?" with yes
    /// (in place of one of its no questions), as instruction data that names an absent object also affirms it when
    /// asked. Not serialized when off (cache keys of older recipes).
    #[serde(default, skip_serializing_if = "is_false")]
    pub prior_questions: bool,
}

impl WorldConfig {
    /// The demo's world.
    pub fn standard() -> Self {
        WorldConfig {
            image_size: 48,
            pixel_noise: 10.0,
            jitter: 0.5,
            small: 0.0,
            off_colour: 0.0,
            popularity: 0.6,
            corpus: SceneStats { min_objects: 2, max_objects: 4, partner_rate: 0.98, partner_small: None },
            grounded: SceneStats { min_objects: 1, max_objects: 4, partner_rate: 0.05, partner_small: None },
            eval: SceneStats { min_objects: 3, max_objects: 4, partner_rate: 0.1, partner_small: None },
            corpus_scenes: 10_000,
            train_images: 4_000,
            eval_images: 300,
            pope_per_image: 3,
            yes_no: 3,
            text_conversations: 3_000,
            annotation_prior: 0.9,
            prior_questions: true,
        }
    }

    /// A world small enough for tests.
    pub fn quick() -> Self {
        WorldConfig {
            image_size: 24,
            corpus_scenes: 300,
            train_images: 60,
            eval_images: 8,
            text_conversations: 30,
            ..Self::standard()
        }
    }

    /// Per-object appearance odds.
    pub fn look(&self) -> Look {
        Look { small: self.small, off_colour: self.off_colour }
    }

    /// Popularity weight of each kind.
    pub fn weights(&self) -> Vec<f64> {
        (0..KINDS.len()).map(|i| 1.0 / ((i + 1) as f64).powf(self.popularity)).collect()
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_false(x: &bool) -> bool {
    !*x
}

/// Per-object appearance odds of a world.
#[derive(Debug, Clone, Copy)]
pub struct Look {
    pub small: f64,
    pub off_colour: f64,
}

/// Draws one scene.
pub fn sample_scene(stats: &SceneStats, weights: &[f64], look: Look, rng: &mut StdRng) -> Scene {
    let n = rng.random_range(stats.min_objects..=stats.max_objects.max(stats.min_objects)).min(KINDS.len());
    let mut kinds: Vec<usize> = Vec::with_capacity(n);
    // Per kind: the probability that it is drawn small.
    let mut small: Vec<f64> = Vec::with_capacity(n);
    while kinds.len() < n {
        let k = weighted_pick(weights, &kinds, rng);
        kinds.push(k);
        small.push(look.small);
        let p = partner(k);
        if kinds.len() < n && !kinds.contains(&p) && rng.random_bool(stats.partner_rate.clamp(0.0, 1.0)) {
            kinds.push(p);
            small.push(stats.partner_small.unwrap_or(look.small));
        }
    }
    let colours: Vec<usize> = kinds
        .iter()
        .map(|&k| {
            if rng.random_bool(look.off_colour.clamp(0.0, 1.0)) {
                rng.random_range(0..COLOURS.len())
            } else {
                PAIR_COLOUR[k / 2]
            }
        })
        .collect();
    let mut cells: Vec<usize> = (0..GRID * GRID).collect();
    cells.shuffle(rng);
    let mut objects: Vec<Object> = kinds
        .into_iter()
        .zip(colours)
        .zip(cells)
        .zip(small)
        .map(|(((kind, colour), cell), small)| Object {
            kind,
            colour,
            cell,
            big: !rng.random_bool(small.clamp(0.0, 1.0)),
        })
        .collect();
    objects.sort_by_key(|o| o.cell);
    Scene { objects }
}

/// A kind drawn by weight among those not in `taken`.
pub(super) fn weighted_pick(weights: &[f64], taken: &[usize], rng: &mut StdRng) -> usize {
    let free: Vec<usize> = (0..weights.len()).filter(|k| !taken.contains(k)).collect();
    let total: f64 = free.iter().map(|&k| weights[k]).sum();
    let mut u = rng.random::<f64>() * total;
    for &k in &free {
        if u < weights[k] {
            return k;
        }
        u -= weights[k];
    }
    free[free.len() - 1]
}

/// Every word the world's text can contain (prompts, answers, captions), sorted.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = KINDS
        .iter()
        .chain(COLOURS.iter().map(|(c, _)| c))
        .chain(ROWS.iter())
        .chain(COLS.iter())
        .chain(NUMBERS.iter())
        .map(|w| w.to_string())
        .collect();
    let sentences = [
        DESCRIBE,
        SCENE_PROMPT,
        "is there a in the image ?",
        "what color is the ?",
        "where is the ?",
        "how many objects are there ?",
        "yes no and",
    ];
    words.extend(sentences.iter().flat_map(|s| s.split_whitespace()).map(str::to_string));
    words.sort();
    words.dedup();
    words
}

/// Co-occurrence counts of kinds over scenes: `m[a][b]` = scenes holding both `a` and `b` (`m[a][a]`: holding `a`).
pub fn cooccurrence(scenes: &[Scene]) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0usize; KINDS.len()]; KINDS.len()];
    for s in scenes {
        let ks = s.kinds();
        for &a in &ks {
            for &b in &ks {
                m[a][b] += 1;
            }
        }
    }
    m
}

/// P(partner present | object present), over all kinds: how strong the prior is in a set of scenes.
pub fn partner_rate(scenes: &[Scene]) -> f64 {
    let (mut with, mut total) = (0usize, 0usize);
    for s in scenes {
        for o in &s.objects {
            total += 1;
            with += usize::from(s.has(partner(o.kind)));
        }
    }
    if total == 0 {
        0.0
    } else {
        with as f64 / total as f64
    }
}

/// Mean objects per scene.
pub fn objects_per_scene(scenes: &[Scene]) -> f64 {
    if scenes.is_empty() {
        return 0.0;
    }
    scenes.iter().map(|s| s.objects.len()).sum::<usize>() as f64 / scenes.len() as f64
}

/// A deterministic RNG for one purpose of one world (`stream` keeps corpus, images and questions independent).
pub fn rng(seed: u64, stream: u64) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// `n` scenes drawn from `stats` with the standard world's weights and look (tests).
#[cfg(test)]
pub(super) fn scenes(stats: &SceneStats, n: usize, seed: u64) -> Vec<Scene> {
    let cfg = WorldConfig::standard();
    let mut r = rng(seed, 1);
    (0..n).map(|_| sample_scene(stats, &cfg.weights(), cfg.look(), &mut r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::conversation::conversation;

    #[test]
    fn the_corpus_has_a_strong_prior_and_grounded_data_a_weak_one() {
        let cfg = WorldConfig::standard();
        let corpus = partner_rate(&scenes(&cfg.corpus, 3000, 1));
        let grounded = partner_rate(&scenes(&cfg.grounded, 3000, 2));
        assert!(corpus > 0.8, "corpus partner rate {corpus}");
        assert!(grounded < 0.35, "grounded partner rate {grounded}");
    }

    #[test]
    fn partners_joining_a_scene_can_be_drawn_small() {
        let cfg = WorldConfig::standard();
        let look = Look { small: 0.0, off_colour: 0.0 };
        let stats = SceneStats { min_objects: 2, max_objects: 2, partner_rate: 1.0, partner_small: Some(1.0) };
        let mut r = rng(10, 1);
        for _ in 0..100 {
            let s = sample_scene(&stats, &cfg.weights(), look, &mut r);
            // Two objects, the second the first's partner: exactly one is small.
            assert_eq!(s.objects.iter().filter(|o| !o.big).count(), 1, "{s:?}");
        }
        let same = SceneStats { partner_small: None, ..stats };
        let s = sample_scene(&same, &cfg.weights(), look, &mut rng(10, 1));
        assert!(s.objects.iter().all(|o| o.big), "None: the world's own odds");
    }

    #[test]
    fn scenes_are_well_formed_and_seeded() {
        let cfg = WorldConfig::standard();
        let a = scenes(&cfg.grounded, 200, 5);
        assert_eq!(a, scenes(&cfg.grounded, 200, 5));
        assert_ne!(a, scenes(&cfg.grounded, 200, 6));
        for s in &a {
            let mut kinds = s.kinds();
            kinds.sort();
            kinds.dedup();
            assert_eq!(kinds.len(), s.objects.len(), "one object per kind");
            assert!((1..=4).contains(&s.objects.len()));
            assert!(s.objects.windows(2).all(|w| w[0].cell < w[1].cell), "reading order, distinct cells");
        }
    }

    #[test]
    fn captions_parse_back_and_stay_in_the_vocabulary() {
        let cfg = WorldConfig::standard();
        let vocab = vocabulary();
        let mut r = rng(3, 2);
        for s in scenes(&cfg.grounded, 100, 3) {
            let parsed = parse_caption(&s.caption());
            assert_eq!(parsed, s.objects.iter().map(|o| (Some(o.colour), o.kind)).collect::<Vec<_>>());
            for t in conversation(&s, 2, &cfg.weights(), &mut r) {
                for w in t.question.split_whitespace().chain(t.answer.split_whitespace()) {
                    assert!(vocab.iter().any(|v| v == w), "{w:?} not in the vocabulary");
                }
            }
        }
    }
}
