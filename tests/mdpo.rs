//! mDPO (`bpo train --objective mdpo`) on the tiny fixture model: the image-side rows are the chosen answers given
//! the noised image, the loss at policy = reference is 3 ln 2, each term's gradient matches finite differences,
//! a resumed run and a precomputed reference reproduce the curve, and the command line.

use std::path::Path;

use bpo::model::{LoadOptions, Pass, Vlm};
use bpo::text::{PromptStyle, Template};
use bpo::train::dpo::{Dpo, DpoConfig, Mdpo, MdpoConfig, Reference};
use bpo::train::loss::MdpoLoss;
use bpo::train::trainer::StepLog;
use bpo::train::ModelSetup;
use bpo::vision::{AspectMode, NoiseSchedule};
use candle_core::Tensor;

use crate::train::{config, overfit_pairs, resume_config, resumes_exactly, run, Record};
use crate::util::{bpo, fails_with, fixture, read_json, s};

const LN_2: f64 = std::f64::consts::LN_2;

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: {got}, expected {want}");
}

fn mdpo(cfg: DpoConfig, m: MdpoConfig) -> DpoConfig {
    DpoConfig { mdpo: Some(m), ..cfg }
}

/// A [`Dpo`] on the fixture pairs with fresh LoRA (r 4) and mDPO at `noise_step`, reference adapters off.
fn tiny_mdpo(noise_step: usize) -> (Dpo, bpo::train::trainable::Trainable) {
    let cfg = config(fixture("dpo/pairs.jsonl"));
    let setup = ModelSetup { init_adapter: None, prompt_style: PromptStyle::Llava, ..cfg.setup };
    let prepared = bpo::train::setup::prepare_model(&setup, 0).unwrap();
    let (pairs, _) = bpo::train::data::read_preference_file(&cfg.data, &Default::default()).unwrap();
    let (examples, _) = bpo::train::data::tokenize_pairs(&prepared.vlm, &pairs, cfg.images.as_deref(), 2048).unwrap();
    let m = MdpoConfig { noise_step, ..Default::default() };
    let side = Mdpo::new(&m, &examples, 0, cfg.images.as_deref()).unwrap();
    let reference = Reference::AdaptersOff { projector: prepared.start_projector };
    let mut dpo = Dpo::new(prepared.vlm, examples, reference, Default::default(), 16);
    dpo.mdpo = Some(side);
    (dpo, prepared.trainable)
}

fn value(m: &bpo::train::trainer::Metrics, name: &str) -> f64 {
    let at = m.names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no metric {name}"));
    f64::from(m.values.to_vec1::<f32>().unwrap()[at])
}

#[test]
fn image_side_rows_are_the_chosen_answers_given_the_noised_image() {
    let (mut dpo, _) = tiny_mdpo(700);
    let batch: Vec<usize> = (0..dpo.examples.len()).collect();
    let metrics = dpo.evaluate(&batch).unwrap();
    // The same answers scored as whole sequences, the image noised as `bpo distort` does it.
    let mut vlm = Vlm::load(&fixture("llava-tiny"), &LoadOptions::default(), Template::LlavaHf).unwrap();
    vlm.aspect = AspectMode::Square; // as the run's config
    let noise = &dpo.mdpo.as_ref().unwrap().noise;
    let rows: Vec<bpo::score::Example> = dpo
        .examples
        .iter()
        .zip(noise)
        .map(|(e, n)| {
            let x = vlm.load_image(e.image.as_ref().unwrap()).unwrap();
            let image = Some(NoiseSchedule::default().weaken(&x, n.step, n.seed).unwrap());
            bpo::score::Example { prompt: e.prompt.clone(), response: e.chosen.clone(), image }
        })
        .collect();
    let scores = bpo::score::score(&vlm.model, vlm.tok.pad, &rows, 8, Pass::BASE, &bpo::progress::Silent).unwrap();
    let mean = scores.iter().map(|s| f64::from(s.0)).sum::<f64>() / scores.len() as f64;
    close(value(&metrics, "logps/imageless_chosen"), mean, 1e-4, "logps/imageless_chosen");
    // The noise changes what the model sees: the chosen answers' log-probs move.
    let moved = (value(&metrics, "logps/imageless_chosen") - value(&metrics, "logps/chosen")).abs();
    assert!(moved > 1e-3, "the corrupted image changed nothing ({moved})");
    // Pairs of one image share its noise; the seeds differ between images.
    let (ex, n) = (&dpo.examples, noise);
    for i in 0..ex.len() {
        for j in 0..ex.len() {
            assert_eq!(ex[i].image == ex[j].image, n[i] == n[j], "pairs {i} and {j}");
        }
    }
}

#[test]
fn policy_equal_to_reference_gives_3_ln_2() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = mdpo(config(fixture("dpo/pairs.jsonl")), MdpoConfig::default());
    cfg.setup.init_adapter = None; // fresh LoRA: B = 0, so the policy starts as the base model
    let mut rec = Record::default();
    run(&cfg, tmp.path(), false, &mut rec);
    let log = &rec.logs[0];
    close(log.get("loss").unwrap(), 3.0 * LN_2, 2e-6, "loss");
    for term in ["loss/dpo", "loss/conditional", "loss/anchor"] {
        close(log.get(term).unwrap(), LN_2, 1e-6, term);
    }
    for reward in ["rewards/chosen", "rewards/rejected", "rewards/imageless_chosen", "rewards/imageless_margins"] {
        close(log.get(reward).unwrap(), 0.0, 1e-6, reward);
    }
    assert!(log.get("logps/imageless_chosen").unwrap() != log.get("logps/chosen").unwrap());
    assert!(log.get("grad_norm").unwrap() > 0.0, "B = 0 still gets a gradient");
    let recorded = read_json(&tmp.path().join("train_config.json"));
    assert_eq!(
        recorded["mdpo"],
        serde_json::json!({"conditional_weight": 1.0, "anchor_weight": 1.0, "anchor_delta": 0.0, "noise_step": 900})
    );
}

/// Sets every LoRA B to small seeded values, so the policy differs from the reference.
fn move_policy(trainable: &bpo::train::trainable::Trainable) {
    for (i, (name, var)) in trainable.lora.iter().enumerate() {
        if name.contains("lora_B") {
            let t = var.as_tensor();
            let n = t.elem_count();
            let v: Vec<f32> = (0..n).map(|k| (((k * 7919 + i * 104729) % 997) as f32 / 997.0 - 0.5) * 0.2).collect();
            var.set(&Tensor::from_vec(v, t.shape(), t.device()).unwrap().to_dtype(t.dtype()).unwrap()).unwrap();
        }
    }
}

#[test]
fn each_terms_gradient_matches_finite_differences_on_the_tiny_model() {
    let (mut dpo, trainable) = tiny_mdpo(900);
    move_policy(&trainable);
    let vars = trainable.vars();
    let batch: Vec<usize> = (0..dpo.examples.len()).collect();
    let none = MdpoLoss { conditional_weight: 0.0, anchor_weight: 0.0, anchor_delta: 0.5 };
    let set = |dpo: &mut Dpo, m: MdpoLoss| dpo.mdpo.as_mut().unwrap().loss = m;
    // A term alone: the loss with it minus the loss without it (the DPO term: the loss with both weights 0).
    let terms = [
        ("dpo", none, None),
        ("conditional", MdpoLoss { conditional_weight: 1.0, ..none }, Some(none)),
        ("anchor", MdpoLoss { anchor_weight: 1.0, ..none }, Some(none)),
    ];
    for (name, with, without) in terms {
        let grad = |dpo: &mut Dpo, m: MdpoLoss| {
            set(dpo, m);
            let grads = dpo.loss_with_graph(&batch).unwrap().backward().unwrap();
            vars.iter()
                .map(|(_, v)| grads.get(v.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .map(|g| g.unwrap_or_else(|| vec![0.0; 0]))
                .collect::<Vec<_>>()
        };
        let mut g = grad(&mut dpo, with);
        if let Some(w) = without {
            let g0 = grad(&mut dpo, w);
            for (a, b) in g.iter_mut().zip(&g0) {
                a.iter_mut().zip(b).for_each(|(x, y)| *x -= y);
            }
        }
        let norm = g.iter().flatten().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 1e-4, "{name}: no gradient ({norm})");
        // The term along its own gradient: (L(x + h u) - L(x - h u)) / 2h = |g| for the unit direction u.
        let h = 5e-3 / norm;
        let start: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
        let term_at = |dpo: &mut Dpo, step: f64| {
            for (((_, v), x0), gi) in vars.iter().zip(&start).zip(&g) {
                if gi.is_empty() {
                    continue;
                }
                let d = Tensor::from_vec(gi.clone(), x0.shape(), x0.device()).unwrap();
                v.set(&(x0 + (d * (step / norm)).unwrap()).unwrap()).unwrap();
            }
            let mut loss = |m: MdpoLoss| {
                set(dpo, m);
                value(&dpo.evaluate(&batch).unwrap(), "loss")
            };
            loss(with) - without.map_or(0.0, &mut loss)
        };
        let fd = (term_at(&mut dpo, h) - term_at(&mut dpo, -h)) / (2.0 * h);
        term_at(&mut dpo, 0.0);
        assert!((fd - norm).abs() < 0.02 * norm, "{name}: finite differences {fd}, autograd {norm}");
    }
}

/// Loss, gradient norm and learning rate per step.
fn curve(logs: &[StepLog]) -> Vec<(usize, f64, f64, f64)> {
    logs.iter()
        .map(|l| (l.step, l.get("loss").unwrap(), l.get("grad_norm").unwrap(), l.get("learning_rate").unwrap()))
        .collect()
}

#[test]
fn resumed_mdpo_run_reproduces_the_uninterrupted_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = mdpo(resume_config(tmp.path()), MdpoConfig { noise_step: 500, ..Default::default() });
    let (report, a) = resumes_exactly(&cfg, tmp.path());
    assert_eq!(report.images_encoded, 6, "three images, clean and corrupted, each encoded once for the run");
    // Another seed draws other noise: the curve moves.
    let other = DpoConfig { optim: bpo::train::LoopConfig { seed: 6, ..cfg.optim.clone() }, ..cfg.clone() };
    let mut d = Record::default();
    run(&other, &tmp.path().join("other"), false, &mut d);
    assert_ne!(d.logs[0].get("logps/imageless_chosen"), a.logs[0].get("logps/imageless_chosen"));
}

#[test]
fn precomputed_reference_gives_the_same_mdpo_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = mdpo(config(overfit_pairs(tmp.path())), MdpoConfig { noise_step: 999, ..Default::default() });
    cfg.setup = ModelSetup { init_adapter: None, prompt_style: PromptStyle::Llava, ..cfg.setup };
    cfg.optim = bpo::train::LoopConfig { epochs: 2, batch_size: 8, ..cfg.optim };
    let curves: Vec<Vec<(f64, f64)>> = [false, true]
        .iter()
        .map(|&pre| {
            let mut rec = Record::default();
            let c = DpoConfig { precompute_ref: pre, ..cfg.clone() };
            run(&c, &tmp.path().join(format!("run-{pre}")), false, &mut rec);
            rec.logs.iter().map(|l| (l.get("loss").unwrap(), l.get("rewards/imageless_chosen").unwrap())).collect()
        })
        .collect();
    assert_eq!(curves[0].len(), 4);
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!((a.0 - b.0).abs() < 1e-5 && (a.1 - b.1).abs() < 1e-5, "{:?} vs {:?}", curves[0], curves[1]);
    }
    let rows = std::fs::read_to_string(tmp.path().join("run-true/ref_logps.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert!(first["imageless_chosen"].as_f64().is_some(), "{first}");
    assert!(curves[0][3].0 < curves[0][0].0, "the loss falls: {:?}", curves[0]);
}

#[test]
fn gradient_checkpointing_gives_the_same_mdpo_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = mdpo(resume_config(tmp.path()), MdpoConfig::default());
    let curves: Vec<Vec<(usize, f64, f64, f64)>> = [false, true]
        .iter()
        .map(|&on| {
            let mut c = cfg.clone();
            c.setup.gradient_checkpointing = on;
            c.optim.epochs = 1;
            let mut rec = Record::default();
            run(&c, &tmp.path().join(format!("run-{on}")), false, &mut rec);
            curve(&rec.logs)
        })
        .collect();
    assert_eq!(curves[0].len(), 2);
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!((a.1 - b.1).abs() < 1e-6 && (a.2 - b.2).abs() < 1e-6, "{:?} vs {:?}", curves[0], curves[1]);
    }
}

/// `bpo train` on the tiny model with `extra` options.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    let base = ["train", "--model", s(&model), "--data", s(data), "--images", s(&images), "--out", s(out)];
    let small = ["--lora-rank", "4", "--epochs", "1", "--batch-size", "16"];
    base.iter().chain(&small).chain(extra).map(|a| a.to_string()).collect()
}

#[test]
fn cli_trains_with_mdpo_and_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = overfit_pairs(tmp.path());
    let run_dir = tmp.path().join("run");
    let call = |a: Vec<String>| bpo(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let refused =
        |a: Vec<String>, needles: &[&str]| fails_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), needles);
    let extra = ["--objective", "mdpo", "--mdpo-noise-step", "500", "--mdpo-anchor-delta", "-0.5"];
    let o = call(train_args(&pairs, &run_dir, &extra));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let log: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["loss/conditional", "loss/anchor", "rewards/imageless_accuracies", "logps/imageless_chosen"] {
        assert!(log[key].as_f64().is_some_and(f64::is_finite), "{key}: {log}");
    }
    let cfg = read_json(&run_dir.join("train_config.json"));
    assert_eq!((cfg["mdpo"]["noise_step"].as_u64(), cfg["mdpo"]["anchor_delta"].as_f64()), (Some(500), Some(-0.5)));
    let out = |name: &str| tmp.path().join(name);
    refused(train_args(&pairs, &out("a"), &["--objective", "mdpo", "--mdpo-noise-step", "1000"]), &["noise step 1000"]);
    refused(
        train_args(&pairs, &out("b"), &["--mdpo-anchor-weight", "2"]),
        &["--mdpo-anchor-weight", "--objective mdpo"],
    );
    let negative = ["--objective", "mdpo", "--mdpo-conditional-weight=-1"];
    refused(train_args(&pairs, &out("c"), &negative), &["conditional-weight"]);
    // A pair without an image has no image side.
    let text_only = tmp.path().join("text.jsonl");
    std::fs::write(&text_only, "{\"id\": \"t1\", \"prompt\": \"hi\", \"chosen\": \"red\", \"rejected\": \"blue\"}\n")
        .unwrap();
    refused(train_args(&text_only, &out("d"), &["--objective", "mdpo"]), &["needs an image in every pair", "t1"]);
}

#[test]
fn loss_metrics_and_gradients_match_mdpos_released_trainer() {
    // scripts/make_mdpo_fixtures.py: the released mDPOTrainer's get_batch_metrics and dpo_loss on fixed log-probs.
    let r = read_json(&fixture("mdpo/released-loss.json"));
    let v = |key: &str| -> Vec<f32> { r[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let t = |key: &str| Tensor::new(v(key), &candle_core::Device::Cpu).unwrap();
    let var = |key: &str| candle_core::Var::from_tensor(&t(key)).unwrap();
    let (pc, pr, pi) = (var("policy_chosen"), var("policy_rejected"), var("policy_imageless_chosen"));
    let n = v("policy_chosen").len();
    let lp = bpo::train::PairLogps {
        chosen: pc.as_tensor().clone(),
        rejected: pr.as_tensor().clone(),
        ref_chosen: t("reference_chosen"),
        ref_rejected: t("reference_rejected"),
        chosen_tokens: Tensor::ones(n, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        rejected_tokens: Tensor::ones(n, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    };
    let side = bpo::train::loss::CorruptedLogps {
        chosen: pi.as_tensor().clone(),
        ref_chosen: t("reference_imageless_chosen"),
    };
    let cfg = bpo::train::DpoLoss { beta: r["beta"].as_f64().unwrap(), ..Default::default() };
    let out = bpo::train::loss::mdpo_loss(&lp, &side, &cfg, &MdpoLoss::default()).unwrap();
    let metrics = bpo::train::dpo::mdpo_metrics(&lp, &side, &out, n, 0).unwrap();
    close(value(&metrics, "loss"), r["loss"].as_f64().unwrap(), 1e-5, "loss");
    let released = r["metrics"].as_object().unwrap();
    assert_eq!(released.len(), 10, "the released trainer's metrics without its logits means");
    for (name, want) in released {
        close(value(&metrics, name), want.as_f64().unwrap(), 1e-5, name);
    }
    let grads = out.loss.backward().unwrap();
    for (var, key) in
        [(&pc, "grad_policy_chosen"), (&pr, "grad_policy_rejected"), (&pi, "grad_policy_imageless_chosen")]
    {
        let got: Vec<f32> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(v(key)) {
            close(f64::from(*g), f64::from(w), 1e-6, key);
        }
    }
}
