//! Negatives made to differ from their ground truth in one thing (the demo's lessons 2 and 3, see
//! [`super::bootstrap`]): a description negative spliced into its ground truth, a short answer of the same length,
//! and as many chosen "yes" as chosen "no".

use rand::seq::SliceRandom;

use super::bootstrap::{BootstrapStats, NegativeForm};
use super::world::{self, look_alike, parse_caption, partner, COLOURS, DESCRIBE, KINDS, PAIR_COLOUR};
use crate::data::{Completion, CompletionType, Record};

/// "a red circle and a blue ring" from (colour, kind) pairs.
fn caption_of(objects: &[(usize, usize)]) -> String {
    objects.iter().map(|&(c, k)| format!("a {} {}", COLOURS[c].0, KINDS[k])).collect::<Vec<_>>().join(" and ")
}

/// A description negative that differs from the ground truth `gt` in one object that `negative` names and `gt`
/// lacks: the first that is the partner of a ground-truth object (the prior at work), else the first.
///
/// [`NegativeForm::Add`] inserts it into the ground truth's list (in the colour the model gave it, else its pair's),
/// at a place hashed from `gt` and `negative`. [`NegativeForm::Swap`] puts it in place of one ground-truth object,
/// so chosen and rejected have the same length: its look-alike (the error a model makes when it half-sees the
/// object), else the one at the same place in the list, but never the hallucination's own partner, nor one whose
/// partner the ground truth also names: replacing half of a partner pair would give a negative with *less* of the
/// prior than its ground truth, and DPO would then prefer the prior (measured: with such replacements,
/// weakened-image negatives lowered the partner pairs of 580 descriptions and raised them in 190, and DPO on them
/// raised the partner rate); `None` also when every ground-truth object has its partner beside it.
///
/// `None` when `negative` names no absent object.
pub fn splice(gt: &str, negative: &str, form: NegativeForm) -> Option<String> {
    let truth: Vec<(usize, usize)> = parse_caption(gt).into_iter().map(|(c, k)| (c.unwrap_or(0), k)).collect();
    let named = |k: usize| truth.iter().any(|t| t.1 == k);
    let absent: Vec<(usize, (Option<usize>, usize))> =
        parse_caption(negative).into_iter().enumerate().filter(|(_, (_, k))| !named(*k)).collect();
    let &(at, (colour, kind)) = absent.iter().find(|(_, (_, k))| named(partner(*k))).or(absent.first())?;
    if form == NegativeForm::Add {
        let mut out = truth;
        let place = crate::hash::stable_hash(&[gt, negative]) % (out.len() as u64 + 1);
        out.insert(place as usize, (colour.unwrap_or(PAIR_COLOUR[kind / 2]), kind));
        return Some(caption_of(&out));
    }
    // Keep the object a prior hallucination comes from, and both halves of every partner pair.
    let free = |i: &usize| truth[*i].1 != partner(kind) && !named(partner(truth[*i].1));
    let slot = [truth.iter().position(|t| t.1 == look_alike(kind)), Some(at.min(truth.len().checked_sub(1)?))]
        .into_iter()
        .flatten()
        .find(free)
        .or_else(|| (0..truth.len()).find(free))?;
    let mut out = truth.clone();
    out[slot] = (colour.unwrap_or(truth[slot].0), kind);
    Some(caption_of(&out))
}

/// How many partner pairs a description names (both kinds of a pair named).
fn partner_pairs(caption: &str) -> usize {
    let kinds: Vec<usize> = parse_caption(caption).into_iter().map(|(_, k)| k).collect();
    kinds.iter().filter(|&&k| k < partner(k) && kinds.contains(&partner(k))).count()
}

/// Keeps the usable negatives of each record (see the module doc) and balances yes/no records.
pub fn match_and_balance(records: &[Record], form: NegativeForm, seed: u64, stats: &mut BootstrapStats) -> Vec<Record> {
    let mut kept: Vec<Record> = Vec::new();
    for r in records {
        let Some(gt) = r.ground_truth().map(|c| c.response.clone()) else { continue };
        let is_caption = r.prompt == DESCRIBE;
        let mut out = Record { completions: vec![Completion::gt(gt.clone())], ..r.clone() };
        for c in r.completions.iter().filter(|c| c.kind != CompletionType::Gt) {
            let matched = if is_caption { splice(&gt, &c.response, form) } else { short_negative(&gt, &c.response) };
            match matched {
                Some(text) if !out.completions.iter().any(|x| x.response == text) => {
                    match c.kind {
                        CompletionType::MllmHal => stats.kept_weaken += 1,
                        _ => stats.kept_inject += 1,
                    }
                    if is_caption {
                        match partner_pairs(&text).cmp(&partner_pairs(&gt)) {
                            std::cmp::Ordering::Greater => stats.more_prior += 1,
                            std::cmp::Ordering::Less => stats.less_prior += 1,
                            std::cmp::Ordering::Equal => {}
                        }
                    }
                    out.completions.push(Completion::negative(text, c.kind.clone()));
                }
                _ => stats.dropped += 1,
            }
        }
        if out.completions.len() > 1 {
            kept.push(out);
        }
    }
    balance_yes_no(kept, seed, stats)
}

/// A short-answer negative: the same number of words as the truth and different from it ("yes"/"no" answers
/// are compared after POPE's parsing, so "no ." and "no" are the same answer).
fn short_negative(gt: &str, negative: &str) -> Option<String> {
    let n = negative.split_whitespace().collect::<Vec<_>>().join(" ");
    if n.split_whitespace().count() != gt.split_whitespace().count() || n == gt {
        return None;
    }
    if gt == "yes" || gt == "no" {
        let said_yes = crate::eval::pope::parse_answer(&n);
        return (said_yes != (gt == "yes")).then(|| if said_yes { "yes".to_string() } else { "no".to_string() });
    }
    Some(n)
}

/// Drops yes/no records of the larger side at random until chosen "yes" and chosen "no" are equally many.
fn balance_yes_no(records: Vec<Record>, seed: u64, stats: &mut BootstrapStats) -> Vec<Record> {
    let answer = |r: &Record| r.ground_truth().map(|c| c.response.clone()).unwrap_or_default();
    let mut yes: Vec<usize> = (0..records.len()).filter(|&i| answer(&records[i]) == "yes").collect();
    let mut no: Vec<usize> = (0..records.len()).filter(|&i| answer(&records[i]) == "no").collect();
    let mut rng = world::rng(seed, 77);
    yes.shuffle(&mut rng);
    no.shuffle(&mut rng);
    let n = yes.len().min(no.len());
    let drop: std::collections::HashSet<usize> = yes[n..].iter().chain(&no[n..]).copied().collect();
    stats.dropped_for_balance = drop.len();
    records.into_iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::bootstrap::variant_pairs;
    use crate::demo::world;

    #[test]
    fn splice_swaps_one_object_and_keeps_the_length() {
        let splice = |gt: &str, n: &str| super::splice(gt, n, NegativeForm::Swap);
        let gt = "a red circle and a blue star";
        // The circle's look-alike replaces the circle, in the negative's colour.
        assert_eq!(splice(gt, "a red circle and a green ring").as_deref(), Some("a green ring and a blue star"));
        // No look-alike in the truth: the object at the same place is replaced.
        assert_eq!(splice(gt, "a red circle and a white plus").as_deref(), Some("a red circle and a white plus"));
        assert_eq!(splice(gt, "a blue star"), None, "nothing absent named");
        // A partner pair of the truth stays whole; a hallucinated partner keeps the object it partners.
        let paired = "a red circle and a blue square and a yellow star";
        assert_eq!(
            splice(paired, "a green triangle").as_deref(),
            Some("a red circle and a blue square and a green triangle")
        );
        assert_eq!(
            splice(gt, "a green arrow and a purple bar").as_deref(),
            Some("a purple bar and a blue star"),
            "the bar (the star's partner) is the hallucination taken, and the star stays"
        );
        assert_eq!(splice("a red circle and a blue square", "a green arrow"), None, "nothing can be replaced");
        assert_eq!(splice("", "a red ring"), None);
        for (g, n) in [(gt, "a ring"), ("a red bar", "a red pillar and a red bar and a blue sun")] {
            let s = splice(g, n).unwrap();
            assert_eq!(s.split_whitespace().count(), g.split_whitespace().count(), "{s}");
        }
    }

    #[test]
    fn splice_adds_one_hallucinated_object_to_the_truth() {
        let add = |gt: &str, n: &str| splice(gt, n, NegativeForm::Add);
        let objects = |c: &str| {
            let mut v: Vec<(Option<usize>, usize)> = parse_caption(c);
            v.sort();
            v
        };
        let gt = "a red circle and a blue star";
        for (negative, added) in [
            // The partner of a truth object (the circle's partner is the square) is taken before any other.
            ("a green arrow and a blue square", "a blue square"),
            // None: the first absent object, in the colour the model gave it.
            ("a red circle and a white plus", "a white plus"),
            // No colour named: the pair's colour.
            ("a ring", "a red ring"),
        ] {
            let out = add(gt, negative).unwrap();
            assert_eq!(objects(&out), objects(&format!("{gt} and {added}")), "{negative} -> {out}");
            assert_eq!(out.split_whitespace().count(), gt.split_whitespace().count() + 4, "{out}");
            // The truth's objects keep their order; the place of the addition depends only on the two answers.
            let kept: Vec<_> = parse_caption(&out).into_iter().filter(|o| parse_caption(gt).contains(o)).collect();
            assert_eq!(kept, parse_caption(gt));
            assert_eq!(add(gt, negative), Some(out));
        }
        let places: std::collections::HashSet<usize> = (0..40)
            .map(|i| {
                let out = add("a red circle and a blue star and a white cross", &format!("a green arrow {i}")).unwrap();
                parse_caption(&out).iter().position(|o| o.1 == 5).unwrap()
            })
            .collect();
        assert_eq!(places.len(), 4, "every place is used: {places:?}");
        // Nothing absent: no negative. A complete partner pair does not stop an addition (nothing is replaced).
        assert_eq!(add(gt, "a blue star"), None);
        assert_eq!(
            add("a red circle and a blue square", "a green arrow").as_deref().map(objects),
            Some(objects("a red circle and a blue square and a green arrow"))
        );
        assert_eq!(add("", "a red ring").as_deref(), Some("a red ring"));
    }

    #[test]
    fn short_negatives_must_be_wrong_and_as_long() {
        assert_eq!(short_negative("yes", "no").as_deref(), Some("no"));
        assert_eq!(short_negative("no", "yes").as_deref(), Some("yes"));
        assert_eq!(short_negative("no", "no"), None);
        assert_eq!(short_negative("red", "blue").as_deref(), Some("blue"));
        assert_eq!(short_negative("top left", "left"), None);
    }

    fn rec(id: &str, prompt: &str, gt: &str, neg: &str) -> Record {
        Record {
            id: id.into(),
            prompt: prompt.into(),
            image: Some("x.png".into()),
            completions: vec![Completion::gt(gt), Completion::negative(neg, CompletionType::MllmHal)],
        }
    }

    #[test]
    fn yes_no_records_are_balanced() {
        let q = world::exists_question(0);
        let mut records: Vec<Record> = (0..6).map(|i| rec(&format!("n{i}"), &q, "no", "yes")).collect();
        records.extend((0..2).map(|i| rec(&format!("y{i}"), &q, "yes", "no")));
        records.push(rec("c", DESCRIBE, "a red circle", "a red ring"));
        let mut stats = BootstrapStats::default();
        let kept = match_and_balance(&records, NegativeForm::Swap, 1, &mut stats);
        let count = |a: &str| kept.iter().filter(|r| r.completions[0].response == a).count();
        assert_eq!((count("yes"), count("no")), (2, 2));
        assert_eq!(stats.dropped_for_balance, 4);
        assert!(kept.iter().any(|r| r.id == "c"));
        let pairs = variant_pairs(&kept, &["mllm-hal"]);
        assert_eq!(pairs.len(), 5);
        assert!(variant_pairs(&kept, &["llm-hal"]).is_empty());
    }
}
