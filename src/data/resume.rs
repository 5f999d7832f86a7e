//! Long runs that lose nothing: an append-only JSONL output keyed by id, shards, and the loop that ties them.
//!
//! - [`ResumableWriter`] appends one JSON line per finished item in a single `write` call (no user-space
//!   buffer), so a killed process loses at most the line being written. On open it checks the file as an output
//!   ([`output::check`]: a regular file or nothing, none of the command's inputs, a writable folder), reads the
//!   lines already there and remembers their ids; a re-run skips those. Every complete line must have the
//!   [`Shape`] of what bpo writes there: a file that does not (another JSON file, a question file) is refused,
//!   never appended to or cut. A torn last line (no trailing newline, and the start of such a line: `{"` and one
//!   of the shape's field names, cut short) is reported and truncated away; anything else is an error naming
//!   the line.
//!   Lines are not fsync'ed one by one: a killed process loses nothing, a power cut may lose the last lines.
//!   The writer holds the output's [`Lock`], so a second process on the same file stops instead of interleaving.
//! - [`Shard`] splits the ids between independent processes: `i/n` with **1-based** `i` (`1/4` .. `4/4`),
//!   the same convention as `jest --shard`. An id belongs to shard `stable_hash(id) % n` (0-based
//!   internally), so the shards cover every id exactly once on every machine.
//! - [`pending`] picks the records of one shard not yet in the output; [`process_pending`] runs a step function
//!   over them in batches and writes each finished record once.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::records::Record;
use crate::hash::stable_hash;
use crate::output::{self, Lock};
use crate::progress::Events;
use crate::{bail, Error, Result};

/// One of `count` disjoint parts of the ids. `index` is 0-based; the text form `i/n` is 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole data set as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` (0-based) of `count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("shard index {index} (0-based) out of range for {count} shards");
        }
        Ok(Shard { index, count })
    }

    /// Whether `id` belongs to this shard.
    pub fn contains(&self, id: &str) -> bool {
        stable_hash(&[id]) % self.count as u64 == self.index as u64
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;
    /// Parses `i/n`, 1-based: `1/4` is the first of four shards.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("shard {s:?}: expected i/n with 1 <= i <= n, e.g. 1/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i: usize = i.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        if i == 0 || n == 0 || i > n {
            return Err(bad());
        }
        Shard::new(i - 1, n)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// What [`ResumableWriter::open`] found in an existing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reopened {
    /// Complete lines already there (each one id).
    pub lines: usize,
    /// Lines whose id appeared on an earlier line (kept; should not happen).
    pub duplicate_ids: usize,
    /// The torn last line that was cut away, if any.
    pub torn: Option<TornLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornLine {
    /// 1-based line number.
    pub line: usize,
    /// Bytes removed.
    pub bytes: u64,
    /// Why it was judged torn.
    pub reason: String,
}

/// What every line of a resumable file holds: the id field and the other fields bpo writes on each line (the
/// JSON keys are written sorted, so a line starts with one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// What the file is, for messages.
    pub what: &'static str,
    /// The id field (a string or a number).
    pub key: &'static str,
    /// The other fields every line has.
    pub fields: &'static [&'static str],
}

impl Shape {
    /// BPO records ([`Record`]): `bootstrap weaken / inject` outputs.
    pub const RECORDS: Shape = Shape { what: "BPO records file", key: "id", fields: &["completions", "prompt"] };
    /// LLaVA answer rows (`generate --answers`).
    pub const ANSWERS: Shape = Shape {
        what: "answers file",
        key: "question_id",
        fields: &["answer_id", "metadata", "model_id", "prompt", "text"],
    };

    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.key).chain(self.fields.iter().copied())
    }

    /// Whether `text`, a line without its newline, is the start of a line of this shape cut short: the opening
    /// of a JSON object whose first key is (the start of) one of the shape's names, and valid JSON up to its end.
    fn is_torn_start(&self, text: &str) -> bool {
        let Some(rest) = text.strip_prefix("{\"") else { return false };
        let first = rest.split('"').next().unwrap_or_default();
        let named = match rest.find('"') {
            Some(_) => self.names().any(|n| n == first),
            None => self.names().any(|n| n.starts_with(first)),
        };
        named
            && matches!(serde_json::from_str::<Value>(text), Err(e) if e.classify() == serde_json::error::Category::Eof)
    }
}

/// Append-only JSONL output that knows which ids it already holds.
pub struct ResumableWriter {
    path: PathBuf,
    key: String,
    file: File,
    done: HashSet<String>,
    _lock: Lock,
}

impl ResumableWriter {
    /// Opens (or creates) a file of BPO records ([`Shape::RECORDS`]) that is none of the command's inputs.
    pub fn open(path: &Path) -> Result<(Self, Reopened)> {
        Self::open_as(path, Shape::RECORDS, &[])
    }

    /// Opens (or creates) `path`, whose lines have `shape`, keyed by its `key` field. The file must pass
    /// [`output::check`] (it is none of `inputs`); it is locked ([`Lock`]) for the writer's lifetime; a link is
    /// followed. Lines already there must have the shape (else the file is refused, unchanged); a torn last
    /// line is cut away and reported.
    pub fn open_as(path: &Path, shape: Shape, inputs: &[&Path]) -> Result<(Self, Reopened)> {
        output::check(path, inputs)?;
        let lock = Lock::file(path)?;
        let file = output::open_append(path)?;
        let (done, report, keep) =
            scan(path, &shape, File::open(output::resolve(path)?).map_err(|e| Error::io(path, e))?)?;
        if report.torn.is_some() {
            file.set_len(keep).map_err(|e| Error::io(path, e))?;
        }
        let key = shape.key.to_string();
        Ok((ResumableWriter { path: path.to_path_buf(), key, file, done, _lock: lock }, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a line with this id is already in the file.
    pub fn is_done(&self, id: &str) -> bool {
        self.done.contains(id)
    }

    /// Number of distinct ids in the file.
    pub fn done_count(&self) -> usize {
        self.done.len()
    }

    /// Writes `row` as one line and hands it to the OS. Refuses a row without the key or with an id already
    /// written, so an item can never appear twice.
    pub fn append<T: Serialize>(&mut self, row: &T) -> Result<()> {
        let value = serde_json::to_value(row).map_err(|e| Error::parse(&self.path, None, e))?;
        let Some(id) = value.get(&self.key).and_then(key_string) else {
            bail!("{}: row to append has no `{}` field", self.path.display(), self.key);
        };
        if self.done.contains(&id) {
            bail!("{}: id {id:?} is already written", self.path.display());
        }
        let mut line = serde_json::to_string(&value).map_err(|e| Error::parse(&self.path, None, e))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.done.insert(id);
        Ok(())
    }
}

/// The text form of an id value as the writer keys it: a string as it is, a number's digits; `None` otherwise.
pub fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the ids of an existing file. Returns them, the report and the length to keep.
fn scan(path: &Path, shape: &Shape, file: File) -> Result<(HashSet<String>, Reopened, u64)> {
    let mut reader = BufReader::new(file);
    let mut done = HashSet::new();
    let mut report = Reopened::default();
    let (mut offset, mut line_no) = (0u64, 0usize);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        match line_id(&buf, shape) {
            Ok(None) => {}
            Ok(Some(id)) if buf.ends_with(b"\n") => {
                report.lines += 1;
                if !done.insert(id) {
                    report.duplicate_ids += 1;
                }
            }
            // Only the last line can lack its newline: a write cut short by a kill (or a full disk).
            Ok(Some(_)) => {
                report.torn = Some(TornLine { line: line_no, bytes: n as u64, reason: "no trailing newline".into() });
                return Ok((done, report, offset));
            }
            Err(_) if !buf.ends_with(b"\n") && std::str::from_utf8(&buf).is_ok_and(|t| shape.is_torn_start(t)) => {
                let reason = "a line cut short (no trailing newline)".into();
                report.torn = Some(TornLine { line: line_no, bytes: n as u64, reason });
                return Ok((done, report, offset));
            }
            Err(msg) => {
                let (what, key) = (shape.what, shape.key);
                return Err(Error::parse(
                    path,
                    Some(line_no),
                    format!("{msg}: not a line of a {what} (keyed by `{key}`) that bpo wrote; refusing to append to or repair this file (give another output)"),
                ));
            }
        }
        offset += n as u64;
    }
    Ok((done, report, offset))
}

/// The key of one line, checked to have every field of `shape`; `Ok(None)` for a blank line.
fn line_id(bytes: &[u8], shape: &Shape) -> std::result::Result<Option<String>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if let Some(missing) = shape.fields.iter().find(|f| v.get(**f).is_none()) {
        return Err(format!("no `{missing}` field"));
    }
    v.get(shape.key).and_then(key_string).map(Some).ok_or_else(|| format!("no `{}` field", shape.key))
}

/// Counts of one [`process_pending`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunCounts {
    /// Records in the input.
    pub input: usize,
    /// Records that belong to other shards.
    pub other_shards: usize,
    /// Records of this shard already in the output (skipped).
    pub already_done: usize,
    /// Records written by this run.
    pub written: usize,
    /// Records the step could not finish (not written; a re-run retries them).
    pub failed: usize,
}

/// The records of `shard` that `out` does not hold yet, in input order, and the counts of the others.
pub fn pending(records: Vec<Record>, shard: Shard, out: &ResumableWriter) -> (Vec<Record>, RunCounts) {
    let mut counts = RunCounts { input: records.len(), ..Default::default() };
    let mut pending = Vec::new();
    for r in records {
        if !shard.contains(&r.id) {
            counts.other_shards += 1;
        } else if out.is_done(&r.id) {
            counts.already_done += 1;
        } else {
            pending.push(r);
        }
    }
    (pending, counts)
}

/// Runs `step` over the [`pending`] records of `shard`, `batch_size` at a time, and appends
/// each record the step returns. `step` gets a batch and returns one entry per record: `Some(record)` to write
/// (normally the input plus its new completions), `None` when it failed (retried by the next run). An `Err`
/// from `step` stops the run; what was written stays. Reports the stage `records` (one unit a pending record).
pub fn process_pending<F>(
    records: Vec<Record>,
    shard: Shard,
    batch_size: usize,
    out: &mut ResumableWriter,
    events: &dyn Events,
    mut step: F,
) -> Result<RunCounts>
where
    F: FnMut(&[Record]) -> Result<Vec<Option<Record>>>,
{
    let (pending, mut counts) = pending(records, shard, out);
    events.stage("records", Some(pending.len() as u64));
    for batch in pending.chunks(batch_size.max(1)) {
        let results = step(batch)?;
        if results.len() != batch.len() {
            bail!("step returned {} results for a batch of {}", results.len(), batch.len());
        }
        for result in results {
            match result {
                Some(record) => {
                    out.append(&record)?;
                    counts.written += 1;
                }
                None => counts.failed += 1,
            }
            events.advance(1);
        }
    }
    events.end_stage();
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parses_one_based_and_validates() {
        assert_eq!("1/4".parse::<Shard>().unwrap(), Shard { index: 0, count: 4 });
        assert_eq!("4/4".parse::<Shard>().unwrap(), Shard { index: 3, count: 4 });
        for bad in ["0/4", "5/4", "1/0", "a/b", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(Shard::new(2, 5).unwrap().to_string(), "3/5");
        assert!(Shard::new(5, 5).is_err());
    }

    #[test]
    fn shards_partition_ids() {
        let ids: Vec<String> = (0..500).map(|i| format!("id{i}#0")).collect();
        let n = 7;
        let mut sizes = vec![0; n];
        for id in &ids {
            let owners: Vec<_> = (0..n).filter(|&i| Shard::new(i, n).unwrap().contains(id)).collect();
            assert_eq!(owners.len(), 1, "{id}");
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|&s| s > 30), "unbalanced: {sizes:?}");
        assert!(ids.iter().all(|id| Shard::ALL.contains(id)));
    }

    /// Lines keyed by `id` with no other field required.
    const TEST: Shape = Shape { what: "test file", key: "id", fields: &[] };

    fn open(path: &Path) -> Result<(ResumableWriter, Reopened)> {
        ResumableWriter::open_as(path, TEST, &[])
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn writer_appends_and_remembers_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let (mut w, rep) = open(&path).unwrap();
        assert_eq!(rep, Reopened::default());
        w.append(&serde_json::json!({"id": "a", "x": 1})).unwrap();
        assert!(w.append(&serde_json::json!({"id": "a"})).is_err(), "second write of an id");
        assert!(w.append(&serde_json::json!({"x": 2})).is_err(), "row without id");
        drop(w);
        let (w, rep) = open(&path).unwrap();
        assert_eq!(rep.lines, 1);
        assert!(w.is_done("a") && !w.is_done("b"));
        assert_eq!(read(&path), "{\"id\":\"a\",\"x\":1}\n");
    }

    #[test]
    fn torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        for (tail, reason) in
            [("{\"id\": \"c\", \"x\"", "cut short"), ("{\"id\": \"c\"}", "newline"), ("{\"i", "cut short")]
        {
            std::fs::write(&path, format!("{{\"id\": \"a\"}}\n\n{{\"id\": 5}}\n{tail}")).unwrap();
            let (mut w, rep) = open(&path).unwrap();
            let torn = rep.torn.unwrap();
            assert_eq!((rep.lines, torn.line, torn.bytes), (2, 4, tail.len() as u64));
            assert!(torn.reason.contains(reason), "{}", torn.reason);
            assert!(w.is_done("5") && !w.is_done("c"));
            w.append(&serde_json::json!({"id": "c"})).unwrap();
            assert_eq!(read(&path), "{\"id\": \"a\"}\n\n{\"id\": 5}\n{\"id\":\"c\"}\n");
        }
    }

    #[test]
    fn bad_line_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\": \"a\"}\n{\"oops\": 1}\n{\"id\": \"b\"}\n").unwrap();
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains(":2:") && err.contains("`id`"), "{err}");
    }

    #[test]
    fn process_pending_skips_done_and_other_shards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let recs: Vec<Record> = (0..20)
            .map(|i| Record { id: format!("r{i}"), prompt: "p".into(), image: None, completions: vec![] })
            .collect();
        let shard = Shard::new(1, 2).unwrap();
        let (mut w, _) = open(&path).unwrap();
        let seen = crate::progress::Recorder::default();
        // First run: fail r3 (if it is ours), write the rest.
        let c1 = process_pending(recs.clone(), shard, 3, &mut w, &seen, |b| {
            Ok(b.iter().map(|r| (r.id != "r3").then(|| r.clone())).collect())
        })
        .unwrap();
        let mine = recs.iter().filter(|r| shard.contains(&r.id)).count();
        assert_eq!(c1.other_shards, 20 - mine);
        assert_eq!(c1.written + c1.failed, mine);
        assert_eq!(seen.done_in("records"), mine as u64, "one unit a pending record");
        let c2 = process_pending(recs, shard, 3, &mut w, &crate::progress::Silent, |b| {
            Ok(b.iter().cloned().map(Some).collect())
        })
        .unwrap();
        assert_eq!((c2.already_done, c2.written + c2.already_done), (c1.written, mine));
        assert_eq!(w.done_count(), mine);
    }
}
