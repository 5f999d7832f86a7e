//! Run folders and tables: `scores.json` (the report, tagged with its `kind`) plus `details.jsonl` (one row
//! per scored question or caption), a terminal table for each kind, and a side-by-side comparison of two runs.
//! The judged benchmarks' reports ([`MmVetReport`], [`LlavaBenchReport`], [`MmHalReport`]) render their own
//! tables and metrics in their modules.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chair::ChairReport;
use super::llava_bench::LlavaBenchReport;
use super::mmhal::MmHalReport;
use super::mmvet::MmVetReport;
use super::pope::{PopeMetrics, PopeReport};
use crate::{jsonl, output, Error, Result};

/// The content of `scores.json`: `{"kind": "pope", ...}`, `"chair"`, `"mmvet"`, `"llava-bench"` or `"mmhal"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scores {
    Pope(PopeReport),
    Chair(ChairReport),
    #[serde(rename = "mmvet")]
    MmVet(MmVetReport),
    #[serde(rename = "llava-bench")]
    LlavaBench(LlavaBenchReport),
    #[serde(rename = "mmhal")]
    MmHal(MmHalReport),
}

/// The file name of a run's scores inside its folder.
pub const SCORES_FILE: &str = "scores.json";
/// The file name of a run's per-question / per-caption rows inside its folder.
pub const DETAILS_FILE: &str = "details.jsonl";

/// Writes `out/scores.json` and `out/details.jsonl`, creating `out` (through [`crate::output`]).
pub fn write_run<D: Serialize>(out: &Path, scores: &Scores, details: &[D]) -> Result<()> {
    output::create_dir(out)?;
    output::write_json(&out.join(SCORES_FILE), scores)?;
    jsonl::write(&out.join(DETAILS_FILE), details)
}

/// Reads a run's scores from its folder (or from a `scores.json` path).
pub fn read_scores(run: &Path) -> Result<Scores> {
    let path: PathBuf = if run.is_dir() { run.join(SCORES_FILE) } else { run.to_path_buf() };
    jsonl::read_json(&path)
}

/// One named number of a report; `percent` ones are fractions shown ×100.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub percent: bool,
}

fn metric(name: impl Into<String>, value: f64, percent: bool) -> Metric {
    Metric { name: name.into(), value, percent }
}

impl Scores {
    /// The numbers worth comparing, in display order.
    pub fn metrics(&self) -> Vec<Metric> {
        match self {
            Scores::Pope(r) => {
                let mut out = Vec::new();
                for s in &r.splits {
                    out.extend(pope_metrics(&s.split, &s.metrics));
                }
                out.extend(pope_metrics("overall", &r.overall));
                out.push(metric("unanswered", r.unanswered.count as f64, false));
                out.push(metric("orphan_answers", r.orphan_answers.count as f64, false));
                out
            }
            Scores::Chair(r) => vec![
                metric("CHAIR_s", r.chair_s, true),
                metric("CHAIR_i", r.chair_i, true),
                metric("response_hallucination", r.response_hallucination, true),
                metric("object_recall", r.object_recall, true),
                metric("avg_length", r.avg_length, false),
                metric("captions", r.captions as f64, false),
                metric("captions_with_objects", r.captions_with_objects as f64, false),
                metric("mentions", r.mentions as f64, false),
                metric("hallucinated_mentions", r.hallucinated_mentions as f64, false),
            ],
            Scores::MmVet(r) => plain(r.metrics()),
            Scores::LlavaBench(r) => plain(r.metrics()),
            Scores::MmHal(r) => plain(r.metrics()),
        }
    }

    /// The `kind` tag of `scores.json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scores::Pope(_) => "pope",
            Scores::Chair(_) => "chair",
            Scores::MmVet(_) => "mmvet",
            Scores::LlavaBench(_) => "llava-bench",
            Scores::MmHal(_) => "mmhal",
        }
    }

    /// The human-readable table printed after scoring.
    pub fn table(&self) -> String {
        match self {
            Scores::Pope(r) => pope_table(r),
            Scores::Chair(r) => chair_table(r),
            Scores::MmVet(r) => r.table(),
            Scores::LlavaBench(r) => r.table(),
            Scores::MmHal(r) => r.table(),
        }
    }

    /// What the scorer could not score cleanly (printed to stderr).
    pub fn warnings(&self) -> &[String] {
        match self {
            Scores::Pope(r) => &r.warnings,
            Scores::Chair(r) => &r.warnings,
            Scores::MmVet(r) => &r.warnings,
            Scores::LlavaBench(r) => &r.warnings,
            Scores::MmHal(r) => &r.warnings,
        }
    }
}

macro_rules! into_scores {
    ($($report:ty => $variant:ident),*) => {$(
        impl From<$report> for Scores {
            fn from(report: $report) -> Scores {
                Scores::$variant(report)
            }
        }
    )*};
}

into_scores!(
    PopeReport => Pope,
    ChairReport => Chair,
    MmVetReport => MmVet,
    LlavaBenchReport => LlavaBench,
    MmHalReport => MmHal
);

/// Metrics shown as they are (the judged benchmarks' reports hold the official, already scaled numbers).
fn plain(named: Vec<(String, f64)>) -> Vec<Metric> {
    named.into_iter().map(|(name, value)| metric(name, value, false)).collect()
}

fn pope_metrics(split: &str, m: &PopeMetrics) -> Vec<Metric> {
    vec![
        metric(format!("{split}/accuracy"), m.accuracy, true),
        metric(format!("{split}/precision"), m.precision, true),
        metric(format!("{split}/recall"), m.recall, true),
        metric(format!("{split}/f1"), m.f1, true),
        metric(format!("{split}/yes_ratio"), m.yes_ratio, true),
        metric(format!("{split}/n"), m.n as f64, false),
    ]
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

fn pope_table(r: &PopeReport) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "POPE (pairing {}; percentages)", r.pairing);
    let _ = writeln!(
        t,
        "{:<14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "split", "n", "accuracy", "precision", "recall", "F1", "yes-ratio"
    );
    let rows = r.splits.iter().map(|s| (s.split.as_str(), &s.metrics)).chain([("overall", &r.overall)]);
    for (name, m) in rows {
        let (a, p, rc, f, y) = (pct(m.accuracy), pct(m.precision), pct(m.recall), pct(m.f1), pct(m.yes_ratio));
        let _ = writeln!(t, "{name:<14} {:>6} {a:>9} {p:>9} {rc:>9} {f:>9} {y:>9}", m.n);
    }
    let _ = writeln!(t, "unanswered questions: {}{}", r.unanswered.count, sample(&r.unanswered.ids));
    let _ = write!(t, "answers without a question: {}{}", r.orphan_answers.count, sample(&r.orphan_answers.ids));
    if r.id_mismatches > 0 {
        let _ = write!(t, "\npairs with different question_ids: {}", r.id_mismatches);
    }
    t
}

/// " (ids: a, b, ... and N more)" for a non-empty list.
fn sample(ids: &[String]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let shown = ids.iter().take(10).map(String::as_str).collect::<Vec<_>>().join(", ");
    let more = if ids.len() > 10 { format!(" and {} more", ids.len() - 10) } else { String::new() };
    format!(" (ids: {shown}{more})")
}

fn chair_table(r: &ChairReport) -> String {
    let t = String::from("CHAIR / Object HalBench\n");
    let rows = [
        ("CHAIR_s (%)", pct(r.chair_s)),
        ("CHAIR_i (%)", pct(r.chair_i)),
        ("response hallucination (%)", pct(r.response_hallucination)),
        ("object recall (%)", pct(r.object_recall)),
        ("average length (words)", format!("{:.1}", r.avg_length)),
        (
            "captions",
            format!(
                "{} ({} mention objects, {} hallucinate)",
                r.captions, r.captions_with_objects, r.hallucinated_captions
            ),
        ),
        ("object mentions", format!("{} ({} hallucinated)", r.mentions, r.hallucinated_mentions)),
    ];
    let lines: Vec<String> = rows.iter().map(|(k, v)| format!("{k:<28} {v}")).collect();
    t + &lines.join("\n")
}

/// Two runs side by side: every metric of either, its value in each, and B − A. Errors when one run holds
/// POPE scores and the other CHAIR scores.
pub fn compare(a: &Scores, b: &Scores, a_name: &str, b_name: &str) -> Result<String> {
    if a.kind() != b.kind() {
        return Err(Error::invalid(format!(
            "cannot compare {a_name} ({} scores) with {b_name} ({} scores)",
            a.kind(),
            b.kind()
        )));
    }
    let (ma, mb) = (a.metrics(), b.metrics());
    let mut names: Vec<&str> = ma.iter().map(|m| m.name.as_str()).collect();
    for m in &mb {
        if !names.contains(&m.name.as_str()) {
            names.push(&m.name);
        }
    }
    let find = |ms: &[Metric], n: &str| ms.iter().find(|m| m.name == n).cloned();
    let mut t = String::new();
    let _ = writeln!(t, "{:<26} {:>12} {:>12} {:>10}", "metric", "A", "B", "B - A");
    for name in names {
        let (x, y) = (find(&ma, name), find(&mb, name));
        let percent = x.as_ref().or(y.as_ref()).is_some_and(|m| m.percent);
        let show = |m: &Option<Metric>| m.as_ref().map_or("-".to_string(), |m| shown(m.value, percent));
        let diff = match (&x, &y) {
            (Some(x), Some(y)) if percent => format!("{:+.2}", 100.0 * (y.value - x.value)),
            (Some(x), Some(y)) if (y.value - x.value).fract() == 0.0 => format!("{:+}", (y.value - x.value) as i64),
            (Some(x), Some(y)) => format!("{:+.2}", y.value - x.value),
            _ => "-".into(),
        };
        let label = if percent { format!("{name} (%)") } else { name.to_string() };
        let _ = writeln!(t, "{label:<26} {:>12} {:>12} {diff:>10}", show(&x), show(&y));
    }
    let _ = write!(t, "A = {a_name}\nB = {b_name}");
    Ok(t)
}

fn shown(value: f64, percent: bool) -> String {
    if percent {
        pct(value)
    } else if value.fract() == 0.0 {
        format!("{value}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::pope::{score, Label, Pairing, PopeQuestion};
    use crate::eval::Answer;

    fn pope_scores(answers: &[&str]) -> Scores {
        let qs: Vec<PopeQuestion> = ["yes", "no"]
            .iter()
            .enumerate()
            .map(|(i, l)| PopeQuestion {
                question_id: i.to_string(),
                image: String::new(),
                text: String::new(),
                label: if *l == "yes" { Label::Yes } else { Label::No },
                category: Some("random".into()),
                origin: None,
            })
            .collect();
        let ans: Vec<Answer> = answers.iter().enumerate().map(|(i, t)| Answer::new(i.to_string(), "", *t)).collect();
        Scores::Pope(score(&qs, &ans, Pairing::ById).unwrap().report)
    }

    #[test]
    fn run_folders_round_trip_and_compare() {
        let dir = tempfile::tempdir().unwrap();
        let a = pope_scores(&["Yes", "Yes"]);
        let b = pope_scores(&["Yes", "No"]);
        write_run::<u8>(dir.path(), &a, &[]).unwrap();
        assert_eq!(read_scores(dir.path()).unwrap(), a);
        let text = compare(&a, &b, "a", "b").unwrap();
        let acc = text.lines().find(|l| l.starts_with("random/accuracy")).unwrap();
        assert!(acc.contains("50.00") && acc.contains("100.00") && acc.contains("+50.00"), "{acc}");
    }

    #[test]
    fn pope_and_chair_runs_do_not_compare() {
        let chair = Scores::Chair(ChairReport {
            captions: 0,
            captions_with_objects: 0,
            hallucinated_captions: 0,
            mentions: 0,
            hallucinated_mentions: 0,
            chair_s: 0.0,
            chair_i: 0.0,
            response_hallucination: 0.0,
            object_recall: 0.0,
            recalled_objects: 0,
            ground_truth_objects: 0,
            avg_length: 0.0,
            warnings: vec![],
        });
        let json = serde_json::to_value(&chair).unwrap();
        assert_eq!(json["kind"], "chair");
        assert!(compare(&pope_scores(&["Yes", "No"]), &chair, "a", "b").is_err());
    }
}
