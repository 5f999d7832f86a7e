//! `bpo demo --quick` end to end through the binary: every stage leaves its files, the report references every
//! plot and inlines every picture, and a second run reuses the cached SFT model.

use std::path::Path;

use crate::util::{bpo, s};

fn sft_models(out: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(out.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("sft-"))
        .collect();
    v.sort();
    v
}

#[test]
fn quick_demo_runs_every_stage_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = bpo(&["demo", "--quick", "--quiet", "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let rows = ["SFT", "SFT on chosen", "BPO weakening only", "BPO injection only", "BPO"];
    for row in rows.iter().chain(&["BPO, round 2", "BPO + image-side preference"]) {
        assert!(stdout.lines().any(|l| l.starts_with(row)), "table row {row:?} missing:\n{stdout}");
    }
    assert!(stdout.contains("CHAIR_i") && stdout.contains("F1 adv"));

    // Every stage's files.
    let seed = out.join("seed-0");
    let world = seed.join("world");
    for f in [
        "world.json",
        "corpus.json",
        "train.json",
        "train_scenes.jsonl",
        "eval_scenes.jsonl",
        "eval/describe.jsonl",
        "eval/chair_ground_truth.jsonl",
        "eval/synonyms.txt",
        "tokenizer/tokenizer.json",
        "images/train/000000.png",
        "images/eval/000000.png",
    ] {
        assert!(world.join(f).exists(), "world file {f} missing");
    }
    for split in ["random", "popular", "adversarial"] {
        assert!(world.join(format!("eval/world_pope_{split}.jsonl")).exists());
    }
    let models = sft_models(&out);
    assert_eq!(models.len(), 1, "{models:?}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "metrics.jsonl",
        "lm_metrics.jsonl",
        "recipe.json",
    ] {
        assert!(models[0].join(f).exists(), "SFT model file {f} missing");
    }
    for f in [
        "records_raw.jsonl",
        "records.jsonl",
        "pairs_bpo.jsonl",
        "pairs_weaken.jsonl",
        "pairs_inject.jsonl",
        "chosen.json",
    ] {
        assert!(seed.join("bootstrap").join(f).exists(), "bootstrap file {f} missing");
    }
    for run in ["sft-chosen", "weaken", "inject", "bpo", "bpo-round-2", "bpo-mdpo"] {
        for f in [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/metrics.jsonl",
            "adapter/train_config.json",
            "model/model.safetensors",
            "model/config.json",
            "model/tokenizer.json",
        ] {
            assert!(seed.join("runs").join(run).join(f).exists(), "run {run}: {f} missing");
        }
    }
    for row in ["sft", "sft-chosen", "weaken", "inject", "bpo", "bpo-round-2", "bpo-mdpo"] {
        for f in [
            "pope/answers.jsonl",
            "pope/scores.json",
            "pope/details.jsonl",
            "chair/answers.jsonl",
            "chair/scores.json",
            "chair/details.jsonl",
        ] {
            assert!(seed.join("eval").join(row).join(f).exists(), "eval {row}: {f} missing");
        }
    }
    // The SFT model is an ordinary llava-hf folder: other commands load it.
    let image = world.join("images/eval/000000.png");
    let o = bpo(&[
        "generate",
        "--model",
        s(&models[0]),
        "--template",
        "llava-hf",
        "--image",
        s(&image),
        "--prompt",
        "describe the image .",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The evaluations are ordinary `bpo eval` run folders.
    let o = bpo(&["eval", "compare", s(&seed.join("eval/sft/pope")), s(&seed.join("eval/bpo/pope"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The report references every plot and inlines every picture.
    let report = out.join("report");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    let plots: Vec<String> = std::fs::read_dir(report.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(plots.len() >= 6, "{plots:?}");
    for p in &plots {
        assert!(p.ends_with(".png"));
        assert!(html.contains(&format!("data-file=\"plots/{p}\"")), "report.html does not reference {p}");
    }
    let inlined = html.matches("src=\"data:image/png;base64,").count();
    assert!(inlined >= plots.len() + 2, "only {inlined} inline pictures");
    assert!(!html.contains("src=\"http") && !html.contains("src=\"plots/"), "the report must be self-contained");
    assert!(html.contains("What BPO trains on") && html.contains("What changed"));
    assert!(report.join("table.txt").exists() && report.join("results.json").exists());

    // A second run reuses the SFT model.
    let stamp = std::fs::metadata(models[0].join("model.safetensors")).unwrap().modified().unwrap();
    let o = bpo(&["demo", "--quick", "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("SFT model cached"));
    assert_eq!(sft_models(&out), models);
    assert_eq!(std::fs::metadata(models[0].join("model.safetensors")).unwrap().modified().unwrap(), stamp);
}

#[test]
fn two_seeds_give_mean_and_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    // Two seeds side by side (`--jobs 2`) or one after the other: the same table.
    let run = |jobs: &str, dir: &Path| {
        let args = ["--threads", "1", "demo", "--quick", "--quiet", "--seeds", "2", "--seed", "7", "--jobs", jobs];
        bpo(&[&args[..], &["--out", s(dir)]].concat())
    };
    let o = run("2", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("seed-7").exists() && out.join("seed-8").exists());
    let serial = tmp.path().join("serial");
    let one = run("1", &serial);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    assert_eq!(
        String::from_utf8_lossy(&one.stdout).replace(s(&serial), ""),
        String::from_utf8_lossy(&o.stdout).replace(s(&out), "")
    );
    assert_eq!(sft_models(&out).len(), 2);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("±") && stdout.contains("2 seed(s), mean±sd"), "{stdout}");
    // The acceptance checks under the table, paired by seed: each claim once, with its verdict.
    assert!(stdout.contains("acceptance, paired by seed:"), "{stdout}");
    for claim in [
        "partner: gain vs SFT ",
        "F1 adv: gain vs SFT ",
        "CHAIR_i: gain vs SFT ",
        "points (within 3), objects per description",
        "BPO weakening only does worse than BPO",
        "BPO injection only does worse than BPO",
    ] {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(claim)).collect();
        assert_eq!(lines.len(), 1, "{claim:?}:\n{stdout}");
        assert!(lines[0].starts_with("  holds  ") || lines[0].starts_with("  FAILS  "), "{}", lines[0]);
    }
    assert!(stdout.contains("vs SFT on chosen"), "{stdout}");
}

/// The rows of the table `bpo demo` prints: (model, the 10 cells).
fn table(stdout: &str) -> Vec<(String, Vec<String>)> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("model "))
        .skip(1)
        .take_while(|l| !l.starts_with("percentages"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let (name, cells) = words.split_at(words.len().saturating_sub(10));
            (name.join(" "), cells.iter().map(|c| c.to_string()).collect())
        })
        .collect()
}

#[test]
fn the_rows_past_the_paper_come_after_the_others_and_leave_them_as_they_were() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &Path, extra: &[&str]| {
        let o = bpo(&[&["demo", "--quick", "--quiet", "--out", s(dir)][..], extra].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).replace(s(dir), "OUT")
    };
    let (plain, past) = (tmp.path().join("plain"), tmp.path().join("past"));
    let without = run(&plain, &["--paper-only"]);
    let with = run(&past, &[]);
    let new_rows = ["BPO, round 2", "BPO + image-side preference"];
    for row in new_rows {
        assert!(!without.contains(row), "{row:?} without the flag:\n{without}");
    }
    assert!(!without.contains("past the paper"), "{without}");

    // The paper's rows print as they did (the new names widen the first column), and their evaluations are the same
    // files byte for byte.
    let (a, b) = (table(&without), table(&with));
    let names = |t: &[(String, Vec<String>)]| t.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), ["SFT", "SFT on chosen", "BPO weakening only", "BPO injection only", "BPO"], "{without}");
    assert_eq!(names(&b)[..5], names(&a)[..], "{with}");
    assert_eq!(b[..5], a[..], "{with}");
    for row in ["sft", "sft-chosen", "weaken", "inject", "bpo"] {
        for f in ["pope/scores.json", "chair/scores.json"] {
            let read = |out: &Path| std::fs::read(out.join("seed-0/eval").join(row).join(f)).unwrap();
            assert_eq!(read(&plain), read(&past), "{row}/{f}");
        }
    }

    let claims = |out: &str| {
        out.lines()
            .filter(|l| l.starts_with("  holds") || l.starts_with("  FAILS"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert!(!claims(&without).is_empty(), "{without}");
    assert_eq!(claims(&with), claims(&without));
    let recipe = |extra: &[&str]| {
        let o = bpo(&[&["demo", "--quick", "--print-recipe"][..], extra].concat());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(recipe(&[]).contains("past_the_paper") && !recipe(&["--paper-only"]).contains("past_the_paper"));

    // Both new rows, with finite numbers in every column, and their gains against SFT and BPO.
    assert_eq!(names(&b)[5..], new_rows, "{with}");
    for (row, cells) in &b[5..] {
        assert!(cells.iter().all(|c| c.parse::<f64>().unwrap().is_finite()), "{row}: {cells:?}");
        for base in ["SFT", "BPO"] {
            let gains = with.lines().find(|l| l.trim_start().starts_with(&format!("{row} vs {base}: partner ")));
            let gains = gains.unwrap_or_else(|| panic!("gains of {row:?} against {base} missing:\n{with}"));
            assert!(!gains.contains("NaN"), "{gains}");
        }
    }
    let seed = past.join("seed-0");
    assert!(seed.join("bootstrap-round-2/pairs_bpo.jsonl").exists());
    let config = std::fs::read_to_string(seed.join("runs/bpo-mdpo/adapter/train_config.json")).unwrap();
    assert!(config.contains("conditional_weight"), "{config}");
    let round2 = std::fs::read_to_string(seed.join("runs/bpo-round-2/adapter/train_config.json")).unwrap();
    assert!(round2.contains("runs/bpo/model") && !round2.contains("conditional_weight"), "{round2}");
    for row in ["bpo-round-2", "bpo-mdpo"] {
        assert!(seed.join("eval").join(row).join("chair/scores.json").exists(), "{row}");
    }
    let html = std::fs::read_to_string(past.join("report/report.html")).unwrap();
    assert!(new_rows.iter().all(|r| html.contains(r)), "report.html lacks the new rows");
}
