//! `bpo eval suite`: one model through a list of benchmarks, configured in a TOML file, and the table that
//! puts several suites side by side (the BPO paper's layout: one row per model, one column per number).
//!
//! A suite folder holds `suite.json` (which model and adapter it evaluated, and the benchmarks run) and one run
//! folder per benchmark (`pope/`, `object-halbench/`, `mmvet/`, `llava-bench/`, `mmhal/`), each the same as
//! the single command writes. The headline numbers are read back from those folders, so a table can always
//! be rebuilt from disk.

use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::report::{read_scores, Scores};
use crate::{range, Error, Result};

/// The judge of the judged benchmarks (`[judge]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// OpenAI-compatible chat server (http only).
    pub url: String,
    /// Model name sent with each request; a benchmark's `judge_model` overrides it.
    pub model: String,
    /// Environment variable holding the API key; default `OPENAI_API_KEY`.
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// Requests in flight at once, at least 1; default 4.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra attempts after a connection error, timeout, 429 or 5xx; default 5.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Seconds before the first retry, in [0, 30], doubled each time; default 2.
    #[serde(default = "default_backoff")]
    pub backoff: f64,
    /// Total seconds allowed per request attempt, in [1, 86400]; default 120.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
}

impl JudgeConfig {
    /// The first wait before a retry ([`range::backoff`]; checked by [`SuiteConfig::load`]).
    pub fn backoff(&self) -> Result<Duration> {
        range::check("[judge] backoff", self.backoff, range::backoff)
    }

    /// The time limit of one request attempt ([`range::timeout`]; checked by [`SuiteConfig::load`]).
    pub fn timeout(&self) -> Result<Duration> {
        range::check("[judge] timeout", self.timeout, range::timeout)
    }
}

fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_concurrency() -> usize {
    4
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    2.0
}
fn default_timeout() -> u64 {
    120
}

/// `[pope]`: POPE question files (one per split), answered with LLaVA's short-answer suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopeConfig {
    pub questions: Vec<PathBuf>,
    /// Folder the questions' image names are relative to.
    pub images: Option<PathBuf>,
    /// Default 128.
    pub max_new_tokens: Option<usize>,
}

/// `[object_halbench]`: describe a folder of COCO images with the eight Object HalBench instructions, score
/// with CHAIR against COCO annotations (`coco`) or a ground-truth JSONL (`ground_truth`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectHalBenchConfig {
    pub images: PathBuf,
    pub coco: Option<PathBuf>,
    pub ground_truth: Option<PathBuf>,
    /// Describe at most this many images (sorted by name).
    pub limit: Option<usize>,
    /// Default 512.
    pub max_new_tokens: Option<usize>,
}

/// `[mmvet]`: `mm-vet.json` and its images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmVetConfig {
    pub questions: PathBuf,
    pub images: Option<PathBuf>,
    /// Gradings per answer; default 5.
    pub runs: Option<usize>,
    pub judge_model: Option<String>,
    /// Default 1024.
    pub max_new_tokens: Option<usize>,
}

/// `[llava_bench]`: the llava-bench-in-the-wild files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlavaBenchConfig {
    pub questions: PathBuf,
    pub context: PathBuf,
    pub references: PathBuf,
    pub images: Option<PathBuf>,
    pub judge_model: Option<String>,
    pub max_new_tokens: Option<usize>,
}

/// `[mmhal]`: MMHal-Bench's `response_template.json` and its images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmHalConfig {
    pub questions: PathBuf,
    pub images: Option<PathBuf>,
    pub judge_model: Option<String>,
    pub max_new_tokens: Option<usize>,
}

/// A `suite.toml`. Relative paths are relative to the file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteConfig {
    /// Prompts per batch when the model answers; default 8.
    pub batch_size: Option<usize>,
    pub judge: Option<JudgeConfig>,
    pub pope: Option<PopeConfig>,
    pub object_halbench: Option<ObjectHalBenchConfig>,
    pub mmvet: Option<MmVetConfig>,
    pub llava_bench: Option<LlavaBenchConfig>,
    pub mmhal: Option<MmHalConfig>,
}

impl SuiteConfig {
    /// Reads and checks `path`: every value in its range (the same ranges as the command-line flags, an
    /// [`Error::Range`] naming the key), and every file and folder there, before anything runs.
    pub fn load(path: &Path) -> Result<SuiteConfig> {
        let text = crate::jsonl::read_text(path)?;
        let cfg: SuiteConfig = toml::from_str(&text).map_err(|e| Error::parse(path, None, one_line(&e)))?;
        cfg.checked(path)
    }

    /// A suite given as a table of another TOML file (`bpo loop`'s `[eval]`), checked as [`SuiteConfig::load`]
    /// checks a file; `path` is that file.
    pub fn from_table(table: toml::Table, path: &Path) -> Result<SuiteConfig> {
        let cfg: SuiteConfig = table.try_into().map_err(|e: toml::de::Error| Error::parse(path, None, one_line(&e)))?;
        cfg.checked(path)
    }

    /// `self` with its paths made relative to `path`'s folder, checked.
    fn checked(mut self, path: &Path) -> Result<SuiteConfig> {
        let cfg = &mut self;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        let none = cfg.pope.is_none()
            && cfg.object_halbench.is_none()
            && cfg.mmvet.is_none()
            && cfg.llava_bench.is_none()
            && cfg.mmhal.is_none();
        if none {
            return Err(Error::parse(
                path,
                None,
                "no benchmark configured ([pope], [object_halbench], [mmvet], [llava_bench], [mmhal])",
            ));
        }
        if let Some(p) = &cfg.pope {
            if p.questions.is_empty() {
                return Err(Error::parse(path, None, "[pope] questions is empty"));
            }
        }
        if let Some(o) = &cfg.object_halbench {
            if o.coco.is_none() == o.ground_truth.is_none() {
                return Err(Error::parse(path, None, "[object_halbench] needs exactly one of coco and ground_truth"));
            }
        }
        cfg.check_ranges(path)?;
        cfg.check_paths(path)?;
        Ok(self)
    }

    /// Every number against the range its command-line flag has.
    fn check_ranges(&self, path: &Path) -> Result<()> {
        let at = |key: &str| format!("{}: {key}", path.display());
        let count = |key: &str, v: Option<usize>| v.map_or(Ok(0), |v| range::check(&at(key), v, range::at_least_one));
        count("batch_size", self.batch_size)?;
        if let Some(j) = &self.judge {
            range::check(&at("[judge] concurrency"), j.concurrency, range::at_least_one)?;
            range::check(&at("[judge] backoff"), j.backoff, range::backoff)?;
            range::check(&at("[judge] timeout"), j.timeout, range::timeout)?;
        }
        if let Some(c) = &self.pope {
            count("[pope] max_new_tokens", c.max_new_tokens)?;
        }
        if let Some(c) = &self.object_halbench {
            count("[object_halbench] max_new_tokens", c.max_new_tokens)?;
            count("[object_halbench] limit", c.limit)?;
        }
        if let Some(c) = &self.mmvet {
            count("[mmvet] max_new_tokens", c.max_new_tokens)?;
            count("[mmvet] runs", c.runs)?;
        }
        if let Some(c) = &self.llava_bench {
            count("[llava_bench] max_new_tokens", c.max_new_tokens)?;
        }
        if let Some(c) = &self.mmhal {
            count("[mmhal] max_new_tokens", c.max_new_tokens)?;
        }
        Ok(())
    }

    /// Every file and folder the benchmarks name, each (`[section] key`) a file or a folder as it should be.
    fn check_paths(&self, path: &Path) -> Result<()> {
        for (key, p, folder) in self.paths() {
            let found = match std::fs::metadata(p) {
                Ok(m) if m.is_dir() == folder => continue,
                Ok(m) if m.is_dir() => "a folder, not a file".to_string(),
                Ok(_) => "not a folder".to_string(),
                Err(e) => e.to_string(),
            };
            return Err(Error::parse(path, None, format!("{key} {}: {found}", p.display())));
        }
        Ok(())
    }

    /// Every path of the configuration, as (`[section] key`, path, whether it is a folder).
    pub fn paths(&self) -> Vec<(String, &Path, bool)> {
        let mut all: Vec<(&str, &str, Option<&PathBuf>, bool)> = Vec::new();
        if let Some(c) = &self.pope {
            all.extend(c.questions.iter().map(|q| ("pope", "questions", Some(q), false)));
            all.push(("pope", "images", c.images.as_ref(), true));
        }
        if let Some(c) = &self.object_halbench {
            all.push(("object_halbench", "images", Some(&c.images), true));
            all.push(("object_halbench", "coco", c.coco.as_ref(), true));
            all.push(("object_halbench", "ground_truth", c.ground_truth.as_ref(), false));
        }
        if let Some(c) = &self.mmvet {
            all.extend([
                ("mmvet", "questions", Some(&c.questions), false),
                ("mmvet", "images", c.images.as_ref(), true),
            ]);
        }
        if let Some(c) = &self.llava_bench {
            all.push(("llava_bench", "questions", Some(&c.questions), false));
            all.push(("llava_bench", "context", Some(&c.context), false));
            all.push(("llava_bench", "references", Some(&c.references), false));
            all.push(("llava_bench", "images", c.images.as_ref(), true));
        }
        if let Some(c) = &self.mmhal {
            all.extend([
                ("mmhal", "questions", Some(&c.questions), false),
                ("mmhal", "images", c.images.as_ref(), true),
            ]);
        }
        all.into_iter()
            .filter_map(|(section, key, p, folder)| p.map(|p| (format!("[{section}] {key}"), p.as_path(), folder)))
            .collect()
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                fix(p);
            }
        };
        if let Some(c) = &mut self.pope {
            c.questions.iter_mut().for_each(fix);
            fix_opt(&mut c.images);
        }
        if let Some(c) = &mut self.object_halbench {
            fix(&mut c.images);
            fix_opt(&mut c.coco);
            fix_opt(&mut c.ground_truth);
        }
        if let Some(c) = &mut self.mmvet {
            fix(&mut c.questions);
            fix_opt(&mut c.images);
        }
        if let Some(c) = &mut self.llava_bench {
            [&mut c.questions, &mut c.context, &mut c.references].into_iter().for_each(fix);
            fix_opt(&mut c.images);
        }
        if let Some(c) = &mut self.mmhal {
            fix(&mut c.questions);
            fix_opt(&mut c.images);
        }
    }
}

/// TOML errors span several lines (a source excerpt): keep the first, which names line and column, and the
/// message.
fn one_line(e: &toml::de::Error) -> String {
    if e.span().is_none() {
        return e.message().trim().replace('\n', " ");
    }
    let text = e.to_string();
    let place = text.lines().next().unwrap_or_default().trim();
    format!("{place}: {}", e.message().trim().replace('\n', " "))
}

/// The benchmarks a suite can hold, in the order they run; the name is the run folder's.
pub const BENCHMARKS: [&str; 5] = ["pope", "object-halbench", "mmvet", "llava-bench", "mmhal"];

/// `suite.json`: what a suite folder evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteInfo {
    pub model: String,
    pub adapter: Option<String>,
    /// Run folders (benchmark names) present, in run order.
    pub benchmarks: Vec<String>,
}

/// The file name of a suite's description inside its folder.
pub const SUITE_FILE: &str = "suite.json";

/// Reads `dir/suite.json`, or `None` when `dir` is not a suite folder.
pub fn read_info(dir: &Path) -> Result<Option<SuiteInfo>> {
    let path = dir.join(SUITE_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::parse(&path, None, e))
}

/// The numbers of a benchmark worth a column (the papers' headline numbers), in display order.
pub fn headline(scores: &Scores) -> Vec<(String, f64)> {
    match scores {
        Scores::Pope(r) => {
            let mut out = Vec::new();
            for s in &r.splits {
                out.push((format!("POPE {} F1", s.split), 100.0 * s.metrics.f1));
                out.push((format!("POPE {} acc", s.split), 100.0 * s.metrics.accuracy));
            }
            out
        }
        Scores::Chair(r) => {
            vec![("ObjHal CHAIR_s".into(), 100.0 * r.chair_s), ("ObjHal CHAIR_i".into(), 100.0 * r.chair_i)]
        }
        Scores::MmVet(r) => vec![("MM-Vet".into(), r.total)],
        Scores::LlavaBench(r) => r
            .categories
            .iter()
            .filter(|c| c.category == "all")
            .map(|c| ("LLaVA-Bench".to_string(), c.relative))
            .collect(),
        Scores::MmHal(r) => {
            vec![("MMHal score".into(), r.average_score), ("MMHal hal. rate".into(), r.hallucination_rate)]
        }
    }
}

/// The headline numbers of a suite folder, benchmark by benchmark.
pub fn suite_headlines(dir: &Path) -> Result<Vec<(String, f64)>> {
    let info = read_info(dir)?
        .ok_or_else(|| Error::invalid(format!("{}: not a suite folder (no {SUITE_FILE})", dir.display())))?;
    let mut out = Vec::new();
    for name in &info.benchmarks {
        out.extend(headline(&read_scores(&dir.join(name))?));
    }
    Ok(out)
}

/// Suites side by side: one row per suite (named by its label), one column per headline number any of them
/// has ("-" where a suite lacks it). POPE and Object HalBench in percent, MM-Vet and LLaVA-Bench as their
/// official scores, MMHal-Bench's score (0-6) and hallucination rate (a fraction).
pub fn table(rows: &[(String, Vec<(String, f64)>)]) -> String {
    let mut columns: Vec<&str> = Vec::new();
    for (_, metrics) in rows {
        for (name, _) in metrics {
            if !columns.contains(&name.as_str()) {
                columns.push(name);
            }
        }
    }
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0).max(5);
    let widths: Vec<usize> = columns.iter().map(|c| c.len().max(6)).collect();
    let mut t = format!("{:<label_width$}", "model");
    for (c, w) in columns.iter().zip(&widths) {
        t.push_str(&format!("  {c:>w$}"));
    }
    for (label, metrics) in rows {
        t.push_str(&format!("\n{label:<label_width$}"));
        for (c, w) in columns.iter().zip(&widths) {
            let value = metrics.iter().find(|(n, _)| n == c).map_or("-".to_string(), |(_, v)| format!("{v:.2}"));
            t.push_str(&format!("  {value:>w$}"));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_paths_resolve_against_the_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.toml");
        std::fs::create_dir(dir.path().join("mm-vet")).unwrap();
        std::fs::write(dir.path().join("mm-vet/mm-vet.json"), "{}").unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let text = format!("[mmvet]\nquestions = \"mm-vet/mm-vet.json\"\nimages = \"{}\"\n", images.display());
        std::fs::write(&path, &text).unwrap();
        let cfg = SuiteConfig::load(&path).unwrap();
        let mmvet = cfg.mmvet.unwrap();
        assert_eq!(mmvet.questions, dir.path().join("mm-vet/mm-vet.json"));
        assert_eq!(mmvet.images, Some(images.clone()));
        std::fs::write(&path, "[mmvet]\nquestion = \"x\"\n").unwrap();
        let err = SuiteConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("suite.toml") && err.contains("question") && !err.contains('\n'), "{err}");
        std::fs::write(&path, "batch_size = 4\n").unwrap();
        assert!(SuiteConfig::load(&path).unwrap_err().to_string().contains("no benchmark"));
        // Every value against its flag's range (a usage error naming the key), every path before anything runs.
        let judge = "[judge]\nurl = \"http://127.0.0.1:9\"\nmodel = \"m\"\n";
        for (extra, needle) in [
            ("batch_size = 0\n", "batch_size = 0: must be at least 1"),
            (&format!("{judge}concurrency = 0\n"), "[judge] concurrency = 0: must be at least 1"),
            (&format!("{judge}backoff = 1e308\n"), "[judge] backoff = 1e308: must be a number of seconds in [0, 30]"),
            (&format!("{judge}backoff = nan\n"), "[judge] backoff = NaN"),
            (&format!("{judge}timeout = 0\n"), "[judge] timeout = 0: must be a whole number of seconds in [1, 86400]"),
        ] {
            std::fs::write(&path, format!("{extra}{text}")).unwrap();
            let err = SuiteConfig::load(&path).unwrap_err();
            assert!(matches!(err, Error::Range(_)) && err.to_string().contains(needle), "{extra}: {err}");
            assert!(err.to_string().contains("suite.toml"), "{err}");
        }
        for (key, needle) in [("runs = 0", "[mmvet] runs = 0"), ("max_new_tokens = 0", "[mmvet] max_new_tokens = 0")] {
            std::fs::write(&path, format!("{text}{key}\n")).unwrap();
            let err = SuiteConfig::load(&path).unwrap_err();
            assert!(matches!(err, Error::Range(_)) && err.to_string().contains(needle), "{key}: {err}");
        }
        let missing =
            "[mmvet]\nquestions = \"mm-vet/mm-vet.json\"\n\n[llava_bench]\nquestions = \"mm-vet/mm-vet.json\"\n\
                       context = \"nope.jsonl\"\nreferences = \"mm-vet\"\n";
        std::fs::write(&path, missing).unwrap();
        let err = SuiteConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("[llava_bench] context") && err.contains("nope.jsonl"), "{err}");
    }

    #[test]
    fn table_has_a_row_per_suite_and_a_dash_where_a_number_is_missing() {
        let rows = vec![
            ("base".to_string(), vec![("MM-Vet".to_string(), 31.7), ("LLaVA-Bench".to_string(), 65.4)]),
            ("bpo".to_string(), vec![("MM-Vet".to_string(), 36.8)]),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("MM-Vet") && lines[0].contains("LLaVA-Bench"));
        assert!(lines[1].starts_with("base") && lines[1].contains("31.70") && lines[1].contains("65.40"));
        assert!(lines[2].starts_with("bpo") && lines[2].contains("36.80") && lines[2].trim_end().ends_with('-'));
    }
}
