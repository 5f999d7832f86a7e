//! Synthetic evaluation inputs built in memory, for `bpo bench eval`: POPE questions with varied answers, and
//! long captions (plurals, two-word names, punctuation) with per-image ground truth. Seeded, so runs repeat.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use super::chair::{Caption, GroundTruth, SYNONYMS};
use super::pope::{Label, PopeQuestion};
use crate::data::answers::Answer;

const SPLITS: [&str; 3] = ["random", "popular", "adversarial"];
const ANSWERS: [&str; 10] = [
    "Yes",
    "No",
    "No.",
    "Yes, there is a dog in the image.",
    "There is no dog in the image.",
    "not sure",
    "Yes. There is no cat, but there is a dog.",
    "NO",
    "no, there is not",
    "",
];
const FILLER: [&str; 16] = [
    "the", "a", "is", "on", "next", "to", "with", "in", "image", "shows", "large", "small", "red", "wooden", "near",
    "of",
];

/// `n` POPE questions (splits cycled, labels random) and one answer per question, shuffled so that pairing by
/// id has work to do.
pub fn pope(n: usize, seed: u64) -> (Vec<PopeQuestion>, Vec<Answer>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let questions: Vec<PopeQuestion> = (0..n)
        .map(|i| PopeQuestion {
            question_id: i.to_string(),
            image: format!("COCO_val2014_{:012}.jpg", i / 6),
            text: "Is there a dog in the image?".into(),
            label: if rng.random_bool(0.5) { Label::Yes } else { Label::No },
            category: Some(SPLITS[i % 3].into()),
            origin: None,
        })
        .collect();
    let mut answers: Vec<Answer> = questions
        .iter()
        .map(|q| Answer::new(q.question_id.clone(), q.text.clone(), *ANSWERS.choose(&mut rng).unwrap_or(&"Yes")))
        .collect();
    answers.shuffle(&mut rng);
    (questions, answers)
}

/// `n` captions of about `words` words, each about its own image whose ground truth holds 3 to 6 random
/// categories; captions mention some of those and some others, in plural and two-word forms.
pub fn captions(n: usize, words: usize, seed: u64) -> (Vec<Caption>, GroundTruth) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lines: Vec<Vec<&str>> =
        SYNONYMS.lines().map(|l| l.split(", ").collect()).filter(|l: &Vec<&str>| !l.is_empty()).collect();
    let mut truth = GroundTruth { source: "synthetic ground truth".into(), ..Default::default() };
    let mut caps = Vec::with_capacity(n);
    for i in 0..n {
        let k = rng.random_range(3..=6);
        let present: Vec<&Vec<&str>> = lines.choose_multiple(&mut rng, k).collect();
        truth.objects.insert(i.to_string(), present.iter().map(|l| l[0].to_string()).collect::<BTreeSet<_>>());
        let mut text = String::new();
        let mut count = 0;
        while count < words {
            let line = if rng.random_bool(0.7) { present.choose(&mut rng).copied() } else { lines.choose(&mut rng) };
            let word = line.and_then(|l| l.choose(&mut rng)).copied().unwrap_or("dog");
            let plural = if rng.random_bool(0.3) { "s" } else { "" };
            let filler: Vec<&str> = FILLER.choose_multiple(&mut rng, 6).copied().collect();
            let clause = format!("{} {word}{plural}, {}.", filler[..3].join(" "), filler[3..].join(" "));
            count += clause.split(' ').count();
            text.push_str(&clause);
            text.push(' ');
        }
        caps.push(Caption { id: i.to_string(), image_id: i.to_string(), text, origin: None });
    }
    (caps, truth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::chair::Chair;
    use crate::eval::pope::{score, Pairing};

    #[test]
    fn synthetic_inputs_score_without_leftovers() {
        let (qs, ans) = pope(60, 1);
        let r = score(&qs, &ans, Pairing::ById).unwrap().report;
        assert_eq!((r.overall.n, r.unanswered.count, r.orphan_answers.count), (60, 0, 0));
        assert_eq!(r.splits.len(), 3);
        let (caps, truth) = captions(20, 100, 1);
        let out = Chair::builtin().unwrap().score(&caps, &truth).unwrap();
        assert_eq!(out.report.captions, 20);
        assert!(out.report.mentions >= 150, "nearly every clause names an object: {}", out.report.mentions);
        assert!(out.report.chair_i > 0.0 && out.report.chair_i < 1.0);
    }
}
