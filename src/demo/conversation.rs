//! The text written about a scene: its grounded conversation (caption, balanced yes/no questions, one attribute
//! question) and the annotation a prior-led annotator writes instead ([`super::world::WorldConfig::annotation_prior`]).

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::world::{
    exists_question, partner, weighted_pick, Object, Scene, COLOURS, DESCRIBE, KINDS, NUMBERS, PAIR_COLOUR,
};

/// One question-answer exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub question: String,
    /// The answer the instruction data gives (the annotation).
    pub answer: String,
    /// `caption`, `yes`, `no`, `colour`, `count` or `position`.
    pub kind: String,
    /// The true answer, where the annotation says something else ([`super::world::WorldConfig::annotation_prior`]): what
    /// bootstrapping takes as the chosen answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
}

impl Turn {
    /// The true answer.
    pub fn true_answer(&self) -> &str {
        self.truth.as_deref().unwrap_or(&self.answer)
    }
}

fn turn(kind: &str, question: String, answer: String) -> Turn {
    Turn { question, answer, kind: kind.to_string(), truth: None }
}

/// The grounded exchanges about a scene: its caption first, then `yes_no` yes and as many no questions
/// (balanced; absent kinds drawn by popularity `weights`, not adversarially) in random order, then one
/// colour, count or position question. The instruction data puts the caption in a conversation of its own (see
/// [`super::data`]): if the questions could read the caption from the context, they would not need the image.
pub fn conversation(scene: &Scene, yes_no: usize, weights: &[f64], rng: &mut StdRng) -> Vec<Turn> {
    let mut turns = vec![turn("caption", DESCRIBE.into(), scene.caption())];
    let present: Vec<usize> = scene.kinds();
    let n = yes_no.min(present.len()).min(KINDS.len() - present.len());
    let mut asked: Vec<Turn> =
        present.choose_multiple(rng, n).map(|&k| turn("yes", exists_question(k), "yes".into())).collect();
    // Absent kinds are drawn by popularity, like present ones: otherwise the kind alone would tell the answer
    // (popular kinds mostly "yes", rare ones mostly "no") and the model would not need to look.
    let mut taken = present.clone();
    for _ in 0..n {
        let k = weighted_pick(weights, &taken, rng);
        taken.push(k);
        asked.push(turn("no", exists_question(k), "no".into()));
    }
    asked.shuffle(rng);
    turns.extend(asked);
    // Last: "where is the circle ?" tells that there is a circle.
    if let Some(o) = scene.objects.choose(rng) {
        turns.push(attribute_turn(scene, o, rng));
    }
    turns
}

/// A colour, count or position question about `o` / the scene.
fn attribute_turn(scene: &Scene, o: &Object, rng: &mut StdRng) -> Turn {
    let kind = KINDS[o.kind];
    match rng.random_range(0..4) {
        0 => turn("colour", format!("what color is the {kind} ?"), COLOURS[o.colour].0.into()),
        1 => turn("position", format!("where is the {kind} ?"), o.place()),
        2 => turn("count", "how many objects are there ?".into(), NUMBERS[scene.objects.len().min(5)].into()),
        _ => {
            let c = rng.random_range(0..COLOURS.len());
            let n = scene.objects.iter().filter(|x| x.colour == c).count();
            turn("count", format!("how many {} objects are there ?", COLOURS[c].0), NUMBERS[n.min(5)].into())
        }
    }
}

/// The caption of `scene` as an annotator led by the prior writes it: it also names the absent partner of one present
/// object (in its pair's usual colour), at a random place in the list. Returns the caption and the added kind;
/// `None` when every present object's partner is present.
pub fn prior_caption(scene: &Scene, rng: &mut StdRng) -> Option<(String, usize)> {
    let lonely: Vec<&Object> = scene.objects.iter().filter(|o| !scene.has(partner(o.kind))).collect();
    let kind = partner(lonely.choose(rng)?.kind);
    let mut phrases: Vec<String> = scene.objects.iter().map(Object::phrase).collect();
    let extra = Object { kind, colour: PAIR_COLOUR[kind / 2], cell: 0, big: true };
    phrases.insert(rng.random_range(0..=phrases.len()), extra.phrase());
    Some((phrases.join(" and "), kind))
}

/// Annotates `turns` (a [`conversation`], caption first) as a prior-led annotator would: the caption names `added`
/// (an absent partner, from [`prior_caption`]); with `questions`, the first no question becomes "is there a
/// `added` ?" answered yes (the question about `added`, if one is asked). The true answers move to [`Turn::truth`].
pub fn annotate_with_prior(turns: &mut [Turn], caption: String, added: usize, questions: bool) {
    let Some(first) = turns.first_mut() else { return };
    first.truth = Some(std::mem::replace(&mut first.answer, caption));
    if !questions {
        return;
    }
    // The question about `added` if one is asked already, else the first no question.
    let asked = exists_question(added);
    let at = turns.iter().position(|t| t.question == asked).or_else(|| turns.iter().position(|t| t.kind == "no"));
    if let Some(i) = at {
        turns[i] = Turn { truth: Some("no".into()), ..turn("no", asked, "yes".into()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::world::{parse_caption, rng, scenes, WorldConfig};

    #[test]
    fn a_prior_led_caption_adds_one_absent_partner_and_keeps_the_truth() {
        let cfg = WorldConfig::standard();
        let mut r = rng(9, 4);
        let mut captions = 0;
        for s in scenes(&cfg.grounded, 300, 9) {
            let Some((text, added)) = prior_caption(&s, &mut r) else {
                assert!(s.objects.iter().all(|o| s.has(partner(o.kind))), "only when every partner is present");
                continue;
            };
            let named: Vec<usize> = parse_caption(&text).into_iter().map(|(_, k)| k).collect();
            assert_eq!(named.len(), s.objects.len() + 1, "{text}");
            let extra: Vec<usize> = named.iter().copied().filter(|&k| !s.has(k)).collect();
            assert_eq!(extra, vec![added], "{text}");
            assert!(s.has(partner(extra[0])), "the extra object is the absent partner of a present one: {text}");
            assert!(s.kinds().iter().all(|k| named.contains(k)), "{text}");
            captions += 1;
        }
        assert!(captions > 250, "{captions}");
    }

    #[test]
    fn a_prior_led_annotation_keeps_the_truth_beside_it() {
        let cfg = WorldConfig::standard();
        let mut r = rng(11, 4);
        let scene = scenes(&cfg.grounded, 50, 11).into_iter().find(|s| s.objects.len() == 2).unwrap();
        let turns = conversation(&scene, 2, &cfg.weights(), &mut r);
        let (caption, added) = prior_caption(&scene, &mut r).unwrap();
        for questions in [false, true] {
            let mut t = turns.clone();
            annotate_with_prior(&mut t, caption.clone(), added, questions);
            assert_eq!(t[0].answer, caption);
            assert_eq!(t[0].true_answer(), scene.caption());
            let changed: Vec<&Turn> = t[1..].iter().filter(|t| t.truth.is_some()).collect();
            if !questions {
                assert!(changed.is_empty() && t[1..] == turns[1..]);
                continue;
            }
            assert_eq!(changed.len(), 1, "{t:?}");
            assert_eq!(
                (changed[0].question.as_str(), changed[0].answer.as_str()),
                (exists_question(added).as_str(), "yes")
            );
            assert_eq!(changed[0].true_answer(), "no");
            assert!(!scene.has(added));
            assert_eq!(t.iter().filter(|t| t.kind == "no").count(), turns.iter().filter(|t| t.kind == "no").count());
        }
    }

    #[test]
    fn conversations_are_balanced() {
        let cfg = WorldConfig::standard();
        let mut r = rng(4, 2);
        let (mut yes, mut no) = (0, 0);
        for s in scenes(&cfg.grounded, 300, 4) {
            for t in conversation(&s, 2, &cfg.weights(), &mut r) {
                yes += usize::from(t.kind == "yes");
                no += usize::from(t.kind == "no");
                if t.kind == "no" {
                    let k = KINDS.iter().position(|k| t.question.contains(&format!(" {k} "))).unwrap();
                    assert!(!s.has(k));
                }
            }
        }
        assert_eq!(yes, no);
        assert!(yes > 400);
    }

    #[test]
    fn the_asked_kind_does_not_tell_the_answer() {
        let cfg = WorldConfig::standard();
        let mut r = rng(6, 2);
        let mut counts = vec![(0usize, 0usize); KINDS.len()];
        for s in scenes(&cfg.grounded, 4000, 6) {
            for t in conversation(&s, 2, &cfg.weights(), &mut r).iter().filter(|t| t.kind == "yes" || t.kind == "no") {
                let k = KINDS.iter().position(|k| t.question.contains(&format!(" {k} "))).unwrap();
                if t.kind == "yes" {
                    counts[k].0 += 1
                } else {
                    counts[k].1 += 1
                }
            }
        }
        for (k, (y, n)) in counts.iter().enumerate() {
            let share = *y as f64 / (y + n) as f64;
            assert!((0.3..0.7).contains(&share), "{}: {y} yes, {n} no", KINDS[k]);
        }
    }
}
