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

/// The columns. The prior's own metrics lead: `partner` (descriptions naming an absent partner of a present object)
/// and POPE-adversarial F1 (whose absent objects are the partners); CHAIR, recall and caption length stay beside
/// them, because CHAIR alone rewards saying less (demo-world.md, lesson 6).
pub const COLUMNS: [Column; 10] = [
    Column { name: "partner", percent: true, lower_better: true, get: |s| s.partner_hallucination },
    Column { name: "F1 adv", percent: true, lower_better: false, get: |s| s.pope_f1("adversarial") },
    Column { name: "CHAIR_i", percent: true, lower_better: true, get: |s| s.chair.chair_i },
    Column { name: "CHAIR_s", percent: true, lower_better: true, get: |s| s.chair.chair_s },
    Column { name: "recall", percent: true, lower_better: false, get: |s| s.chair.object_recall },
    Column { name: "obj/cap", percent: false, lower_better: false, get: |s| s.objects_per_caption },
    Column { name: "F1 rand", percent: true, lower_better: false, get: |s| s.pope_f1("random") },
    Column { name: "F1 pop", percent: true, lower_better: false, get: |s| s.pope_f1("popular") },
    Column { name: "acc adv", percent: true, lower_better: false, get: |s| s.pope_accuracy("adversarial") },
    Column { name: "yes adv", percent: true, lower_better: false, get: |s| s.pope_yes_ratio("adversarial") },
];

/// The column named `name`.
pub fn column(name: &str) -> &'static Column {
    COLUMNS.iter().find(|c| c.name == name).unwrap_or(&COLUMNS[0])
}

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
    let _ = write!(t, "percentages; partner (descriptions naming an absent partner) and CHAIR_i/CHAIR_s: lower is better; POPE F1/accuracy, recall and obj/cap (objects per description): higher is better; {seeds} seed(s){}", if seeds > 1 { ", mean±sd" } else { "" });
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

/// The row names [`acceptance`] compares.
pub struct Roles<'a> {
    pub sft: &'a str,
    pub control: &'a str,
    pub bpo: &'a str,
    /// BPO with each kind of negative alone.
    pub halves: &'a [&'a str],
}

/// One line of [`acceptance`]: what was checked, with the numbers, and whether it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub text: String,
    pub holds: bool,
}

/// The demo's claims, checked on the rows (paired by seed; "shown" = a mean gain above its sd, [`Effect::shown`]):
/// BPO lowers the partner rate against the SFT model and the control (shown, both); raises POPE-adversarial F1
/// against the SFT model (shown) and is not below the control by more than 0.5 points; lowers CHAIR_i against the
/// SFT model (shown) and is not above the control on average; keeps recall within 3 points and objects per
/// description within 10% of the SFT model's; and each kind of negative alone does worse than BPO on the partner
/// rate or on CHAIR_i. Empty when a row is missing.
pub fn acceptance(rows: &[Row], roles: &Roles) -> Vec<Check> {
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    let (Some(sft), Some(control), Some(bpo)) = (row(roles.sft), row(roles.control), row(roles.bpo)) else {
        return Vec::new();
    };
    let gain = |col: &str, base: &Row, treated: &Row| {
        let c = column(col);
        Effect::paired(&c.values(base), &c.values(treated), c.lower_better)
    };
    let shown = |e: &Effect| match (e.seeds, e.shown()) {
        (0 | 1, _) => "one seed: no spread",
        (_, true) => "shown",
        (_, false) => "not shown",
    };
    let mut out = Vec::new();
    let mut check = |holds: bool, text: String| out.push(Check { text, holds });
    let (a, b) = (gain("partner", sft, bpo), gain("partner", control, bpo));
    check(
        a.shown() && b.shown(),
        format!(
            "partner: gain vs {} {:+.1}±{:.1} ({}), vs {} {:+.1}±{:.1} ({})",
            sft.name,
            a.mean,
            a.sd,
            shown(&a),
            control.name,
            b.mean,
            b.sd,
            shown(&b)
        ),
    );
    for (col, slack, digits) in [("F1 adv", -0.5, 2), ("CHAIR_i", 0.0, 2)] {
        let (a, b) = (gain(col, sft, bpo), gain(col, control, bpo));
        check(
            a.shown() && b.mean >= slack,
            format!(
                "{col}: gain vs {} {:+.digits$}±{:.digits$} ({}), vs {} {:+.digits$}±{:.digits$} (at least {slack:.1} on average)",
                sft.name,
                a.mean,
                a.sd,
                shown(&a),
                control.name,
                b.mean,
                b.sd
            ),
        );
    }
    let mean = |col: &str, r: &Row| column(col).stats(r).0;
    let recall = mean("recall", bpo) - mean("recall", sft);
    let objects = match (mean("obj/cap", sft), mean("obj/cap", bpo)) {
        (base, treated) if base > 0.0 => 100.0 * (treated / base - 1.0),
        (_, treated) if treated > 0.0 => f64::INFINITY,
        _ => 0.0,
    };
    check(
        recall.abs() <= 3.0 && objects.abs() <= 10.0,
        format!(
            "recall {recall:+.1} points (within 3), objects per description {objects:+.1}% (within 10%), {} against {}",
            bpo.name, sft.name
        ),
    );
    for half in roles.halves.iter().filter_map(|h| row(h)) {
        let (p, c) = (mean("partner", half) - mean("partner", bpo), mean("CHAIR_i", half) - mean("CHAIR_i", bpo));
        check(
            p > 0.0 || c > 0.0,
            format!("{} does worse than {}: partner {p:+.1}, CHAIR_i {c:+.1} (one above 0)", half.name, bpo.name),
        );
    }
    out
}

/// [`acceptance`] as text: one line per check, `holds` or `FAILS` first, then a legend.
pub fn acceptance_text(checks: &[Check]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    let mut t = String::from("acceptance, paired by seed:\n");
    for c in checks {
        let _ = writeln!(t, "  {}  {}", if c.holds { "holds" } else { "FAILS" }, c.text);
    }
    t.push_str("gain: improvement in points (partner and CHAIR_i down, F1 up) against the same seed's row, mean±sd; shown = mean gain above its sd");
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
    /// [`acceptance_text`], shown under the table.
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

    fn scores(partner: f64, f1: f64, chair_i: f64, recall: f64, objects: f64) -> EvalScores {
        let metrics = serde_json::json!({"n": 1, "tp": 0, "fp": 0, "tn": 0, "fn": 0, "accuracy": f1, "precision": f1, "recall": f1, "f1": f1, "yes_ratio": 0.5});
        let ids = serde_json::json!({"count": 0, "ids": []});
        serde_json::from_value(serde_json::json!({
            "pope": {"pairing": "by_id", "splits": [{"split": "adversarial", "n": 1, "tp": 0, "fp": 0, "tn": 0, "fn": 0, "accuracy": f1, "precision": f1, "recall": f1, "f1": f1, "yes_ratio": 0.5}], "overall": metrics, "unanswered": ids, "orphan_answers": ids, "id_mismatches": 0, "warnings": []},
            "chair": {"captions": 1, "captions_with_objects": 1, "hallucinated_captions": 0, "mentions": 1, "hallucinated_mentions": 0, "chair_s": 0.0, "chair_i": chair_i, "response_hallucination": 0.0, "object_recall": recall, "recalled_objects": 1, "ground_truth_objects": 1, "avg_length": 1.0, "warnings": []},
            "objects_per_caption": objects,
            "partner_hallucination": partner,
        }))
        .unwrap()
    }

    #[test]
    fn acceptance_checks_each_claim_with_its_numbers() {
        let row = |name: &str, runs: Vec<EvalScores>| Row { name: name.into(), runs };
        let roles = Roles { sft: "SFT", control: "C", bpo: "BPO", halves: &["W", "I"] };
        let sft = vec![scores(0.80, 0.90, 0.20, 0.99, 4.3), scores(0.70, 0.85, 0.18, 0.98, 4.2)];
        let control = vec![scores(0.60, 0.97, 0.14, 0.99, 4.1), scores(0.50, 0.96, 0.12, 0.98, 4.0)];
        let bpo = vec![scores(0.50, 0.975, 0.12, 0.985, 4.0), scores(0.42, 0.962, 0.11, 0.975, 3.9)];
        let weak = vec![scores(0.55, 0.97, 0.12, 0.99, 4.0), scores(0.45, 0.96, 0.11, 0.98, 3.9)];
        let rows = vec![row("SFT", sft), row("C", control), row("BPO", bpo.clone()), row("W", weak), row("I", bpo)];
        let checks = acceptance(&rows, &roles);
        assert_eq!(checks.len(), 6);
        let holds: Vec<bool> = checks.iter().map(|c| c.holds).collect();
        // The injection-only row equals BPO: no worse on either metric.
        assert_eq!(holds, [true, true, true, true, true, false], "{checks:#?}");
        assert!(checks[0].text.contains("vs SFT +29.0±1.4 (shown)"), "{}", checks[0].text);
        assert!(checks[4].text.contains("W does worse than BPO: partner +4.0, CHAIR_i +0.0"), "{}", checks[4].text);
        let text = acceptance_text(&checks);
        assert_eq!(text.lines().filter(|l| l.starts_with("  holds")).count(), 5, "{text}");
        assert!(text.lines().any(|l| l.starts_with("  FAILS  I does worse")), "{text}");
        // Saying less fails the length line; one seed shows nothing.
        let short = vec![
            row("SFT", vec![scores(0.8, 0.9, 0.2, 0.99, 4.3)]),
            row("C", vec![scores(0.6, 0.9, 0.2, 0.99, 4.3)]),
            row("BPO", vec![scores(0.1, 0.95, 0.05, 0.95, 3.5)]),
        ];
        let checks = acceptance(&short, &roles);
        assert!(!checks[0].holds && checks[0].text.contains("one seed: no spread"), "{checks:#?}");
        assert!(!checks[3].holds && checks[3].text.contains("-18.6%"), "{}", checks[3].text);
        assert!(acceptance(&short[..2], &roles).is_empty());
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
