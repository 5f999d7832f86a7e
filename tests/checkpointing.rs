//! Gradient checkpointing (`--gradient-checkpointing`): the same training step as without it, on the fused and the
//! device-generic ops path, with LoRA dropout on, through the projector and (full fine-tuning) the vision tower,
//! and across a resume that switches it.

use std::path::Path;

use bpo::model::Runtime;
use bpo::progress::Silent;
use bpo::text::{PromptStyle, Template};
use bpo::train::trainer::LoopConfig;
use bpo::train::ModelSetup;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::train::{config, lora, overfit_pairs, run, Record};
use crate::util::fixture;

fn runtimes() -> [(&'static str, Runtime); 2] {
    [("fused", Runtime::default()), ("generic", Runtime::generic(Device::Cpu, DType::F32))]
}

/// Every tensor of the safetensors files `files` in run folder `dir`, by name.
fn tensors(dir: &Path, files: &[&str]) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for file in files {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let mut t: Vec<(String, Tensor)> =
            candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_iter().collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(
            t.into_iter().map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())),
        );
    }
    assert!(!out.is_empty(), "{} holds no weights", dir.display());
    out
}

const WEIGHTS: [&str; 3] = ["adapter_model.safetensors", "projector.safetensors", "model.safetensors"];

/// The largest difference between two runs' weights, after checking that they hold the same tensors.
fn weight_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a, &WEIGHTS), tensors(b, &WEIGHTS));
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    a.iter().zip(&b).flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

/// Checks that two runs logged the same losses and gradient norms and wrote the same weights, within `tol`.
fn same_runs(what: &str, (a, alog): (&Path, &Record), (b, blog): (&Path, &Record), tol: f64) {
    assert_eq!(alog.logs.len(), blog.logs.len(), "{what}: steps");
    for (x, y) in alog.logs.iter().zip(&blog.logs) {
        for key in ["loss", "grad_norm"] {
            let (p, q) = (x.get(key).unwrap(), y.get(key).unwrap());
            assert!((p - q).abs() <= tol * (1.0 + p.abs()), "{what}: step {} {key} {p} vs {q}", x.step);
        }
    }
    let d = weight_diff(a, b);
    assert!(f64::from(d) <= tol, "{what}: weights differ by up to {d}");
}

#[test]
fn a_lora_dpo_step_is_the_same_with_gradient_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, rt) in runtimes() {
        for dropout in [0.0, 0.1] {
            let mut cfg = config(fixture("dpo/pairs.jsonl"));
            cfg.setup.runtime = rt.clone();
            cfg.setup.lora.as_mut().unwrap().dropout = dropout;
            // AdamW's first update, lr * g / (|g| + eps), turns rounding differences in tiny gradients into
            // differences of up to lr: 1e-4 keeps them under 1e-6 (as the generic/fused comparison does).
            cfg.optim.lr = 1e-4;
            let mut runs = Vec::new();
            for ckpt in [false, true] {
                cfg.setup.gradient_checkpointing = ckpt;
                let out = tmp.path().join(format!("{path}-{dropout}-{ckpt}"));
                let mut rec = Record::default();
                run(&cfg, &out, false, &mut rec);
                assert_eq!(rec.logs.len(), 1);
                runs.push((out, rec));
            }
            let what = format!("{path} path, dropout {dropout}");
            same_runs(&what, (&runs[0].0, &runs[0].1), (&runs[1].0, &runs[1].1), 1e-6);
        }
    }
}

fn conversations(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("conv.json");
    let conv: Vec<Value> = (0..4)
        .map(|i| {
            let (image, what) = [("chelsea.png", "a cat"), ("coffee.png", "a cup of coffee")][i % 2];
            serde_json::json!({"id": i, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": what}]})
        })
        .collect();
    std::fs::write(&data, serde_json::to_string(&conv).unwrap()).unwrap();
    data
}

#[test]
fn an_sft_step_is_the_same_with_gradient_checkpointing_through_the_vision_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let data = conversations(tmp.path());
    let base = config(data.clone());
    for (path, rt) in runtimes() {
        for (name, lora_cfg, train_vision) in [("lora", Some(lora(4, 8.0, 0.1)), false), ("full-vision", None, true)] {
            let mut runs = Vec::new();
            for ckpt in [false, true] {
                let cfg = bpo::train::SftConfig {
                    setup: ModelSetup {
                        init_adapter: None,
                        prompt_style: PromptStyle::Llava,
                        template: Template::VicunaV1,
                        lora: lora_cfg.clone(),
                        train_vision,
                        gradient_checkpointing: ckpt,
                        runtime: rt.clone(),
                        ..base.setup.clone()
                    },
                    data: data.clone(),
                    images: base.images.clone(),
                    max_length: 2048,
                    feature_cache_mb: 16,
                    optim: LoopConfig { lr: 1e-4, epochs: 1, batch_size: 4, ..base.optim.clone() },
                };
                let mut rec = Record::default();
                let out = tmp.path().join(format!("{path}-{name}-{ckpt}"));
                bpo::train::sft::train(&cfg, &out, false, None, &mut rec, &Silent).unwrap();
                runs.push((out, rec));
            }
            let what = format!("{path} path, {name}");
            same_runs(&what, (&runs[0].0, &runs[0].1), (&runs[1].0, &runs[1].1), 1e-6);
        }
    }
}

#[test]
fn a_run_resumed_with_gradient_checkpointing_ends_like_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(overfit_pairs(tmp.path()));
    cfg.setup =
        ModelSetup { init_adapter: None, prompt_style: PromptStyle::Llava, lora: Some(lora(4, 8.0, 0.1)), ..cfg.setup };
    cfg.optim = LoopConfig { lr: 1e-4, epochs: 1, batch_size: 4, grad_accum: 2, seed: 3, ..cfg.optim };
    let whole = tmp.path().join("whole");
    let mut a = Record::default();
    run(&cfg, &whole, false, &mut a);
    assert_eq!(a.logs.len(), 2);
    let parts = tmp.path().join("parts");
    let mut b = Record { stop_after: Some(1), ..Default::default() };
    run(&cfg, &parts, false, &mut b);
    cfg.setup.gradient_checkpointing = true;
    let mut c = Record::default();
    let (second, _) = run(&cfg, &parts, true, &mut c);
    assert_eq!((second.summary.start_step, second.summary.steps_done), (1, 1));
    let resumed = Record { logs: b.logs.iter().chain(&c.logs).cloned().collect(), ..Default::default() };
    same_runs("resumed with checkpointing", (&whole, &a), (&parts, &resumed), 1e-6);
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(parts.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(recorded["gradient_checkpointing"], true, "the run's config records the setting it went on with");
}
