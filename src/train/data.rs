//! Training data: preference pairs (from BPO records or pair files) and supervised conversations (LLaVA instruct
//! JSON), tokenised with a model's template and prompt style, checked, and batched.
//!
//! A pair or conversation whose image file is missing is skipped and reported (never silently); a malformed row
//! fails with its file and line. Sequences longer than `max_length` positions (image positions included) lose the
//! end of their answer, never image positions; one whose prompt alone fills `max_length` is skipped and counted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::data::input::strip_image_tag;
use crate::data::pairs::{expand, read_pairs, read_record_shards, PairOptions, PairStats};
use crate::data::Pair;
use crate::hash::splitmix64;
use crate::model::Vlm;
use crate::text::template::conversation_ids;
use crate::{Error, Result};

/// A tokenised preference pair.
#[derive(Debug, Clone)]
pub struct PairExample {
    pub id: String,
    pub image: Option<PathBuf>,
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A tokenised conversation for supervised training: `target[i]` says whether `ids[i]` is a label.
#[derive(Debug, Clone)]
pub struct SftExample {
    pub id: String,
    pub image: Option<PathBuf>,
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

/// What loading kept and dropped.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    /// Rows (pairs or conversations) read.
    pub read: usize,
    /// Examples kept.
    pub kept: usize,
    /// Skipped because the image file does not exist: (example id, path).
    pub missing_images: Vec<(String, PathBuf)>,
    /// Skipped because the prompt alone fills `max_length`.
    pub prompt_too_long: usize,
    /// Kept with the end of an answer cut at `max_length`.
    pub truncated: usize,
    /// How records were expanded into pairs (records input only).
    pub pairs: Option<PairStats>,
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} read, {} kept", self.read, self.kept)?;
        if !self.missing_images.is_empty() {
            write!(f, ", {} skipped for a missing image", self.missing_images.len())?;
        }
        if self.prompt_too_long > 0 {
            write!(f, ", {} skipped with a prompt longer than --max-length", self.prompt_too_long)?;
        }
        if self.truncated > 0 {
            write!(f, ", {} answers cut at --max-length", self.truncated)?;
        }
        Ok(())
    }
}

/// Reads pairs from a BPO records file (expanded as `bpo pairs` does) or from a pair file (bpo, TRL
/// conversational or plain, LLaMA-Factory rows). The first row decides: `completions` means records.
pub fn read_preference_file(path: &Path, opts: &PairOptions) -> Result<(Vec<Pair>, Option<PairStats>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut first = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let line = crate::jsonl::strip_bom(&line);
        if !line.trim().is_empty() {
            first = Some(serde_json::from_str::<Value>(line).map_err(|e| Error::parse(path, Some(i + 1), e))?);
            break;
        }
    }
    let Some(first) = first else { return Err(Error::parse(path, None, "no pairs: the file is empty")) };
    if first.get("completions").is_some() {
        let records = read_record_shards(&[path.to_path_buf()])?;
        let (pairs, stats) = expand(&records, opts);
        Ok((pairs, Some(stats)))
    } else {
        Ok((read_pairs(path)?, None))
    }
}

/// Fits `prompt + answer` into `max_length` by cutting the answer. None when the prompt alone fills it.
fn fit(prompt_len: usize, answer: &mut Vec<u32>, max_length: usize) -> Option<bool> {
    if prompt_len >= max_length {
        return None;
    }
    let room = max_length - prompt_len;
    let cut = answer.len() > room;
    answer.truncate(room);
    Some(cut)
}

/// Tokenises pairs with `vlm`'s template and prompt style.
pub fn tokenize_pairs(
    vlm: &Vlm,
    pairs: &[Pair],
    images: Option<&Path>,
    max_length: usize,
) -> Result<(Vec<PairExample>, DataReport)> {
    let mut report = DataReport { read: pairs.len(), ..Default::default() };
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let image = p.image.as_deref().map(|rel| crate::data::image_path(images, rel));
        if let Some(path) = image.as_ref().filter(|p| !p.is_file()) {
            report.missing_images.push((p.id.clone(), path.clone()));
            continue;
        }
        let prompt = vlm.prompt_ids(&p.prompt, image.is_some())?;
        let (mut chosen, mut rejected) = (vlm.response_ids(&p.chosen)?, vlm.response_ids(&p.rejected)?);
        match (fit(prompt.len(), &mut chosen, max_length), fit(prompt.len(), &mut rejected, max_length)) {
            (Some(a), Some(b)) => report.truncated += usize::from(a || b),
            _ => {
                report.prompt_too_long += 1;
                continue;
            }
        }
        out.push(PairExample { id: p.id.clone(), image, prompt, chosen, rejected });
    }
    report.kept = out.len();
    Ok((out, report))
}

use crate::data::input::LlavaSample as Conversation;

/// One supervised sample: its id, image path (relative to the image folder) and (question, answer) turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    pub image: Option<String>,
    pub turns: Vec<(String, String)>,
}

/// Reads LLaVA instruct data: a JSON array of `{id, image?, conversations: [{from, value}]}`, or one such object
/// per line. `system` turns are ignored, a question left without an answer is dropped. Errors name the file and
/// line.
pub fn read_conversations(path: &Path) -> Result<Vec<Sample>> {
    let text = crate::jsonl::read_text(path)?;
    let samples: Vec<(usize, Conversation)> = if text.trim_start().starts_with('[') {
        let all: Vec<Conversation> = serde_json::from_str(&text).map_err(|e| Error::parse(path, Some(e.line()), e))?;
        all.into_iter().map(|c| (0, c)).collect()
    } else {
        crate::jsonl::read_numbered(path)?
    };
    let mut out = Vec::with_capacity(samples.len());
    for (i, (line, c)) in samples.into_iter().enumerate() {
        let at = |msg: String| {
            Error::parse(path, (line > 0).then_some(line), if line > 0 { msg } else { format!("element {i}: {msg}") })
        };
        let mut turns = Vec::new();
        let mut question: Option<String> = None;
        for t in c.conversations {
            match (t.from.as_str(), question.take()) {
                ("system", q) => question = q,
                ("human" | "user", None) => question = Some(strip_image_tag(&t.value)),
                ("gpt" | "assistant", Some(q)) => turns.push((q, t.value)),
                (who, _) => {
                    return Err(at(format!("conversation does not alternate question/answer at a `{who}` turn")))
                }
            }
        }
        if turns.is_empty() {
            return Err(at("conversation has no answered question".into()));
        }
        let id = match c.id {
            Some(Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => format!("#{i}"),
        };
        out.push(Sample { id, image: c.image, turns });
    }
    Ok(out)
}

/// Tokenises conversations: answers are targets, the rest context (see [`conversation_ids`]).
pub fn tokenize_conversations(
    vlm: &Vlm,
    samples: &[Sample],
    images: Option<&Path>,
    max_length: usize,
) -> Result<(Vec<SftExample>, DataReport)> {
    let mut report = DataReport { read: samples.len(), ..Default::default() };
    let mut out = Vec::with_capacity(samples.len());
    let slot = vlm.model.image_token().map(|id| (id, vlm.model.image_tokens()));
    for Sample { id, image, turns } in samples {
        let image = image.as_deref().map(|rel| crate::data::image_path(images, rel));
        if let Some(path) = image.as_ref().filter(|p| !p.is_file()) {
            report.missing_images.push((id.clone(), path.clone()));
            continue;
        }
        let (mut ids, mut target) = conversation_ids(&vlm.tok, &vlm.chat, vlm.style, turns, image.as_ref().and(slot))?;
        // The first answer must start inside the window, and the window must not end inside the image.
        let first_target = target.iter().position(|&t| t).unwrap_or(ids.len());
        if first_target >= max_length {
            report.prompt_too_long += 1;
            continue;
        }
        if ids.len() > max_length {
            report.truncated += 1;
            ids.truncate(max_length);
            target.truncate(max_length);
        }
        out.push(SftExample { id: id.clone(), image, ids, target });
    }
    report.kept = out.len();
    Ok((out, report))
}

/// The order of `n` examples in `epoch`: a permutation that depends only on (seed, epoch), so a resumed run sees
/// the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(epoch as u64 + 1)));
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cut_never_prompts() {
        let mut a = vec![1, 2, 3, 4];
        assert_eq!(fit(5, &mut a, 7), Some(true));
        assert_eq!(a, [1, 2]);
        let mut b = vec![1];
        assert_eq!(fit(5, &mut b, 7), Some(false));
        assert_eq!(fit(7, &mut b, 7), None);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 3, 0);
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        assert_ne!(a, epoch_order(50, 4, 0));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn conversations_pair_questions_with_answers_and_errors_name_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"[{"id": 3, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}]"#).unwrap();
        let got = read_conversations(&path).unwrap();
        assert_eq!(got[0].id, "3");
        assert_eq!(got[0].turns, vec![("q1".to_string(), "a1".to_string()), ("q2".to_string(), "a2".to_string())]);
        std::fs::write(&path, "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n{\"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}]}\n").unwrap();
        let err = read_conversations(&path).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("alternate"), "{err}");
        std::fs::write(&path, "[{\"conversations\": [}]").unwrap();
        assert!(read_conversations(&path).unwrap_err().to_string().contains(":1:"));
    }
}
