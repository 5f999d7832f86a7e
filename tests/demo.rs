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
    for row in ["SFT", "SFT on chosen", "BPO weakening only", "BPO injection only", "BPO"] {
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
    for run in ["sft-chosen", "weaken", "inject", "bpo"] {
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
    for row in ["sft", "sft-chosen", "weaken", "inject", "bpo"] {
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
    // The acceptance check, paired by seed, against the SFT model and the control.
    for base in ["BPO vs SFT:", "BPO vs SFT on chosen:"] {
        let line = stdout.lines().find(|l| l.starts_with(base)).unwrap_or_else(|| panic!("{base} missing:\n{stdout}"));
        assert!(line.contains("CHAIR_i gain") && line.contains("F1 adv gain") && line.contains("shown"), "{line}");
    }
}
