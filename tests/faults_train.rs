//! Faults around training and loading weights, through the binary where the exit status is the contract (README,
//! "Exit codes"): numeric options outside their range (2), a diverging run (3, its last good checkpoint kept),
//! non-finite weights refused on load (1), `kill -9` then `--resume` equal to the uninterrupted run with a corrupt
//! newest checkpoint skipped, a run that failed before its first step started again, OS errors printed once.
//! SIGTERM then `--resume` equal to the uninterrupted run for `train` and `sft` (143; Ctrl-C's 130 is checked in
//! `train::ctrl_c_finishes_the_step_and_saves_a_checkpoint`).

use std::path::{Path, PathBuf};
use std::process::Output;

use bpo::progress::Silent;
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::train::overfit_pairs;
use crate::util::{bpo, fails_with, fixture, model_copy, s, stderr};

/// `bpo train` on the tiny model with a rank-4 adapter: 16 pairs, 4 per step, a checkpoint after every step.
fn train_args(pairs: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let model = fixture("llava-tiny");
    let images = fixture("images");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--data",
        s(pairs),
        "--images",
        s(&images),
        "--out",
        s(out),
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--batch-size",
        "4",
        "--save-steps",
        "1",
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn run(args: &[String]) -> Output {
    bpo(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Sets element 0 of the first float tensor of a safetensors file to NaN; returns the tensor's name.
fn poison(path: &Path) -> String {
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (name, t) = tensors.iter_mut().find(|(_, t)| t.dtype().is_float()).unwrap();
    let mut values: Vec<f32> = t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    values[0] = f32::NAN;
    *t = Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap().to_dtype(t.dtype()).unwrap();
    let name = name.clone();
    bpo::model::load::save_safetensors(path, &tensors).unwrap();
    name
}

#[test]
fn numeric_options_outside_their_range_are_usage_errors_naming_the_range() {
    let m = fixture("llava-tiny");
    let train = ["train", "--model", s(&m), "--data", "d.jsonl", "--out", "run"];
    let sft = ["sft", "--model", s(&m), "--data", "d.json", "--out", "run"];
    let generate = ["generate", "--model", s(&m), "--prompt", "hi"];
    let weaken = ["bootstrap", "weaken", "--model", s(&m), "--data", "r.jsonl", "--out", "o.jsonl", "--images", "."];
    let score = ["score", "--model", s(&m), "--data", "d.jsonl", "--out", "o.jsonl"];
    let inject = ["bootstrap", "inject", "--data", "r.jsonl", "--out", "o.jsonl", "--llm", s(&m)];
    let cases: &[(&[&str], &str, &str)] = &[
        (&train, "--lr=-1", "> 0"),
        (&train, "--lr=NaN", "> 0"),
        (&train, "--lr=inf", "finite"),
        (&train, "--lr=0", "> 0"),
        (&train, "--lora-alpha=-2", "> 0"),
        (&train, "--lora-dropout=1", "[0, 1)"),
        (&train, "--lora-dropout=-0.1", "[0, 1)"),
        (&train, "--lora-rank=0", "at least 1"),
        (&train, "--weight-decay=-1", ">= 0"),
        (&train, "--warmup-ratio=2", "[0, 1]"),
        (&train, "--beta=0", "> 0"),
        (&train, "--beta=NaN", "> 0"),
        (&train, "--label-smoothing=0.5", "[0, 0.5)"),
        (&train, "--sft-weight=-1", ">= 0"),
        (&train, "--max-grad-norm=-1", ">= 0"),
        (&train, "--max-grad-norm=NaN", ">= 0"),
        (&train, "--batch-size=0", "at least 1"),
        (&train, "--grad-accum=0", "at least 1"),
        (&train, "--epochs=0", "at least 1"),
        (&train, "--save-steps=0", "at least 1"),
        (&train, "--max-length=0", "at least 1"),
        (&sft, "--lr=NaN", "> 0"),
        (&sft, "--warmup-ratio=-0.1", "[0, 1]"),
        (&generate, "--temperature=NaN", ">= 0"),
        (&generate, "--temperature=-1", ">= 0"),
        (&generate, "--top-p=0", "(0, 1]"),
        (&generate, "--top-p=1.5", "(0, 1]"),
        (&generate, "--max-new-tokens=0", "at least 1"),
        (&generate, "--batch-size=0", "at least 1"),
        (&weaken, "--temperature=-0.5", ">= 0"),
        (&weaken, "--noise-step=1000", "999"),
        (&weaken, "--samples=0", "at least 1"),
        (&score, "--batch-size=0", "at least 1"),
        (&inject, "--batch=0", "at least 1"),
        (&inject, "--top-p=2", "(0, 1]"),
    ];
    for (command, option, range) in cases {
        let mut args = command.to_vec();
        args.push(option);
        let o = bpo(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{option}: {err}");
        let flag = option.split('=').next().unwrap();
        assert!(
            err.contains(flag) && err.contains(range) && !err.contains("panicked"),
            "{option} should name the flag and {range:?}: {err}"
        );
    }
    // The ranges are in --help, with TRL's meaning of a zero clipping norm.
    let help = String::from_utf8_lossy(&bpo(&["train", "--help"]).stdout).into_owned();
    for needle in ["in [0, 1)", "in [0, 0.5)", "0 (like leaving it out) means no clipping"] {
        assert!(help.contains(needle), "train --help should say {needle:?}");
    }
}

#[test]
fn a_diverging_run_exits_3_naming_the_step_and_keeps_its_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let out = tmp.path().join("run");
    let o = run(&train_args(&pairs, &out, &["--lr", "1e30", "--epochs", "2"]));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let (step, last) =
        bpo::train::checkpoint::latest_checkpoint(&out).unwrap().expect("checkpoints before the divergence");
    assert!(
        lines[0].contains(&format!("training diverged at step {}", step + 1)) && lines[0].contains(s(&last)),
        "{}",
        lines[0]
    );
    assert!(
        ["loss", "gradient norm", "NaN or infinity"].iter().any(|q| lines[0].contains(q)),
        "names the quantity: {}",
        lines[0]
    );
    // No final adapter; the checkpoint left is finite and every logged step has numbers, not nulls.
    assert!(!out.join("adapter_model.safetensors").exists());
    bpo::model::load::check_finite_file(&last.join("adapter_model.safetensors")).unwrap();
    // Logged: the steps checkpointed, and the diverging one only if its loss and norm were finite (its update was not).
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!((step..=step + 1).contains(&metrics.lines().count()), "{metrics}");
    assert!(!metrics.contains("null"), "{metrics}");
}

#[test]
fn non_finite_weights_are_refused_on_load_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llama-tiny", tmp.path());
    let name = poison(&m.join("model.safetensors"));
    let generate = ["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "2"];
    fails_with(&generate, &["model.safetensors", &name, "not finite"]);
    let mut allowed = generate.to_vec();
    allowed.push("--allow-non-finite");
    let o = bpo(&allowed);
    assert!(o.status.success(), "{}", stderr(&o));

    let adapter = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("dpo/init-adapter").join(f), adapter.join(f)).unwrap();
    }
    let name = poison(&adapter.join("adapter_model.safetensors"));
    fails_with(
        &["generate", "--model", s(&fixture("llava-tiny")), "--adapter", s(&adapter), "--prompt", "hi"],
        &["adapter_model.safetensors", &name],
    );
}

/// metrics.jsonl without the timing fields, which differ from run to run.
fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for r in &mut rows {
        let r = r.as_object_mut().unwrap();
        r.remove("step_seconds");
        r.remove("tokens_per_second");
    }
    rows
}

#[test]
fn kill_9_then_resume_equals_the_uninterrupted_run_skipping_a_corrupt_newest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    let options = ["--lr", "1e-3", "--epochs", "2"];
    let o = run(&train_args(&pairs, &whole, &options));
    assert!(o.status.success(), "{}", stderr(&o));

    let args = train_args(&pairs, &parts, &options);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let logged = || std::fs::read_to_string(parts.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
    for _ in 0..1200 {
        if logged() >= 5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!((5..8).contains(&logged()), "killed mid-run, after {} steps", logged());
    let (newest, dir) = bpo::train::checkpoint::latest_checkpoint(&parts).unwrap().unwrap();
    poison(&dir.join("adapter_model.safetensors"));

    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = run(&resume);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("warning: --resume: skipping {}", dir.display())) && err.contains("NaN or infinity"),
        "{err}"
    );
    assert!(
        err.contains(&format!("trained {} steps", 8 - (newest - 1))),
        "resumed from checkpoint-{}: {err}",
        newest - 1
    );
    assert_eq!(metrics(&parts), metrics(&whole), "every logged value equal, bit for bit");
    let adapter = |dir: &PathBuf| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&parts), adapter(&whole), "the same final adapter, byte for byte");
}

/// Runs `args` until `min_steps` steps are logged, sends SIGTERM (as `docker stop`, Slurm and Kubernetes do), and
/// checks that the step finished, its checkpoint was saved and the status is 143.
fn terminate_after(args: &[String], run: &Path, min_steps: usize) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logged = || std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
    for _ in 0..2400 {
        if logged() >= min_steps {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "SIGTERM saves and exits 143: {err}");
    assert!(err.contains("--resume") && !err.contains("panicked"), "{err}");
    let (step, _) = bpo::train::checkpoint::latest_checkpoint(run).unwrap().expect("a checkpoint was written");
    assert_eq!(logged(), step, "every finished step is logged and saved");
    assert!(!run.join("adapter_model.safetensors").exists(), "no final adapter for a stopped run");
}

/// SIGTERM during `train` and `sft` stops like Ctrl-C, and `--resume` then ends with the adapter of the run that was
/// never stopped. A `metrics.jsonl` holding a line bpo did not write is refused, never cut.
#[test]
fn sigterm_then_resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let conv = tmp.path().join("conv.json");
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            let (image, what) = [("chelsea.png", "an orange cat"), ("coffee.png", "a cup of coffee")][i % 2];
            serde_json::json!({"id": i, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": what}]})
        })
        .collect();
    std::fs::write(&conv, serde_json::to_string(&rows).unwrap()).unwrap();
    let sft_args = |out: &Path| {
        let mut a = train_args(&conv, out, &["--lr", "1e-3", "--epochs", "4"]);
        a[0] = "sft".into();
        a
    };
    type Args<'a> = Box<dyn Fn(&Path) -> Vec<String> + 'a>;
    let commands: [(&str, Args); 2] = [
        ("train", Box::new(|out: &Path| train_args(&pairs, out, &["--lr", "1e-3", "--epochs", "2"]))),
        ("sft", Box::new(sft_args)),
    ];
    for (name, args) in commands {
        let (whole, parts) = (tmp.path().join(format!("{name}-whole")), tmp.path().join(format!("{name}-parts")));
        let o = run(&args(&whole));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        terminate_after(&args(&parts), &parts, 2);

        let mut resume = args(&parts);
        resume.push("--resume".into());
        let metrics_file = parts.join("metrics.jsonl");
        let log = std::fs::read_to_string(&metrics_file).unwrap();
        std::fs::write(&metrics_file, format!("{log}{{\"note\": \"mine\"}}\n")).unwrap();
        let o = run(&resume);
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains("metrics.jsonl") && err.contains("refusing"), "{name}: {err}");
        assert!(std::fs::read_to_string(&metrics_file).unwrap().ends_with("{\"note\": \"mine\"}\n"), "{name}: not cut");
        std::fs::write(&metrics_file, log).unwrap();

        let o = run(&resume);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_eq!(metrics(&parts), metrics(&whole), "{name}: every logged value equal, bit for bit");
        let adapter = |dir: &PathBuf| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        assert_eq!(adapter(&parts), adapter(&whole), "{name}: the same final adapter, byte for byte");
    }
}

#[test]
fn a_run_that_failed_before_its_first_step_can_be_started_again_or_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    for (i, extra) in [&[][..], &["--resume"][..]].iter().enumerate() {
        // Every pair's image is missing: no example is left, and the run stops before step 1.
        std::fs::write(
            &pairs,
            "{\"prompt\": \"q\", \"image\": \"gone.png\", \"chosen\": \"a cat\", \"rejected\": \"a dog\"}\n",
        )
        .unwrap();
        let out = tmp.path().join(format!("run{i}"));
        let args = train_args(&pairs, &out, &["--epochs", "1"]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("no training examples"), "{}", stderr(&o));
        overfit_pairs(tmp.path());
        let mut again = args.clone();
        again.extend(extra.iter().map(|a| a.to_string()));
        let o = run(&again);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(out.join("adapter_model.safetensors").is_file());
    }
}

#[test]
fn an_os_error_is_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-rows.jsonl");
    let o = bpo(&[
        "score",
        "--model",
        s(&fixture("llava-tiny")),
        "--data",
        s(&missing),
        "--out",
        s(&tmp.path().join("o.jsonl")),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A copy of the tiny LLaVA stored in f16, as most released checkpoints are.
fn f16_model(dir: &Path) -> PathBuf {
    let m = model_copy("llava-tiny", dir);
    let path = m.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(candle_core::DType::F16).unwrap()))
        .collect();
    bpo::model::load::save_safetensors(&path, &tensors).unwrap();
    m
}

/// Full fine-tuning of an f16 model: its checkpoints keep the f32 master weights, so resuming continues from the
/// weights the run had, not from their f16 rounding.
#[test]
fn full_fine_tuning_of_an_f16_model_resumes_exactly() {
    use bpo::train::trainer::LoopConfig;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("conv.json");
    let conv: Vec<Value> = (0..4)
        .map(|i| {
            let (image, what) = [("chelsea.png", "an orange cat"), ("coffee.png", "a cup of coffee")][i % 2];
            serde_json::json!({"id": i, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": what}]})
        })
        .collect();
    std::fs::write(&data, serde_json::to_string(&conv).unwrap()).unwrap();
    let base = crate::train::config(data.clone());
    let cfg = bpo::train::SftConfig {
        setup: bpo::train::ModelSetup { model: f16_model(tmp.path()), init_adapter: None, lora: None, ..base.setup },
        data,
        images: base.images,
        max_length: 2048,
        feature_cache_mb: 16,
        optim: LoopConfig { lr: 1e-3, epochs: 4, batch_size: 2, ..base.optim },
    };
    let curve = |out: &Path, resume: bool, stop_after: Option<usize>| {
        let mut rec = crate::train::Record { stop_after, ..Default::default() };
        bpo::train::sft::train(&cfg, out, resume, None, &mut rec, &Silent).unwrap();
        rec.logs.iter().map(|l| (l.get("loss").unwrap(), l.get("grad_norm").unwrap())).collect::<Vec<_>>()
    };
    let whole = curve(&tmp.path().join("whole"), false, None);
    let parts = tmp.path().join("parts");
    let mut resumed = curve(&parts, false, Some(3));
    resumed.extend(curve(&parts, true, None));
    assert_eq!(whole.len(), 8);
    assert_eq!(resumed, whole, "losses and gradient norms equal, bit for bit");
}
