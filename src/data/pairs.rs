//! From BPO records to preference pairs (docs/bootstrap.md, "`bpo pairs`"), and pair files in and out.
//!
//! Every two completions of a record with different scores make one pair, the higher score chosen; equal
//! scores are skipped, and so are two different-score completions with the same text (whitespace-normalised:
//! DPO learns nothing from them). A record with any response longer than `max_words` whitespace-separated
//! words (default 350) is dropped whole. A pair's id is `"{record id}/{chosen index}-{rejected index}"`
//! (completion indices in the record). Row layouts are in [`super::pair_rows`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::pair_rows::{Pair, PairFormat};
use super::records::{normalize_ws, word_count, Record};
use crate::{jsonl, Error, Result};

/// Options of [`expand`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairOptions {
    /// Drop records with any response longer than this many whitespace-separated words; `None` keeps all.
    /// Default 350 (the released script).
    pub max_words: Option<usize>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions { max_words: Some(350) }
    }
}

/// What [`expand`] kept and dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PairStats {
    pub records_in: usize,
    /// Records that gave at least one pair.
    pub records_kept: usize,
    /// Records dropped because a response exceeded `max_words`.
    pub records_too_long: usize,
    /// Records (within the length limit) that gave no pair: one completion, or all scores equal.
    pub records_without_pairs: usize,
    pub pairs: usize,
    /// Completion pairs skipped because their scores tie.
    pub ties_skipped: usize,
    /// Pairs skipped because chosen and rejected have the same text.
    pub identical_skipped: usize,
    /// Pairs lost with the records dropped for length.
    pub pairs_in_too_long: usize,
}

impl std::fmt::Display for PairStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "records: {} in, {} kept", self.records_in, self.records_kept)?;
        writeln!(f, "  dropped: {} too long, {} without pairs", self.records_too_long, self.records_without_pairs)?;
        writeln!(f, "pairs: {} kept", self.pairs)?;
        write!(
            f,
            "  skipped: {} tied scores, {} identical texts, {} in too-long records",
            self.ties_skipped, self.identical_skipped, self.pairs_in_too_long
        )
    }
}

/// Expands records into pairs, in record order.
pub fn expand(records: &[Record], opts: &PairOptions) -> (Vec<Pair>, PairStats) {
    let mut stats = PairStats { records_in: records.len(), ..Default::default() };
    let mut pairs = Vec::new();
    for record in records {
        let (made, ties, identical) = record_pairs(record);
        let too_long = opts.max_words.is_some_and(|m| record.completions.iter().any(|c| word_count(&c.response) > m));
        if too_long {
            stats.records_too_long += 1;
            stats.pairs_in_too_long += made.len();
            continue;
        }
        stats.ties_skipped += ties;
        stats.identical_skipped += identical;
        if made.is_empty() {
            stats.records_without_pairs += 1;
            continue;
        }
        stats.records_kept += 1;
        stats.pairs += made.len();
        pairs.extend(made);
    }
    (pairs, stats)
}

/// All pairs of one record, with the counts of tied and identical-text combinations skipped.
pub fn record_pairs(record: &Record) -> (Vec<Pair>, usize, usize) {
    let c = &record.completions;
    let (mut pairs, mut ties, mut identical) = (Vec::new(), 0, 0);
    for i in 0..c.len() {
        for j in i + 1..c.len() {
            if c[i].score == c[j].score {
                ties += 1;
                continue;
            }
            if normalize_ws(&c[i].response) == normalize_ws(&c[j].response) {
                identical += 1;
                continue;
            }
            let (hi, lo) = if c[i].score > c[j].score { (i, j) } else { (j, i) };
            pairs.push(Pair {
                id: format!("{}/{hi}-{lo}", record.id),
                prompt: record.prompt.clone(),
                image: record.image.clone(),
                chosen: c[hi].response.clone(),
                rejected: c[lo].response.clone(),
                chosen_type: Some(c[hi].kind.clone()),
                rejected_type: Some(c[lo].kind.clone()),
            });
        }
    }
    (pairs, ties, identical)
}

/// Reads and concatenates record files (shards of one run). An id found twice, in one file or across files,
/// is an error naming both places.
pub fn read_record_shards(paths: &[PathBuf]) -> Result<Vec<Record>> {
    let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
    let mut out = Vec::new();
    for (f, path) in paths.iter().enumerate() {
        for (line, record) in jsonl::read_numbered::<Record>(path)? {
            if let Some((pf, pl)) = seen.insert(record.id.clone(), (f, line)) {
                let msg = format!("id {:?} already in {}:{pl}", record.id, paths[pf].display());
                return Err(Error::parse(path, Some(line), msg));
            }
            out.push(record);
        }
    }
    Ok(out)
}

/// Writes `pairs` to `path` in `format` (atomically: temporary file, then rename).
pub fn write_pairs(path: &Path, pairs: &[Pair], format: PairFormat) -> Result<()> {
    let rows: Vec<Value> = pairs.iter().map(|p| p.to_row(format)).collect();
    jsonl::write(path, &rows)
}

/// Reads a pair file in any supported layout (bpo, TRL conversational or plain strings, llama-factory),
/// detected row by row. Errors name the file and line.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    jsonl::read_numbered::<Value>(path)?
        .into_iter()
        .map(|(line, row)| Pair::from_row(&row).map_err(|m| Error::parse(path, Some(line), m)))
        .collect()
}

/// `bpo pairs`: merge record shards, expand, write. Returns the counts.
pub fn make_pair_file(records: &[PathBuf], out: &Path, format: PairFormat, opts: &PairOptions) -> Result<PairStats> {
    let recs = read_record_shards(records)?;
    let (pairs, stats) = expand(&recs, opts);
    write_pairs(out, &pairs, format)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::{Completion, CompletionType};

    fn record(id: &str, completions: Vec<Completion>) -> Record {
        Record { id: id.into(), prompt: "p".into(), image: Some("i.jpg".into()), completions }
    }
    fn neg(text: &str) -> Completion {
        Completion::negative(text, CompletionType::LlmHal)
    }

    #[test]
    fn every_different_score_pair_higher_chosen() {
        let r = record(
            "r",
            vec![
                neg("n1"),
                Completion::gt("g"),
                neg("n2"),
                Completion { response: "mid".into(), score: 0.5, kind: "x".into() },
            ],
        );
        let (pairs, ties, identical) = record_pairs(&r);
        let got: Vec<_> = pairs.iter().map(|p| (p.id.as_str(), p.chosen.as_str(), p.rejected.as_str())).collect();
        assert_eq!(
            got,
            [
                ("r/1-0", "g", "n1"),
                ("r/3-0", "mid", "n1"),
                ("r/1-2", "g", "n2"),
                ("r/1-3", "g", "mid"),
                ("r/3-2", "mid", "n2")
            ]
        );
        assert_eq!((ties, identical), (1, 0));
        assert_eq!(pairs[0].rejected_type, Some(CompletionType::LlmHal));
    }

    #[test]
    fn stats_count_every_reason() {
        let long = "w ".repeat(351);
        let records = vec![
            record("kept", vec![Completion::gt("g"), neg("a"), neg("b")]),
            record("long", vec![Completion::gt(&long), neg("a")]),
            record("lonely", vec![Completion::gt("g")]),
            record("tied", vec![neg("a"), neg("b")]),
            record("same", vec![Completion::gt("g  x"), neg("g x")]),
        ];
        let (pairs, stats) = expand(&records, &PairOptions::default());
        assert_eq!(pairs.len(), 2);
        let want = PairStats {
            records_in: 5,
            records_kept: 1,
            records_too_long: 1,
            records_without_pairs: 3,
            pairs: 2,
            ties_skipped: 2,
            identical_skipped: 1,
            pairs_in_too_long: 1,
        };
        assert_eq!(stats, want);
        // 350 words exactly is kept; no limit keeps everything.
        let ok = vec![record("x", vec![Completion::gt("w ".repeat(350)), neg("a")])];
        assert_eq!(expand(&ok, &PairOptions::default()).1.pairs, 1);
        assert_eq!(expand(&records, &PairOptions { max_words: None }).1.records_too_long, 0);
    }
}
