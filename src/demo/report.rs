//! The demo's results: a terminal table (mean ± spread over seeds) and a self-contained `report.html` (plots and
//! scene pictures inlined as base64 PNG, no scripts, no external files), which opens offline in any browser.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::eval::EvalScores;
use crate::Result;

/// One row of the results table: a model and its scores, one entry per seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub runs: Vec<EvalScores>,
}

/// A column of the results table.
pub struct Column {
    pub name: &'static str,
    /// Shown ×100.
    pub percent: bool,
    /// Lower is better (hallucination rates).
    pub lower_better: bool,
    pub get: fn(&EvalScores) -> f64,
}

/// The columns, CHAIR first; recall and caption length beside CHAIR, because CHAIR alone rewards saying less
/// (demo-world.md, lesson 6).
pub const COLUMNS: [Column; 10] = [
    Column { name: "CHAIR_i", percent: true, lower_better: true, get: |s| s.chair.chair_i },
    Column { name: "CHAIR_s", percent: true, lower_better: true, get: |s| s.chair.chair_s },
    Column { name: "recall", percent: true, lower_better: false, get: |s| s.chair.object_recall },
    Column { name: "obj/cap", percent: false, lower_better: false, get: |s| s.objects_per_caption },
    Column { name: "partner", percent: true, lower_better: true, get: |s| s.partner_hallucination },
    Column { name: "F1 rand", percent: true, lower_better: false, get: |s| s.pope_f1("random") },
    Column { name: "F1 pop", percent: true, lower_better: false, get: |s| s.pope_f1("popular") },
    Column { name: "F1 adv", percent: true, lower_better: false, get: |s| s.pope_f1("adversarial") },
    Column { name: "acc adv", percent: true, lower_better: false, get: |s| s.pope_accuracy("adversarial") },
    Column { name: "yes adv", percent: true, lower_better: false, get: |s| s.pope_yes_ratio("adversarial") },
];

/// Mean and sample standard deviation (0 for one value).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

impl Column {
    /// This column's value for each of a row's runs (seeds), in display units.
    pub fn values(&self, row: &Row) -> Vec<f64> {
        let scale = if self.percent { 100.0 } else { 1.0 };
        row.runs.iter().map(|s| (self.get)(s) * scale).collect()
    }

    /// Mean and spread of this column over a row's runs, in display units.
    pub fn stats(&self, row: &Row) -> (f64, f64) {
        mean_sd(&self.values(row))
    }

    fn cell(&self, row: &Row) -> String {
        let (m, s) = self.stats(row);
        let digits = if self.percent { 1 } else { 2 };
        if row.runs.len() > 1 {
            format!("{m:.digits$}±{s:.digits$}")
        } else {
            format!("{m:.digits$}")
        }
    }
}

/// The results as a terminal table.
pub fn table(rows: &[Row]) -> String {
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    let cells: Vec<Vec<String>> = rows.iter().map(|r| COLUMNS.iter().map(|c| c.cell(r)).collect()).collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.name.len()))
        .collect();
    let mut t = String::new();
    let _ = write!(t, "{:<name_w$}", "model");
    for (c, w) in COLUMNS.iter().zip(&widths) {
        let _ = write!(t, "  {:>w$}", c.name);
    }
    t.push('\n');
    for (r, row) in rows.iter().zip(&cells) {
        let _ = write!(t, "{:<name_w$}", r.name);
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(t, "  {cell:>w$}");
        }
        t.push('\n');
    }
    let seeds = rows.first().map_or(0, |r| r.runs.len());
    let _ = write!(t, "percentages; CHAIR_i/CHAIR_s/partner: lower is better; recall, obj/cap (objects per description) and POPE F1/accuracy: higher is better; {seeds} seed(s){}", if seeds > 1 { ", mean±sd" } else { "" });
    t
}

/// BPO's effect on one metric against a baseline row, paired by seed: the per-seed gain (positive = better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effect {
    pub mean: f64,
    pub sd: f64,
    pub seeds: usize,
}

impl Effect {
    /// `base[i]` and `treated[i]` come from seed `i`; `lower_better` flips the sign so that a gain is positive.
    pub fn paired(base: &[f64], treated: &[f64], lower_better: bool) -> Self {
        let sign = if lower_better { -1.0 } else { 1.0 };
        let gains: Vec<f64> = base.iter().zip(treated).map(|(b, t)| sign * (t - b)).collect();
        let (mean, sd) = mean_sd(&gains);
        Effect { mean, sd, seeds: gains.len() }
    }

    /// The acceptance line: a gain larger than its seed-to-seed spread (needs at least two seeds).
    pub fn shown(&self) -> bool {
        self.seeds > 1 && self.mean > 0.0 && self.mean > self.sd
    }
}

/// The columns the demo's claim is about: CHAIR_i and POPE-adversarial F1.
const CLAIM: [&str; 2] = ["CHAIR_i", "F1 adv"];

/// Whether the table shows BPO's effect: for each baseline row named in `baselines`, BPO's paired gain on CHAIR_i and
/// POPE-adversarial F1 (points, mean ± sd over seeds) and a verdict. Rows missing from `rows` are skipped.
pub fn verdict(rows: &[Row], bpo: &str, baselines: &[&str]) -> String {
    let Some(treated) = rows.iter().find(|r| r.name == bpo) else { return String::new() };
    let mut t = String::new();
    for base in baselines.iter().filter_map(|b| rows.iter().find(|r| r.name == *b)) {
        let _ = write!(t, "{bpo} vs {}:", base.name);
        for c in COLUMNS.iter().filter(|c| CLAIM.contains(&c.name)) {
            let e = Effect::paired(&c.values(base), &c.values(treated), c.lower_better);
            let verdict = match (e.seeds, e.shown()) {
                (0 | 1, _) => "one seed, no spread",
                (_, true) => "shown",
                (_, false) => "not shown",
            };
            let _ = write!(t, "  {} gain {:+.2}±{:.2} ({verdict})", c.name, e.mean, e.sd);
        }
        t.push('\n');
    }
    if !t.is_empty() {
        t.push_str("gain: improvement in points (CHAIR_i down, F1 up), per seed against the same seed's baseline, mean±sd; shown = mean gain above its sd");
    }
    t
}

/// A picture in the report: PNG bytes, the file it was also written to (relative to the report), a caption.
#[derive(Debug, Clone)]
pub struct Figure {
    pub file: String,
    pub caption: String,
    pub png: Vec<u8>,
}

/// One scene of the gallery: pictures side by side, then labelled lines of text.
#[derive(Debug, Clone, Default)]
pub struct GalleryItem {
    pub title: String,
    pub images: Vec<(String, Vec<u8>)>,
    /// (label, text, css class: "", "good" or "bad").
    pub lines: Vec<(String, String, String)>,
}

/// Everything `report.html` shows.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub title: String,
    pub intro: String,
    pub rows: Vec<Row>,
    /// [`verdict`]'s lines, shown under the table.
    pub verdict: String,
    pub figures: Vec<Figure>,
    /// Sections of the gallery: heading, explanation, items.
    pub gallery: Vec<(String, String, Vec<GalleryItem>)>,
    /// Settings and facts shown at the end (key, value).
    pub facts: Vec<(String, String)>,
}

/// Writes `report.html` (self-contained) to `path`.
pub fn write_html(path: &Path, r: &Report) -> Result<()> {
    let mut h = String::new();
    let _ = write!(h, "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>", esc(&r.title));
    let _ = write!(h, "<h1>{}</h1><p class=\"intro\">{}</p>", esc(&r.title), esc(&r.intro));
    h.push_str("<h2>Results</h2>");
    h.push_str(&html_table(&r.rows));
    if !r.verdict.is_empty() {
        let _ = write!(h, "<pre class=\"verdict\">{}</pre>", esc(&r.verdict));
    }
    h.push_str("<h2>Training and metrics</h2><div class=\"figs\">");
    for f in &r.figures {
        let _ = write!(h, "<figure><img src=\"data:image/png;base64,{}\" data-file=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>", base64(&f.png), esc(&f.file), esc(&f.caption), esc(&f.caption));
    }
    h.push_str("</div>");
    for (heading, text, items) in &r.gallery {
        let _ = write!(h, "<h2>{}</h2><p>{}</p><div class=\"gallery\">", esc(heading), esc(text));
        for item in items {
            h.push_str(&gallery_item(item));
        }
        h.push_str("</div>");
    }
    h.push_str("<h2>Settings</h2><table class=\"facts\">");
    for (k, v) in &r.facts {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table></body></html>\n");
    crate::output::write_bytes(path, h.as_bytes())
}

fn html_table(rows: &[Row]) -> String {
    let mut h = String::from("<table class=\"results\"><tr><th>model</th>");
    for c in &COLUMNS {
        let _ = write!(h, "<th>{}{}</th>", esc(c.name), if c.lower_better { " ↓" } else { " ↑" });
    }
    h.push_str("</tr>");
    for r in rows {
        let _ = write!(h, "<tr><td>{}</td>", esc(&r.name));
        for c in &COLUMNS {
            let _ = write!(h, "<td>{}</td>", esc(&c.cell(r)));
        }
        h.push_str("</tr>");
    }
    let seeds = rows.first().map_or(0, |r| r.runs.len());
    let _ = write!(h, "</table><p class=\"note\">Percentages. {seeds} seed(s){}. partner = share of descriptions naming an absent partner of a present object (the prior at work); obj/cap = objects named per description; POPE yes adv = share of yes answers on the adversarial split.</p>", if seeds > 1 { ", mean ± standard deviation" } else { "" });
    h
}

fn gallery_item(item: &GalleryItem) -> String {
    let mut h = format!("<div class=\"item\"><h3>{}</h3><div class=\"pics\">", esc(&item.title));
    for (caption, png) in &item.images {
        let _ = write!(h, "<figure><img class=\"scene\" src=\"data:image/png;base64,{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>", base64(png), esc(caption), esc(caption));
    }
    h.push_str("</div><table>");
    for (label, text, class) in &item.lines {
        let _ = write!(h, "<tr class=\"{}\"><th>{}</th><td>{}</td></tr>", esc(class), esc(label), esc(text));
    }
    h.push_str("</table></div>");
    h
}

const CSS: &str = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}p.intro{max-width:60em;line-height:1.4}\
table.results{border-collapse:collapse}table.results td,table.results th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
table.results td:first-child{text-align:left;font-weight:bold}.note{color:#555;font-size:.9em}pre.verdict{background:#f6f6f6;padding:8px;white-space:pre-wrap}\
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs figure{margin:0}.figs img{width:480px;border:1px solid #eee}\
figcaption{font-size:.85em;color:#555;text-align:center}.gallery{display:flex;flex-wrap:wrap;gap:16px}\
.item{border:1px solid #ddd;border-radius:6px;padding:8px;width:360px}.item h3{margin:.2em 0;font-size:1em}\
.pics{display:flex;gap:8px}.pics figure{margin:0}img.scene{width:144px;height:144px;image-rendering:pixelated}\
.item table{font-size:.85em;border-collapse:collapse;margin-top:6px}.item th{text-align:left;vertical-align:top;padding-right:6px;white-space:nowrap}\
tr.good td{color:#0a6b2d}tr.bad td{color:#b3261e}table.facts th{text-align:left;padding-right:12px}";

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Standard base64 with padding (RFC 4648).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_effect_needs_a_gain_above_its_spread() {
        // CHAIR_i (lower is better) down by 2, 3 and 4 points: gain 3 ± 1, shown.
        let e = Effect::paired(&[10.0, 20.0, 5.0], &[8.0, 17.0, 1.0], true);
        assert!((e.mean - 3.0).abs() < 1e-12 && (e.sd - 1.0).abs() < 1e-12 && e.shown());
        // Mixed signs: mean 0.33, sd 2.5: not shown, however large the rows' own spread.
        assert!(!Effect::paired(&[90.0, 95.0, 97.0], &[92.0, 92.0, 98.0], false).shown());
        // A worse model is never an effect; one seed has no spread to beat.
        assert!(!Effect::paired(&[1.0, 2.0], &[3.0, 4.0], true).shown());
        assert!(!Effect::paired(&[10.0], &[1.0], true).shown());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(mean_sd(&[]), (0.0, 0.0));
        assert_eq!(mean_sd(&[2.0]), (2.0, 0.0));
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn html_is_escaped_and_self_contained() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Report {
            title: "a <b>".into(),
            verdict: "BPO vs SFT: x>y".into(),
            figures: vec![Figure { file: "plots/x.png".into(), caption: "x".into(), png: vec![1, 2, 3] }],
            gallery: vec![(
                "g".into(),
                "t".into(),
                vec![GalleryItem {
                    title: "s".into(),
                    images: vec![("img".into(), vec![0])],
                    lines: vec![("GT".into(), "a & b".into(), "good".into())],
                }],
            )],
            ..Default::default()
        };
        let path = tmp.path().join("r.html");
        write_html(&path, &r).unwrap();
        let h = std::fs::read_to_string(&path).unwrap();
        assert!(
            h.contains("a &lt;b&gt;")
                && h.contains("a &amp; b")
                && h.contains("<pre class=\"verdict\">BPO vs SFT: x&gt;y</pre>")
        );
        assert!(h.contains("data-file=\"plots/x.png\"") && h.contains("base64,AQID"));
        assert!(!h.contains("src=\"http") && !h.contains("<script"));
    }
}
