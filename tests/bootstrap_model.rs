//! Bootstrap stage with a real (tiny, random-weight) model: image weakening and local error injection through the
//! binary and the library, resume after a kill or a torn line, shards, the contrast decoding modes, and the
//! records → pairs hand-off in all three layouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bpo::bootstrap::{run_weaken, Completer, CompletionOptions, DecodeMode, LocalCompleter, WeakenOptions};
use bpo::data::pairs::read_record_shards;
use bpo::data::{expand, read_input, read_pairs, CompletionType, InputOptions, PairOptions, Record, ResumableWriter};
use bpo::generate::{generate, Combine, Engine, EngineOptions, Request, SamplingParams};
use bpo::model::Vlm;
use bpo::model::{LoadOptions, Pass};
use bpo::progress::Silent;
use bpo::text::{Chat, Template};
use bpo::vision::weaken;
use serde_json::{json, Value};

use crate::util::{bpo, fails_with, fixture, s};

const IMAGES: [&str; 5] = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "gray.png"];

/// LLaVA instruct JSON: `n` conversations over the fixture images (every third with a second turn), plus one
/// text-only conversation. Returns the path and the number of exchanges.
fn llava_data(dir: &Path, n: usize) -> (PathBuf, usize) {
    let mut rows = Vec::new();
    let mut exchanges = 1;
    for i in 0..n {
        let mut conv = vec![
            json!({"from": "human", "value": format!("<image>\nWhat is in picture {i}?")}),
            json!({"from": "gpt", "value": format!("Picture {i} shows a red bus parked next to a tree.")}),
        ];
        if i % 3 == 0 {
            conv.push(json!({"from": "human", "value": "What color is the bus?"}));
            conv.push(json!({"from": "gpt", "value": "The bus is red with white stripes."}));
            exchanges += 1;
        }
        rows.push(json!({"id": format!("img{i}"), "image": IMAGES[i % IMAGES.len()], "conversations": conv}));
        exchanges += 1;
    }
    rows.push(json!({"id": "text", "conversations": [
        {"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "An apple is a fruit."}]}));
    let path = dir.join("llava.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    (path, exchanges)
}

fn records(path: &Path) -> Vec<Record> {
    bpo::jsonl::read::<Record>(path).unwrap()
}

/// How often each id appears in a record file.
fn id_counts(paths: &[&Path]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for p in paths {
        for r in records(p) {
            *counts.entry(r.id).or_insert(0) += 1;
        }
    }
    counts
}

fn assert_every_id_once(paths: &[&Path], input: &[Record]) {
    let counts = id_counts(paths);
    assert_eq!(counts.len(), input.len(), "{counts:?}");
    for r in input {
        assert_eq!(counts.get(&r.id), Some(&1), "{}", r.id);
    }
}

/// Runs `bpo args`, expects success, returns the JSON counts it printed.
fn run_ok<S: AsRef<str>>(args: &[S]) -> Value {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = bpo(&args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `bpo bootstrap weaken` on the tiny LLaVA and the fixture images (6 new tokens unless `extra` says), then `extra`.
fn weaken_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    let mut args = vec!["bootstrap", "weaken", "--model", s(&model), "--data", s(data), "--images", s(&images)];
    args.extend(["--out", s(out)]);
    if !extra.contains(&"--max-new-tokens") {
        args.extend(["--max-new-tokens", "6"]);
    }
    args.extend(extra);
    args.into_iter().map(String::from).collect()
}

fn fails<S: AsRef<str>>(args: &[S], needles: &[&str]) {
    fails_with(&args.iter().map(AsRef::as_ref).collect::<Vec<_>>(), needles);
}

fn tiny() -> Vlm {
    Vlm::load(&fixture("llava-tiny"), &LoadOptions::default(), Template::VicunaV1).unwrap()
}

#[test]
fn weaken_inject_pairs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (data, n) = llava_data(dir.path(), 4);
    let weak = dir.path().join("weak.jsonl");
    let c = run_ok(&weaken_args(&data, &weak, &["--samples", "2", "--batch-size", "3", "--decode", "vcd"]));
    let images = n - 1;
    assert_eq!((c["records"]["written"].as_u64(), c["text_only"].as_u64()), (Some(n as u64), Some(1)));
    assert_eq!(c["generated"].as_u64(), Some(2 * images as u64));
    let sum = ["added", "empty", "identical", "duplicate"].iter().map(|k| c[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum, c["generated"].as_u64().unwrap());
    for r in records(&weak) {
        let kinds: Vec<_> = r.completions.iter().map(|c| c.kind.clone()).collect();
        assert_eq!(kinds[0], CompletionType::Gt, "{}", r.id);
        let hal = kinds.iter().filter(|k| **k == CompletionType::MllmHal).count();
        assert!(if r.image.is_some() { (1..=2).contains(&hal) } else { hal == 0 }, "{}: {kinds:?}", r.id);
    }

    // Error injection with the MLLM's own language model, in `continue` and `description` modes.
    let llm = fixture("llava-tiny");
    let cont = dir.path().join("cont.jsonl");
    let base = ["bootstrap", "inject", "--llm", s(&llm), "--max-tokens", "8", "--seed", "1"];
    let c = run_ok(&[&base[..], &["--data", s(&weak), "--out", s(&cont), "--mode", "continue"]].concat());
    assert_eq!((c["requests"].as_u64(), c["records"]["written"].as_u64()), (Some(n as u64), Some(n as u64)));
    assert!(c["added"].as_u64().unwrap() >= 1, "{c}");
    let template = dir.path().join("short.txt");
    std::fs::write(&template, "Add a mistake: {answer}\nModified:").unwrap();
    let desc = dir.path().join("desc.jsonl");
    let c = run_ok(&[&base[..], &["--data", s(&cont), "--out", s(&desc), "--prompt-file", s(&template)]].concat());
    assert_eq!(c["unparseable"].as_u64(), Some(0), "the short prompt fits the tiny context: {c}");
    assert!(c["added"].as_u64().unwrap() >= 1, "{c}");
    let done = records(&desc);
    assert_eq!(done.len(), n);
    assert!(done.iter().any(|r| r.completions.iter().filter(|c| c.kind == CompletionType::LlmHal).count() == 2));
    for r in &done {
        for c in &r.completions[1..] {
            assert_eq!(c.score, 0.0);
            assert_ne!(c.response.trim(), r.completions[0].response, "{}", r.id);
        }
    }

    // Pairs in every layout, read back.
    let (want, _) = expand(&done, &PairOptions::default());
    assert!(want.len() > n);
    for format in ["bpo", "trl", "llama-factory"] {
        let out = dir.path().join(format!("{format}.jsonl"));
        let o = bpo(&["pairs", "--records", s(&desc), "--out", s(&out), "--format", format]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let back = read_pairs(&out).unwrap();
        assert_eq!(back.len(), want.len(), "{format}");
        for (b, w) in back.iter().zip(&want) {
            assert_eq!((&b.prompt, &b.image, &b.chosen, &b.rejected), (&w.prompt, &w.image, &w.chosen, &w.rejected));
        }
    }
}

#[test]
fn weaken_resumed_after_a_torn_line_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = llava_data(dir.path(), 5);
    let input = read_input(&data, &InputOptions::default()).unwrap().records;
    let vlm = tiny();
    let opts = WeakenOptions {
        images: fixture("images"),
        samples: 2,
        max_new_tokens: 6,
        temperature: 1.0,
        batch_size: 1,
        seed: 7,
        ..Default::default()
    };
    let whole = dir.path().join("whole.jsonl");
    let (mut w, _) = ResumableWriter::open(&whole).unwrap();
    run_weaken(&vlm, input.clone(), &opts, &mut w, &Silent).unwrap();

    // Interrupted: a first run over part of the input, its last line torn as by kill -9, then the full run.
    let resumed = dir.path().join("resumed.jsonl");
    let (mut w, _) = ResumableWriter::open(&resumed).unwrap();
    run_weaken(&vlm, input[..4].to_vec(), &opts, &mut w, &Silent).unwrap();
    drop(w);
    let text = std::fs::read_to_string(&resumed).unwrap();
    std::fs::write(&resumed, &text[..text.len() - 10]).unwrap();
    let (mut w, rep) = ResumableWriter::open(&resumed).unwrap();
    assert_eq!((rep.lines, rep.torn.is_some()), (3, true));
    let c = run_weaken(&vlm, input.clone(), &opts, &mut w, &Silent).unwrap();
    assert_eq!((c.records.already_done, c.records.written), (3, input.len() - 3));
    assert_every_id_once(&[&resumed], &input);

    let by_id = |p: &Path| records(p).into_iter().map(|r| (r.id.clone(), r)).collect::<HashMap<_, _>>();
    assert_eq!(by_id(&resumed), by_id(&whole), "same seeds, same answers");
    // Another seed draws other noise and other tokens.
    let other = dir.path().join("other.jsonl");
    let (mut w, _) = ResumableWriter::open(&other).unwrap();
    run_weaken(&vlm, input, &WeakenOptions { seed: 8, ..opts }, &mut w, &Silent).unwrap();
    assert_ne!(by_id(&other), by_id(&whole));
}

#[test]
fn weaken_killed_midway_then_rerun_finds_every_id_once() {
    let dir = tempfile::tempdir().unwrap();
    let (data, n) = llava_data(dir.path(), 30);
    let out = dir.path().join("out.jsonl");
    let args = weaken_args(&data, &out, &["--batch-size", "1", "--max-new-tokens", "24", "--temperature", "1"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill (SIGKILL) as soon as the first record is on disk.
    while std::fs::read_to_string(&out).map_or(true, |t| !t.contains('\n')) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().ok();
    child.wait().unwrap();
    let before = std::fs::read_to_string(&out).unwrap();
    let complete = before.matches('\n').count();
    assert!(complete >= 1);
    let c = run_ok(&args);
    assert_eq!(c["records"]["already_done"].as_u64(), Some(complete as u64));
    assert_eq!(c["records"]["written"].as_u64(), Some((n - complete) as u64));
    let input = read_input(&data, &InputOptions::default()).unwrap().records;
    assert_every_id_once(&[&out], &input);
    let after = std::fs::read_to_string(&out).unwrap();
    let kept = before.rfind('\n').map_or(0, |i| i + 1);
    assert_eq!(after[..kept], before[..kept], "lines written before the kill are untouched");
}

#[test]
fn weaken_shards_cover_every_id_once() {
    let dir = tempfile::tempdir().unwrap();
    let (data, n) = llava_data(dir.path(), 6);
    let (a, b) = (dir.path().join("s1.jsonl"), dir.path().join("s2.jsonl"));
    let ca = run_ok(&weaken_args(&data, &a, &["--shard", "1/2"]));
    let cb = run_ok(&weaken_args(&data, &b, &["--shard", "2/2"]));
    let written = |c: &Value| c["records"]["written"].as_u64().unwrap() as usize;
    assert_eq!(written(&ca) + written(&cb), n);
    assert!(written(&ca) > 0 && written(&cb) > 0, "both shards get work: {ca} {cb}");
    assert_eq!(ca["records"]["other_shards"].as_u64(), Some(written(&cb) as u64));
    let input = read_input(&data, &InputOptions::default()).unwrap().records;
    assert_every_id_once(&[&a, &b], &input);
    assert_eq!(read_record_shards(&[a, b]).unwrap().len(), n);
}

#[test]
fn weaken_counts_an_unreadable_image_and_retries_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, n) = llava_data(dir.path(), 3);
    let input = read_input(&data, &InputOptions::default()).unwrap().records;
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for name in &IMAGES[..2] {
        std::fs::copy(fixture("images").join(name), images.join(name)).unwrap();
    }
    let out = dir.path().join("out.jsonl");
    let vlm = tiny();
    let opts = WeakenOptions { images: images.clone(), max_new_tokens: 4, ..Default::default() };
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let c = run_weaken(&vlm, input.clone(), &opts, &mut w, &Silent).unwrap();
    assert_eq!((c.image_failed, c.records.failed, c.records.written), (1, 1, n - 1));
    assert!(c.errors[0].contains("img2#0") && c.errors[0].contains("astronaut.png"), "{:?}", c.errors);
    std::fs::copy(fixture("images").join(IMAGES[2]), images.join(IMAGES[2])).unwrap();
    let c = run_weaken(&vlm, input.clone(), &opts, &mut w, &Silent).unwrap();
    assert_eq!((c.records.already_done, c.records.written), (n - 1, 1));
    assert_every_id_once(&[&out], &input);
}

#[test]
fn contrast_decoding_differs_from_noisy_and_collapses_on_equal_images() {
    let vlm = tiny();
    let clean = vlm.load_image(&fixture("images/chelsea.png")).unwrap();
    let noisy = weaken(&clean, 900, 3).unwrap();
    let ids = vlm.prompt_ids("Describe the image.", true).unwrap();
    let params = SamplingParams { max_new_tokens: 8, ..Default::default() }; // greedy
    let req = |image: &candle_core::Tensor, contrast: Option<&candle_core::Tensor>| Request {
        ids: ids.clone(),
        image: Some(image.clone()),
        params: params.clone(),
        contrast: contrast.cloned(),
        ..Default::default()
    };
    let run = |request: Request, combine: Option<Combine>| {
        let mut engine = Engine::new(&vlm.model, &vlm.tok, EngineOptions::default(), Pass::INFER).unwrap();
        if let Some(c) = combine {
            engine = engine.with_combine(c);
        }
        engine.generate_all(vec![request]).unwrap()[0].ids.clone()
    };
    let plain_noisy = run(req(&noisy, None), None);
    let plain_clean = generate(&vlm.model, &vlm.tok, vec![req(&clean, None)], &EngineOptions::default(), Pass::INFER)
        .unwrap()[0]
        .ids
        .clone();
    for mode in [DecodeMode::PriorContrast { a: 1.0 }, DecodeMode::RELEASED] {
        let mix = move |c: &[f32], n: &[f32]| mode.mix(c, n);
        let mixed = run(req(&clean, Some(&noisy)), Some(&mix));
        assert_ne!(mixed, plain_noisy, "{mode:?} must differ from sampling the noisy image alone");
        // Both rows see the clean image: prior contrast is the identity, VCD keeps the greedy token.
        let same = run(req(&clean, Some(&clean)), Some(&mix));
        assert_eq!(same, plain_clean, "{mode:?} with clean == noisy");
    }
    assert_eq!(DecodeMode::PriorContrast { a: 1.0 }.mix(&[1.5, -2.0], &[1.5, -2.0]), vec![1.5, -2.0]);
}

#[test]
fn local_completer_runs_the_llava_language_model_and_keeps_the_leading_space() {
    let local = LocalCompleter::load(&fixture("llava-tiny"), &LoadOptions::default(), 2).unwrap();
    assert!(local.vlm.model.vision.is_none(), "only the language model is loaded");
    let prompts: Vec<String> =
        ["A cat sits on", "The red bus is parked next to", "Two"].iter().map(|p| p.to_string()).collect();
    let opts = CompletionOptions { temperature: 0.0, max_tokens: 6, ..Default::default() };
    let got = local.complete(&prompts, &opts).unwrap();
    // The full LLaVA model on the same text-only prompts gives the same tokens.
    let mut full = tiny();
    full.chat = Chat::Builtin(Template::Plain);
    for (prompt, out) in prompts.iter().zip(got) {
        let ids = full.prompt_ids(prompt, false).unwrap();
        let params = SamplingParams { max_new_tokens: 6, ..Default::default() };
        let request = Request { ids: ids.clone(), params: params.clone(), ..Default::default() };
        let c = full.answer(vec![request], Pass::INFER).unwrap();
        let whole = full.tok.decode(&[&ids[..], &c[0].ids[..]].concat()).unwrap();
        let out = out.unwrap();
        assert_eq!(format!("{prompt}{out}"), whole, "prompt + output reads as the model wrote it");
        assert_eq!(out.trim_start(), c[0].text.trim_start());
    }
    // Sampling is seeded per prompt: the same prompt gives the same text in another batch.
    let opts = CompletionOptions { max_tokens: 6, seed: Some(5), ..Default::default() };
    let alone = local.complete(&prompts[1..2], &opts).unwrap().remove(0).unwrap();
    let batched = local.complete(&prompts, &opts).unwrap().remove(1).unwrap();
    assert_eq!(alone, batched);
}

#[test]
fn local_completer_on_a_llama_folder_reports_prompts_that_do_not_fit() {
    let local = LocalCompleter::load(&fixture("llama-tiny"), &LoadOptions::default(), 8).unwrap();
    let context = local.vlm.model.llm.cfg.max_position_embeddings;
    let prompts = vec!["A small dog".to_string(), "word ".repeat(context + 10), "A blue cup".to_string()];
    let opts = CompletionOptions { max_tokens: 4, ..Default::default() };
    let got = local.complete(&prompts, &opts).unwrap();
    assert!(got[0].is_ok() && got[2].is_ok());
    let err = got[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
}

#[test]
fn bootstrap_cli_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = llava_data(dir.path(), 1);
    let out = dir.path().join("o.jsonl");
    let inject = ["bootstrap", "inject", "--data", s(&data), "--out", s(&out)];
    fails_with(&inject, &["--llm", "--llm-url"]);
    let llm = fixture("llava-tiny");
    let o = bpo(&[&inject[..], &["--llm", s(&llm), "--chat"]].concat());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    let mut args = weaken_args(&data, &out, &[]);
    args[3] = s(&fixture("llama-tiny")).to_string();
    fails(&args, &["vision tower"]);
    fails(&weaken_args(&data, &out, &["--noise-step", "1000"]), &["--noise-step", "1000 is not in 0..=999"]);
    fails(&weaken_args(&data, &out, &["--decode", "vcd", "--vcd-beta", "0"]), &["beta"]);
}

#[test]
fn generation_never_emits_the_image_placeholder() {
    let vlm = tiny();
    let image_token = vlm.model.image_token().unwrap();
    let clean = vlm.load_image(&fixture("images/gray.png")).unwrap();
    let params = SamplingParams { max_new_tokens: 5, ..Default::default() };
    let ids = vlm.prompt_ids("What is this?", true).unwrap();
    let request = Request { ids, image: Some(clean.clone()), params, contrast: Some(clean), ..Default::default() };
    // A combine that makes `<image>` by far the most likely token: it must still never be chosen (fed back, it
    // would ask for an image that is not there).
    let favour = move |c: &[f32], _: &[f32]| {
        let mut v = c.to_vec();
        v[image_token as usize] = 1e9;
        v
    };
    let mut engine =
        Engine::new(&vlm.model, &vlm.tok, EngineOptions::default(), Pass::INFER).unwrap().with_combine(&favour);
    let out = engine.generate_all(vec![request]).unwrap();
    assert!(!out[0].ids.is_empty() && !out[0].ids.contains(&image_token), "{:?}", out[0].ids);
}

#[test]
fn weaken_writes_the_records_of_the_static_batches_it_replaced() {
    // tests/fixtures/weaken: records written by `bpo bootstrap weaken` before the engine (static batches, see
    // SOURCES.md), sampled with fixed seeds. The engine must write the same records, whatever its batch size.
    let data = fixture("weaken/data.json");
    let input = read_input(&data, &InputOptions::default()).unwrap().records;
    let vlm = tiny();
    let dir = tempfile::tempdir().unwrap();
    let by_id = |p: &Path| records(p).into_iter().map(|r| (r.id.clone(), r)).collect::<HashMap<_, _>>();
    for (name, decode) in [
        ("noisy", DecodeMode::Noisy),
        ("vcd", DecodeMode::RELEASED),
        ("prior-contrast", DecodeMode::PriorContrast { a: 1.0 }),
    ] {
        let want = by_id(&fixture(&format!("weaken/{name}.jsonl")));
        for batch_size in [1, 4] {
            let out = dir.path().join(format!("{name}-{batch_size}.jsonl"));
            let opts = WeakenOptions {
                images: fixture("images"),
                samples: 2,
                temperature: 1.0,
                seed: 7,
                max_new_tokens: 12,
                batch_size,
                decode,
                ..Default::default()
            };
            let (mut w, _) = ResumableWriter::open(&out).unwrap();
            run_weaken(&vlm, input.clone(), &opts, &mut w, &Silent).unwrap();
            assert_eq!(by_id(&out), want, "{name}, batch {batch_size}");
        }
    }
}
