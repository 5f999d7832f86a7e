//! DPO and supervised training on the tiny fixture model: parity with TRL + peft (fixtures made by
//! `scripts/make_dpo_fixtures.py`), the policy = reference identity, overfitting, resuming, merging, adapters on
//! the command line, and bad data.

use std::path::{Path, PathBuf};

use bpo::model::lora::LoraConfig;
use bpo::model::{load, Inputs, LoadOptions, Pass};
use bpo::progress::{Event, Recorder};
use bpo::text::{PromptStyle, Template};
use bpo::train::dpo::{self, DpoConfig};
use bpo::train::trainer::{Hooks, LoopConfig, Silent, StepLog};
use bpo::train::{ModelSetup, ScheduleKind};
use bpo::vision::AspectMode;
use serde_json::Value;

use crate::util::{bpo, fails_with, fixture, on_tiny, s};

fn trl_reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("dpo/trl-reference.json")).unwrap()).unwrap()
}

pub fn lora(rank: usize, alpha: f64, dropout: f32) -> LoraConfig {
    LoraConfig { rank, alpha, dropout, targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec() }
}

/// TRL's settings of the parity fixture (the same as `bpo bench parity`'s); tests change what they need.
pub fn config(data: PathBuf) -> DpoConfig {
    DpoConfig { data, ..bpo::device_check::trl_parity_config(&fixture(""), Default::default()) }
}

/// Collects every step's log; stops (like SIGINT) after `stop_after` steps if set.
#[derive(Default)]
pub struct Record {
    pub logs: Vec<StepLog>,
    pub stop_after: Option<usize>,
}

impl Hooks for Record {
    fn on_step(&mut self, log: &StepLog) -> bool {
        self.logs.push(log.clone());
        self.stop_after != Some(log.step)
    }
}

pub fn run(cfg: &DpoConfig, out: &Path, resume: bool, hooks: &mut dyn Hooks) -> (dpo::TrainReport, Vec<String>) {
    let said = Recorder::default();
    let report = dpo::train(cfg, out, resume, None, hooks, &said).unwrap();
    (report, said.messages())
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: bpo {got}, TRL {want}");
}

#[test]
fn trl_style_tokens_match_trls_vision_collator() {
    let r = trl_reference();
    let vlm = prepared_vlm(PromptStyle::Trl);
    let (pairs, _) = bpo::train::data::read_preference_file(&fixture("dpo/pairs.jsonl"), &Default::default()).unwrap();
    let (examples, report) = bpo::train::data::tokenize_pairs(&vlm, &pairs, Some(&fixture("images")), 2048).unwrap();
    assert_eq!(report.kept, 4);
    for (i, e) in examples.iter().enumerate() {
        let chosen: Vec<u32> = e.prompt.iter().chain(&e.chosen).copied().collect();
        let rejected: Vec<u32> = e.prompt.iter().chain(&e.rejected).copied().collect();
        let want =
            |k: &str| -> Vec<u32> { r[k][i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
        assert_eq!(chosen, want("chosen_ids"), "pair {i} chosen");
        assert_eq!(rejected, want("rejected_ids"), "pair {i} rejected");
    }
}

fn prepared_vlm(style: PromptStyle) -> bpo::model::Vlm {
    let mut vlm = bpo::model::Vlm::load(&fixture("llava-tiny"), &LoadOptions::default(), Template::LlavaHf).unwrap();
    vlm.style = style;
    vlm.aspect = AspectMode::Square;
    vlm
}

/// Summed response log-probs of the fixture pairs: (chosen, rejected) per pair.
fn pair_logps(vlm: &bpo::model::Vlm) -> Vec<(f32, f32)> {
    let (pairs, _) = bpo::train::data::read_preference_file(&fixture("dpo/pairs.jsonl"), &Default::default()).unwrap();
    let (examples, _) = bpo::train::data::tokenize_pairs(vlm, &pairs, Some(&fixture("images")), 2048).unwrap();
    let rows: Vec<bpo::score::Example> = examples
        .iter()
        .flat_map(|e| {
            let image = Some(vlm.load_image(e.image.as_ref().unwrap()).unwrap());
            [
                bpo::score::Example { prompt: e.prompt.clone(), response: e.chosen.clone(), image: image.clone() },
                bpo::score::Example { prompt: e.prompt.clone(), response: e.rejected.clone(), image },
            ]
        })
        .collect();
    let scores = bpo::score::score(&vlm.model, vlm.tok.pad, &rows, 8, Pass::INFER, &Silent).unwrap();
    scores.chunks(2).map(|c| (c[0].0, c[1].0)).collect()
}

#[test]
fn starting_adapter_and_base_log_probs_match_peft() {
    let r = trl_reference();
    let mut vlm = prepared_vlm(PromptStyle::Trl);
    let base = pair_logps(&vlm);
    let adapter = bpo::train::load_adapter(&mut vlm.model, &fixture("dpo/init-adapter")).unwrap();
    assert_eq!(
        (adapter.lora.len(), adapter.projector.len()),
        (2 * 7 * 2, 4),
        "peft's new spelling and modules_to_save read"
    );
    let policy = pair_logps(&vlm);
    for i in 0..4 {
        close(base[i].0 as f64, r["base_chosen"][i].as_f64().unwrap(), 2e-4, "base chosen");
        close(base[i].1 as f64, r["base_rejected"][i].as_f64().unwrap(), 2e-4, "base rejected");
        close(policy[i].0 as f64, r["policy_chosen_before"][i].as_f64().unwrap(), 2e-4, "policy chosen");
        close(policy[i].1 as f64, r["policy_rejected_before"][i].as_f64().unwrap(), 2e-4, "policy rejected");
    }
}

#[test]
fn shared_prompt_forward_equals_whole_sequences() {
    let mut vlm = prepared_vlm(PromptStyle::Llava);
    bpo::train::load_adapter(&mut vlm.model, &fixture("dpo/init-adapter")).unwrap();
    let whole = pair_logps(&vlm);
    let (pairs, _) = bpo::train::data::read_preference_file(&fixture("dpo/pairs.jsonl"), &Default::default()).unwrap();
    let (examples, _) = bpo::train::data::tokenize_pairs(&vlm, &pairs, Some(&fixture("images")), 2048).unwrap();
    let refs: Vec<_> = examples.iter().collect();
    let mut cache = bpo::train::features::FeatureCache::new(16);
    let batch = bpo::train::batch::PairBatch::new(&vlm, &refs, &mut cache).unwrap();
    assert_eq!(cache.encoded, 3, "four pairs, three distinct images, each encoded once");
    // Training mode exercises the differentiable kernels; inference the fused ones.
    for pass in [Pass { adapters: true, train: true }, Pass::INFER] {
        let (sums, _) = batch.logps(&vlm.model, None, false, pass, None).unwrap();
        let sums: Vec<f32> = sums.to_vec1().unwrap();
        for (i, (c, r)) in whole.iter().enumerate() {
            assert!(
                (sums[i] - c).abs() < 1e-4 && (sums[i + 4] - r).abs() < 1e-4,
                "pair {i}: {} {} vs {c} {r}",
                sums[i],
                sums[i + 4]
            );
        }
    }
}

#[test]
fn one_adamw_step_matches_trl() {
    let r = trl_reference();
    let tmp = tempfile::tempdir().unwrap();
    // Two epochs of the one batch: step 2's metrics are taken after step 1's update, against the same reference.
    let mut cfg = config(fixture("dpo/pairs.jsonl"));
    cfg.optim.epochs = 2;
    let mut rec = Record::default();
    run(&cfg, tmp.path(), false, &mut rec);
    let (first, second) = (&rec.logs[0], &rec.logs[1]);
    let trl = &r["trl_logged"];
    for key in ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins"] {
        close(first.get(key).unwrap(), trl[key].as_f64().unwrap(), 1e-4, key);
    }
    // Before the first update the policy is the reference: every reward is 0 in TRL, a tie whose accuracy (chosen >
    // rejected) only rounding decides in bpo, whose reference went through the inference kernels. Compared when the
    // margin is not a tie, as after the step below.
    assert_eq!(trl["rewards/margins"].as_f64(), Some(0.0), "the fixture's first step is a tie");
    for key in ["logps/chosen", "logps/rejected"] {
        close(first.get(key).unwrap(), trl[key].as_f64().unwrap(), 2e-4, key);
    }
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"] {
        close(second.get(key).unwrap(), r["after"][key].as_f64().unwrap(), 1e-4, &format!("after the step: {key}"));
    }
    // The run folder is a PEFT adapter plus the projector, config and metrics.
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "projector.safetensors",
        "train_config.json",
        "metrics.jsonl",
        "ref_logps.jsonl",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f} missing");
    }
    let lines = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
}

#[test]
fn policy_equal_to_reference_gives_log_2_and_zero_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(fixture("dpo/pairs.jsonl"));
    cfg.setup.init_adapter = None; // fresh LoRA: B = 0, so the policy starts as the base model
    let mut rec = Record::default();
    run(&cfg, tmp.path(), false, &mut rec);
    let log = &rec.logs[0];
    close(log.get("loss").unwrap(), std::f64::consts::LN_2, 1e-6, "loss");
    close(log.get("rewards/chosen").unwrap(), 0.0, 1e-6, "rewards/chosen");
    close(log.get("rewards/rejected").unwrap(), 0.0, 1e-6, "rewards/rejected");
    assert!(log.get("grad_norm").unwrap() > 0.0, "B = 0 still gets a gradient");
}

/// 16 pairs over three images with answers drawn from a small vocabulary, as a pair file.
pub fn overfit_pairs(dir: &Path) -> PathBuf {
    let words = ["red", "blue", "cat", "dog", "table", "cup", "tree", "car", "small", "large", "two", "one"];
    let images = ["chelsea.png", "coffee.png", "astronaut.png"];
    let mut text = String::new();
    for i in 0..16 {
        let pick = |k: usize| (0..4).map(|j| words[(i * 7 + j * 5 + k) % words.len()]).collect::<Vec<_>>().join(" ");
        let row = serde_json::json!({"id": format!("p{i}"), "prompt": format!("What is in image {i}?"), "image": images[i % 3], "chosen": pick(0), "rejected": pick(3)});
        text.push_str(&format!("{row}\n"));
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn overfits_16_pairs_to_full_reward_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(overfit_pairs(tmp.path()));
    cfg.setup = ModelSetup {
        init_adapter: None,
        template: Template::VicunaV1,
        prompt_style: PromptStyle::Llava,
        lora: Some(lora(8, 16.0, 0.0)),
        ..cfg.setup
    };
    cfg.optim =
        LoopConfig { lr: 5e-3, epochs: 20, batch_size: 16, max_grad_norm: Some(1.0), weight_decay: 0.0, ..cfg.optim };
    let mut rec = Record::default();
    let (report, _) = run(&cfg, &tmp.path().join("run"), false, &mut rec);
    assert_eq!(report.data.kept, 16);
    let last = rec.logs.last().unwrap();
    assert_eq!(
        last.get("rewards/accuracies"),
        Some(1.0),
        "{:?}",
        rec.logs.iter().map(|l| l.get("rewards/accuracies")).collect::<Vec<_>>()
    );
    assert!(
        last.get("loss").unwrap() < 0.5 * rec.logs[0].get("loss").unwrap(),
        "loss fell: {:?}",
        rec.logs.iter().map(|l| l.get("loss")).collect::<Vec<_>>()
    );
    // The frozen tower ran once per distinct image for the whole run (features cached across steps).
    assert_eq!(report.images_encoded, 3);
}

/// The resume tests' run: dropout on and gradient accumulation, both of which must replay exactly; no init
/// adapter (on-the-fly reference); 4 steps.
pub fn resume_config(tmp: &Path) -> DpoConfig {
    let mut cfg = config(overfit_pairs(tmp));
    cfg.setup =
        ModelSetup { init_adapter: None, prompt_style: PromptStyle::Llava, lora: Some(lora(4, 8.0, 0.1)), ..cfg.setup };
    cfg.optim = LoopConfig {
        lr: 2e-3,
        schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.2,
        epochs: 2,
        batch_size: 4,
        grad_accum: 2,
        seed: 5,
        ..cfg.optim
    };
    cfg
}

/// Trains `cfg` whole into `tmp/whole`, and stopped after step 3 then resumed into `tmp/parts`; checks that both give
/// the same losses, gradient norms and learning rates bit for bit, the same adapter, and each step once in
/// metrics.jsonl. Returns the whole run's report and steps.
pub fn resumes_exactly(cfg: &DpoConfig, tmp: &Path) -> (dpo::TrainReport, Record) {
    let whole = tmp.join("whole");
    let mut a = Record::default();
    let (report, _) = run(cfg, &whole, false, &mut a);
    assert_eq!(a.logs.len(), 4);
    let parts = tmp.join("parts");
    let mut b = Record { stop_after: Some(3), ..Default::default() };
    let (first, _) = run(cfg, &parts, false, &mut b);
    assert!(first.summary.interrupted && parts.join("checkpoint-3").is_dir());
    let mut c = Record::default();
    let (second, _) = run(cfg, &parts, true, &mut c);
    assert_eq!((second.summary.start_step, second.summary.steps_done), (3, 1));
    let curve = |logs: &[StepLog]| {
        logs.iter()
            .map(|l| (l.step, l.get("loss").unwrap(), l.get("grad_norm").unwrap(), l.get("learning_rate").unwrap()))
            .collect::<Vec<_>>()
    };
    let resumed: Vec<StepLog> = b.logs.iter().chain(&c.logs).cloned().collect();
    assert_eq!(curve(&resumed), curve(&a.logs), "same losses, gradient norms and learning rates, bit for bit");
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&whole), adapter(&parts), "same final adapter");
    let metrics = std::fs::read_to_string(parts.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "metrics.jsonl holds each step once");
    (report, a)
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_curve() {
    let tmp = tempfile::tempdir().unwrap();
    resumes_exactly(&resume_config(tmp.path()), tmp.path());
}

#[test]
fn a_checkpoint_naming_its_tensors_the_older_way_resumes_exactly() {
    // Before 2026-12-06 bpo named LoRA variables, and so their optimizer moments, in the older llava spelling
    // (`base_model.model.language_model.model.layers...`); such a checkpoint must resume where it stopped.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = resume_config(tmp.path());
    let whole = tmp.path().join("whole");
    run(&cfg, &whole, false, &mut Record::default());
    let parts = tmp.path().join("parts");
    run(&cfg, &parts, false, &mut Record { stop_after: Some(3), ..Default::default() });
    let path = parts.join("checkpoint-3/optimizer.safetensors");
    let moments = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let (new, old) = ("base_model.model.model.language_model.", "base_model.model.language_model.model.");
    assert!(moments.keys().any(|k| k.starts_with(new)), "{:?}", moments.keys().collect::<Vec<_>>());
    let renamed: std::collections::HashMap<String, candle_core::Tensor> =
        moments.into_iter().map(|(k, t)| (k.replacen(new, old, 1), t)).collect();
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let (second, _) = run(&cfg, &parts, true, &mut Record::default());
    assert_eq!((second.summary.start_step, second.summary.steps_done), (3, 1), "resumed from checkpoint-3");
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&whole), adapter(&parts), "same final adapter");
}

/// Logits of the fixture's scoring batch.
fn logits(model: &bpo::model::Model) -> candle_core::Tensor {
    let r = candle_core::safetensors::load(fixture("llava-tiny-ref.safetensors"), &candle_core::Device::Cpu).unwrap();
    let u = |k: &str| r[k].to_dtype(candle_core::DType::U32).unwrap();
    let (ids, mask) = (u("score_input_ids"), u("score_attention_mask"));
    model.forward(&Inputs { ids: &ids, mask: &mask, images: Some(&r["pixel_values"]) }, None, Pass::INFER).unwrap()
}

#[test]
fn merged_model_gives_the_adapter_models_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = bpo::train::merge(&fixture("llava-tiny"), &fixture("dpo/init-adapter"), &out).unwrap();
    assert_eq!((report.linears, report.projector), (14, true));
    let mut with_adapter = load(&fixture("llava-tiny"), &LoadOptions::default()).unwrap();
    bpo::train::load_adapter(&mut with_adapter, &fixture("dpo/init-adapter")).unwrap();
    let merged = load(&out, &LoadOptions::default()).unwrap();
    let base = load(&fixture("llava-tiny"), &LoadOptions::default()).unwrap();
    let (a, m, b) = (logits(&with_adapter), logits(&merged), logits(&base));
    let diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(diff(&a, &m) < 1e-4, "merged vs adapter: {}", diff(&a, &m));
    assert!(diff(&a, &b) > 1e-2, "the adapter changes the model");
    assert!(out.join("tokenizer.json").is_file() && out.join("preprocessor_config.json").is_file());
}

#[test]
fn malformed_rows_fail_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    for (name, bad) in [
        ("pairs.jsonl", r#"{"prompt": "q", "chosen": 3, "rejected": "b"}"#),
        ("torn.jsonl", r#"{"prompt": "q", "chos"#),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, format!("{good}\n{good}\n{bad}\n")).unwrap();
        let err = dpo::train(&config(path), &tmp.path().join(format!("run-{name}")), false, None, &mut Silent, &Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{name}:3")), "{err}");
    }
    let records = tmp.path().join("records.jsonl");
    let rec = r#"{"id": "a", "prompt": "q", "completions": [{"response": "x", "score": 1, "type": "gt"}, {"response": "y", "score": 0, "type": "llm-hal"}]}"#;
    let bad = r#"{"id": "b", "prompt": "q", "completions": [{"response": 5, "score": 1, "type": "gt"}]}"#;
    std::fs::write(&records, format!("{rec}\n{bad}\n")).unwrap();
    let err = dpo::train(&config(records), &tmp.path().join("run-records"), false, None, &mut Silent, &Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("records.jsonl:2"), "{err}");
}

#[test]
fn a_pair_with_a_missing_image_is_reported_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pairs.jsonl");
    let rows = [("ok1", "chelsea.png"), ("gone", "no-such-image.png"), ("ok2", "coffee.png")];
    let text: String = rows
        .iter()
        .map(|(id, img)| {
            format!(
                "{}\n",
                serde_json::json!({"id": id, "prompt": "q", "image": img, "chosen": "a cat", "rejected": "a dog"})
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    let mut cfg = config(path);
    cfg.setup.init_adapter = None;
    let (report, said) = run(&cfg, &tmp.path().join("run"), false, &mut Silent);
    assert_eq!((report.data.read, report.data.kept, report.data.missing_images.len()), (3, 2, 1));
    assert!(said.iter().any(|m| m.contains("gone") && m.contains("no-such-image.png")), "{said:?}");
    assert!(said.iter().any(|m| m.contains("1 pairs were skipped")), "counted at the end: {said:?}");
}

/// A run reports to its events sink: the reference pass (one unit a pair), then the training stage (one unit a step,
/// each with the metrics `metrics.jsonl` logs), each ended; the data report as messages.
#[test]
fn a_run_reports_the_reference_pass_and_every_step_to_its_sink() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(fixture("dpo/pairs.jsonl"));
    cfg.optim.epochs = 2;
    cfg.precompute_ref = true;
    let (seen, mut rec) = (Recorder::default(), Record::default());
    let report = dpo::train(&cfg, tmp.path(), false, None, &mut rec, &seen).unwrap();
    let events = seen.events();
    let stages: Vec<(&str, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Stage(name, len) => Some((name.as_str(), *len)),
            _ => None,
        })
        .collect();
    let (pairs, steps) = (report.data.kept as u64, report.summary.total_steps as u64);
    assert_eq!(stages, [("reference log-probs", Some(pairs)), ("training", Some(steps))]);
    assert_eq!((seen.done_in("reference log-probs"), seen.done_in("training")), (pairs, steps));
    assert_eq!(events.iter().filter(|e| **e == Event::EndStage).count(), 2);
    let metrics: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(metrics, rec.logs.iter().map(|l| l.values.clone()).collect::<Vec<_>>());
    assert!(seen.messages().iter().any(|m| m.starts_with("pairs: ")), "{:?}", seen.messages());
}

#[test]
fn cli_train_then_score_and_generate_with_the_adapter_then_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let run_dir = tmp.path().join("run");
    let model = fixture("llava-tiny");
    let images = fixture("images");
    let args = on_tiny(
        "train --lora-rank 4 --lora-alpha 8 --lr 1e-3 --epochs 1 --batch-size 8 --save-steps 1",
        &[("--data", &pairs), ("--out", &run_dir)],
    );
    let o = bpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run_dir.join("checkpoint-2/optimizer.safetensors").is_file());
    let help = String::from_utf8_lossy(&bpo(&["train", "--help"]).stdout).into_owned();
    assert!(help.contains("frozen copy") && help.contains("--drifting-ref-projector"), "{help}");
    // Same folder again without --resume is refused; with --resume it has nothing left to do.
    fails_with(&args, &["--resume"]);
    let mut again = args.to_vec();
    again.push("--resume".into());
    assert!(bpo(&again).status.success());

    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"What is in image 1?\", \"image\": \"coffee.png\", \"response\": \"red cat\"}\n",
    )
    .unwrap();
    let score = |extra: &[&str], out: &Path| {
        let mut a = vec!["score", "--model", s(&model), "--data", s(&rows), "--images", s(&images), "--out", s(out)];
        a.extend_from_slice(extra);
        let o = bpo(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(std::fs::read_to_string(out).unwrap().lines().next().unwrap()).unwrap();
        v["logprob"].as_f64().unwrap()
    };
    let plain = score(&[], &tmp.path().join("s0.jsonl"));
    let adapted = score(&["--adapter", s(&run_dir)], &tmp.path().join("s1.jsonl"));
    assert!((plain - adapted).abs() > 1e-4, "the adapter changes scores: {plain} vs {adapted}");

    let o =
        bpo(&["generate", "--model", s(&model), "--adapter", s(&run_dir), "--prompt", "Hi", "--max-new-tokens", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let merged = tmp.path().join("merged");
    let o = bpo(&["merge", "--model", s(&model), "--adapter", s(&run_dir), "--out", s(&merged)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bpo(&[
        "score",
        "--model",
        s(&merged),
        "--data",
        s(&rows),
        "--images",
        s(&images),
        "--out",
        s(&tmp.path().join("s3.jsonl")),
    ]);
    assert!(o.status.success());
    let v: Value =
        serde_json::from_str(std::fs::read_to_string(tmp.path().join("s3.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    assert!((v["logprob"].as_f64().unwrap() - adapted).abs() < 1e-3, "merged model scores like the adapter");
}

#[test]
fn cli_rejects_bad_training_input() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\nnot json\n").unwrap();
    let model = fixture("llava-tiny");
    fails_with(
        &["train", "--model", s(&model), "--data", s(&bad), "--out", s(&tmp.path().join("r1"))],
        &["bad.jsonl:2"],
    );
    fails_with(
        &["train", "--model", s(&model), "--data", s(&bad), "--out", s(&tmp.path().join("r2")), "--beta", "0"],
        &["beta"],
    );
    fails_with(
        &[
            "score",
            "--model",
            s(&model),
            "--adapter",
            s(&tmp.path().join("nowhere")),
            "--data",
            s(&bad),
            "--out",
            s(&tmp.path().join("o.jsonl")),
        ],
        &["adapter_config.json"],
    );
    // The tower trains only with full fine-tuning, and only under supervised training.
    fails_with(
        &["sft", "--model", s(&model), "--data", s(&bad), "--out", s(&tmp.path().join("r3")), "--train-vision"],
        &["--full"],
    );
    let cfg =
        DpoConfig { setup: ModelSetup { lora: None, train_vision: true, ..config(bad.clone()).setup }, ..config(bad) };
    let err =
        dpo::train(&cfg, &tmp.path().join("r4"), false, None, &mut Record::default(), &Silent).unwrap_err().to_string();
    assert!(err.contains("bpo sft"), "{err}");
}

#[test]
fn sft_trains_on_answers_with_lora_and_full_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("conv.json");
    let conv: Vec<Value> = (0..6)
        .map(|i| {
            let (image, what, colour) =
                [("chelsea.png", "a cat", "orange"), ("coffee.png", "a cup of coffee", "brown")][i % 2];
            serde_json::json!({"id": i, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": what},
                {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": colour}]})
        })
        .collect();
    std::fs::write(&data, serde_json::to_string(&conv).unwrap()).unwrap();
    let base = config(data.clone());
    let patch = "vision_tower.vision_model.embeddings.patch_embedding.weight";
    let tensor = |dir: &Path, name: &str| {
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
            .remove(name)
            .unwrap()
    };
    let start = tensor(&fixture("llava-tiny"), patch);
    for (name, lora_cfg, train_vision) in
        [("lora", Some(lora(4, 8.0, 0.0)), false), ("full", None, false), ("full-vision", None, true)]
    {
        let cfg = bpo::train::SftConfig {
            setup: ModelSetup {
                init_adapter: None,
                prompt_style: PromptStyle::Llava,
                template: Template::VicunaV1,
                lora: lora_cfg,
                train_vision,
                ..base.setup.clone()
            },
            data: data.clone(),
            images: base.images.clone(),
            max_length: 2048,
            feature_cache_mb: 16,
            optim: LoopConfig {
                lr: if name == "lora" { 5e-3 } else { 1e-3 },
                epochs: 6,
                batch_size: 6,
                ..base.optim.clone()
            },
        };
        let mut rec = Record::default();
        let out = tmp.path().join(name);
        bpo::train::sft::train(&cfg, &out, false, None, &mut rec, &Silent).unwrap();
        let (first, last) = (rec.logs[0].get("loss").unwrap(), rec.logs.last().unwrap().get("loss").unwrap());
        assert!(last < 0.7 * first, "{name}: loss {first} -> {last}");
        if name.starts_with("full") {
            // Full fine-tuning writes a model folder that loads like any other.
            let m = load(&out, &LoadOptions::default()).unwrap();
            let b = load(&fixture("llava-tiny"), &LoadOptions::default()).unwrap();
            let d = (logits(&m) - logits(&b)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d > 1e-3, "weights changed");
            // The vision tower moves only when asked to.
            let moved =
                (tensor(&out, patch) - &start).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(moved > 0.0, train_vision, "{name}: patch embedding moved by {moved}");
        } else {
            assert!(out.join("adapter_model.safetensors").is_file());
        }
    }
}

#[test]
fn ctrl_c_finishes_the_step_and_saves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let run_dir = tmp.path().join("run");
    let args = on_tiny(
        "train --lora-rank 2 --lora-alpha 4 --epochs 500 --batch-size 16",
        &[("--data", &pairs), ("--out", &run_dir)],
    );
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first logged step (the run is far from done then), then interrupt.
    let metrics = run_dir.join("metrics.jsonl");
    for _ in 0..600 {
        if std::fs::read_to_string(&metrics).is_ok_and(|m| !m.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "a saved, interrupted run exits 130: {err}");
    assert!(err.contains("--resume"), "{err}");
    let (step, dir) = bpo::train::checkpoint::latest_checkpoint(&run_dir).unwrap().expect("a checkpoint was written");
    assert!((1..500).contains(&step) && dir.join("optimizer.safetensors").is_file());
    let logged = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(logged, step, "every finished step is logged and saved");
    assert!(!run_dir.join("adapter_model.safetensors").exists(), "no final adapter for an interrupted run");
}

#[test]
fn precomputed_reference_gives_the_same_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(overfit_pairs(tmp.path()));
    cfg.setup = ModelSetup { init_adapter: None, prompt_style: PromptStyle::Llava, ..cfg.setup };
    cfg.optim = LoopConfig { epochs: 2, batch_size: 8, ..cfg.optim };
    let curves: Vec<Vec<f64>> = [false, true]
        .iter()
        .map(|&pre| {
            let mut rec = Record::default();
            run(
                &DpoConfig { precompute_ref: pre, ..cfg.clone() },
                &tmp.path().join(format!("run-{pre}")),
                false,
                &mut rec,
            );
            rec.logs.iter().map(|l| l.get("loss").unwrap()).collect()
        })
        .collect();
    assert_eq!(curves[0].len(), 4);
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", curves[0], curves[1]);
    }
    assert!(tmp.path().join("run-true/ref_logps.jsonl").is_file());
    // The released code's drifting reference: identical at step 1, different once the projector has moved.
    let mut rec = Record::default();
    run(&DpoConfig { drifting_ref_projector: true, ..cfg.clone() }, &tmp.path().join("run-drift"), false, &mut rec);
    let drift: Vec<f64> = rec.logs.iter().map(|l| l.get("loss").unwrap()).collect();
    assert!(
        (drift[0] - curves[0][0]).abs() < 1e-6 && (drift[3] - curves[0][3]).abs() > 1e-6,
        "{drift:?} vs {:?}",
        curves[0]
    );
}
