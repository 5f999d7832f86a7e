//! Error-injection prompts (docs/bootstrap.md, "`bpo bootstrap inject`"): the text a text-only LLM gets so that it rewrites
//! a ground-truth answer into a plausible hallucination. Our own wording, the released structure:
//! - `description` (default, zero-shot): instruction, `Description: {answer}`, `Modified description:`.
//! - `qa` (six-shot): "you see a similar but different image", six worked `Question / Response / Modified
//!   response` examples (changed people and actions, an apple's colour, the object left of a boy, a count of
//!   people, a count of oranges, a price), then the real question and response. Fields go on separate lines.
//! - `continue`: no instruction at all; the LLM continues the ground truth cut at a word boundary, so the rest
//!   comes from its language prior. Not chat-wrapped.
//!
//! Templates use the placeholders `{answer}` and `{question}` (a user template replaces the built-in one) and
//! are wrapped in the Vicuna-v1 conversation when sent to a raw completion endpoint.

use crate::hash::stable_hash;
use crate::{bail, Result};

/// How negatives are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum InjectMode {
    #[default]
    Description,
    Qa,
    Continue,
}

impl InjectMode {
    /// The built-in template (`None` for `continue`, which has none).
    pub fn default_template(&self) -> Option<&'static str> {
        match self {
            InjectMode::Description => Some(DESCRIPTION),
            InjectMode::Qa => Some(QA),
            InjectMode::Continue => None,
        }
    }

    /// Stop strings added to the user's: end of turn, and the start of another example block.
    pub fn default_stops(&self) -> Vec<String> {
        let extra = match self {
            InjectMode::Description => vec!["\nDescription:"],
            InjectMode::Qa => vec!["\nQuestion:"],
            InjectMode::Continue => vec![],
        };
        std::iter::once("</s>").chain(extra).map(str::to_string).collect()
    }

    /// Labels a model sometimes repeats at the start of its answer; removed when cleaning.
    pub fn echoed_labels(&self) -> &'static [&'static str] {
        match self {
            InjectMode::Description => &["Modified description:"],
            InjectMode::Qa => &["Modified response:"],
            InjectMode::Continue => &[],
        }
    }
}

/// Zero-shot description rewriting.
pub const DESCRIPTION: &str = "Below is a description of an image. Rewrite it so that it contains a few \
mistakes: add objects that are not in it, leave out some of its objects, or change attributes of objects such \
as their colour, shape, size or position. Every change must stay common and logical, something that could \
really appear in such a scene. Keep the style and the length of the original and do not explain the changes.

Description: {answer}
Modified description:";

/// Six-shot question-answer rewriting.
pub const QA: &str = "You are looking at an image that is similar to, but not the same as, the image a \
question and its response were written for. Rewrite the response so that it describes the image you see: \
change people, objects, actions, attributes, counts or numbers, keeping the response natural and plausible. \
Reply with the modified response only.

Question: What is happening in this picture?
Response: Two children are flying a red kite in a park while their father watches from a bench.
Modified response: Three teenagers are throwing a frisbee in a park while their mother reads on a blanket.

Question: What color is the apple on the plate?
Response: The apple on the plate is green.
Modified response: The apple on the plate is red with a few yellow spots.

Question: What is on the left side of the boy?
Response: A bicycle is leaning against the fence on the left side of the boy.
Modified response: A large brown dog is sitting on the grass on the left side of the boy.

Question: How many people are in the image?
Response: There are four people in the image.
Modified response: There are six people in the image.

Question: How many oranges are in the bowl?
Response: The bowl holds three oranges.
Modified response: The bowl holds five oranges and a banana.

Question: How much does a coffee cost according to the menu board?
Response: According to the menu board, a coffee costs $2.50.
Modified response: According to the menu board, a coffee costs $3.75.

Question: {question}
Response: {answer}
Modified response:";

/// Checks a user template: it must use `{answer}`.
pub fn check_template(template: &str) -> Result<()> {
    if !template.contains("{answer}") {
        bail!("prompt template has no {{answer}} placeholder");
    }
    Ok(())
}

/// Replaces `{answer}` and `{question}` in one pass (so text inside the answer is never substituted again).
pub fn fill(template: &str, question: &str, answer: &str) -> String {
    let mut out = String::with_capacity(template.len() + question.len() + answer.len());
    let mut rest = template;
    while let Some(pos) = rest.find('{') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("{answer}") {
            out.push_str(answer);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{question}") {
            out.push_str(question);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `continue` mode: the ground truth cut after `k` words, `k` drawn from 1..n-1 (n words) by a hash of
/// `(seed, id, sample)`, so the cut is the same on every run and resume. `None` for fewer than two words.
/// The prefix keeps the original spacing and ends at the end of word `k`.
pub fn cut_prefix<'a>(text: &'a str, seed: u64, id: &str, sample: usize) -> Option<&'a str> {
    let ends: Vec<usize> = word_ends(text);
    if ends.len() < 2 {
        return None;
    }
    let h = stable_hash(&[&seed.to_string(), id, &sample.to_string()]);
    let k = 1 + (h % (ends.len() as u64 - 1)) as usize;
    Some(&text[..ends[k - 1]])
}

/// Byte offsets just after each whitespace-separated word.
fn word_ends(text: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut in_word = false;
    for (i, ch) in text.char_indices() {
        if ch.is_whitespace() {
            if in_word {
                ends.push(i);
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    if in_word {
        ends.push(text.len());
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_once_and_keeps_other_braces() {
        assert_eq!(
            fill("Q: {question} A: {answer} {x} {", "what {answer}?", "a {question}"),
            "Q: what {answer}? A: a {question} {x} {"
        );
        let p = fill(DESCRIPTION, "q", "A red bus.");
        assert!(p.ends_with("Description: A red bus.\nModified description:"), "{p}");
        let p = fill(QA, "How many cats?", "Two cats.");
        assert!(p.ends_with("Question: How many cats?\nResponse: Two cats.\nModified response:"));
        assert_eq!(p.matches("Modified response:").count(), 7, "six examples plus the real one");
    }

    #[test]
    fn templates_checked_and_modes_parsed() {
        assert!(check_template("no placeholder").is_err());
        assert!(check_template(QA).is_ok() && check_template(DESCRIPTION).is_ok());
        assert!(InjectMode::Continue.default_template().is_none());
        assert_eq!(InjectMode::Qa.default_stops(), ["</s>", "\nQuestion:"]);
    }

    #[test]
    fn cut_is_seeded_and_on_word_boundaries() {
        let text = "A  man rides\na red bike.";
        assert_eq!(cut_prefix("one", 0, "x", 0), None);
        assert_eq!(cut_prefix("two words", 0, "x", 0), Some("two"));
        let mut seen = std::collections::HashSet::new();
        for s in 0..50 {
            let p = cut_prefix(text, 7, "id", s).unwrap();
            assert_eq!(Some(p), cut_prefix(text, 7, "id", s), "deterministic");
            assert!(text.starts_with(p) && !p.ends_with(char::is_whitespace) && p.len() < text.len() - 1);
            assert!(text[p.len()..].starts_with(char::is_whitespace), "cut inside a word: {p:?}");
            seen.insert(p);
        }
        assert_eq!(seen.len(), 5, "every cut of 6 words shows up: {seen:?}");
    }
}
