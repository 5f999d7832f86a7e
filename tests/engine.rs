//! The generation engine on the tiny checkpoints: continuous batching gives the answers of one-at-a-time generation
//! (greedy, and sampled with per-request seeds, in any batch or arrival order), chunked prefill and a tight cache
//! budget change nothing but the schedule, static and continuous batching agree; and through the binary,
//! `generate --questions` answers the same whatever its batch size, file order or interruption, with a peak memory
//! that does not grow with the number of questions.

use std::path::Path;
use std::process::{Command, Stdio};

use bpo::generate::{generate, Engine, EngineOptions, Policy, Request, SamplingParams};
use bpo::model::{Inputs, LoadOptions, Model, Pass, Runtime, Vlm};
use bpo::text::Template;
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::util::{fixture, s};

/// Small images: decoding the large fixture photos would take most of the tests' time.
const IMAGES: [&str; 4] = ["gray.png", "small.png", "tiny.png", "alpha.png"];

fn vlm(name: &str, rt: &Runtime) -> Vlm {
    let mut vlm = Vlm::load(&fixture(name), &LoadOptions::new(rt), Template::VicunaV1).unwrap();
    vlm.tok.eos.clear(); // every request generates its full length, so that lengths differ only by design
    vlm
}

/// `n` random prompts drawn from `seed`: BOS, the image positions (every other prompt, on a vision model), 1-40
/// random text ids; 1-20 new tokens each, so that rows finish at different steps.
fn random_requests(vlm: &Vlm, n: usize, seed: u64, temperature: f32) -> Vec<Request> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let image_token = vlm.model.image_token();
    (0..n)
        .map(|i| {
            let mut ids = vec![1u32];
            let image = match image_token.filter(|_| i % 2 == 0) {
                Some(t) => {
                    ids.extend(std::iter::repeat_n(t, vlm.model.image_tokens()));
                    Some(vlm.load_image(&fixture("images").join(IMAGES[i % IMAGES.len()])).unwrap())
                }
                None => None,
            };
            let text = rng.random_range(1..=40);
            ids.extend((0..text).map(|_| rng.random_range(3..1000)));
            let params = SamplingParams {
                max_new_tokens: rng.random_range(1..=20),
                temperature,
                top_p: if temperature > 0.0 { 0.9 } else { 1.0 },
                ..Default::default()
            };
            Request { ids, image, params, seed: rng.random(), contrast: None }
        })
        .collect()
}

fn one_at_a_time(vlm: &Vlm, requests: &[Request]) -> Vec<Vec<u32>> {
    requests
        .iter()
        .map(|r| {
            let alone = generate(&vlm.model, &vlm.tok, vec![r.clone()], &EngineOptions::rows(1, None), Pass::INFER);
            alone.unwrap().remove(0).ids
        })
        .collect()
}

/// 8 rows, prefill chunks of 13 tokens (so prompts are split and share steps with decoding rows), and a cache
/// budget of three requests' worth, so that admission waits for room.
fn tight(vlm: &Vlm, requests: &[Request], policy: Policy) -> EngineOptions {
    let context = vlm.model.llm.cfg.max_position_embeddings;
    let most = requests.iter().map(|r| r.ids.len() + r.params.max_new_tokens).max().unwrap();
    EngineOptions { max_rows: 8, max_batch_tokens: Some((3 * most).min(8 * context)), prefill_chunk: 13, policy }
}

fn batched(vlm: &Vlm, requests: Vec<Request>, opts: EngineOptions) -> (Vec<Vec<u32>>, bpo::generate::EngineStats) {
    let mut engine = Engine::new(&vlm.model, &vlm.tok, opts, Pass::INFER).unwrap();
    let out = engine.generate_all(requests).unwrap().into_iter().map(|c| c.ids).collect();
    (out, engine.stats().clone())
}

/// The top two logits of `model` at each step of `want` after `request`'s prompt (teacher-forced, one full forward
/// pass without the engine), the image placeholder excluded as generation excludes it.
fn margins(model: &Model, request: &Request, want: &[u32]) -> Vec<f32> {
    let ids: Vec<u32> = request.ids.iter().chain(want).copied().collect();
    let n = ids.len();
    let inputs = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
    let images = request.image.as_ref().map(|im| im.unsqueeze(0).unwrap());
    let logits = model.forward(&Inputs { ids: &inputs, mask: &mask, images: images.as_ref() }, None, Pass::INFER);
    let rows: Vec<Vec<f32>> = logits
        .unwrap()
        .i(0)
        .unwrap()
        .narrow(0, request.ids.len() - 1, want.len())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let skip = model.image_token().map(|t| t as usize);
    rows.iter()
        .map(|r| {
            let mut v: Vec<f32> = r.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, &x)| x).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            v[0] - v[1]
        })
        .collect()
}

/// Top-two margins below this are near-ties: f32 rounding that depends on the batch's shape (about 1e-6 of the
/// logits here) may pick either token there, and the continuations may part after it.
const NEAR_TIE: f32 = 1e-4;

/// Greedy answers of the engine (8 rows, chunked prefill, a tight budget) against one-at-a-time generation: equal
/// up to the first near-tie of the one-at-a-time run, and equal outright where the runtime is batch-invariant.
fn greedy_matches_one_at_a_time(name: &str, rt: &Runtime, invariant: bool) {
    let vlm = vlm(name, rt);
    let requests = random_requests(&vlm, 64, 11, 0.0);
    let want = one_at_a_time(&vlm, &requests);
    let (got, stats) = batched(&vlm, requests.clone(), tight(&vlm, &requests, Policy::Continuous));
    assert!(stats.decode_rows > 2 * stats.decode_steps, "{name}: the batch really held several rows: {stats:?}");
    let (mut compared, mut ties) = (0, 0);
    for (i, (r, (w, g))) in requests.iter().zip(want.iter().zip(&got)).enumerate() {
        if invariant {
            assert_eq!(g, w, "{name}: request {i} differs from one-at-a-time generation");
        }
        let margins = margins(&vlm.model, r, w);
        let clear = margins.iter().position(|&m| m < NEAR_TIE).unwrap_or(w.len());
        ties += usize::from(clear < w.len());
        let upto = (clear + 1).min(w.len());
        assert_eq!(g[..upto], w[..upto], "{name}: request {i} parts from one-at-a-time before its first near-tie");
        compared += upto;
    }
    assert!(compared >= 400 && ties < 8, "{name}: compared {compared} tokens, {ties} requests met a near-tie");
}

#[test]
fn greedy_engine_answers_equal_one_at_a_time_answers() {
    // The CPU's f32 runtime is batch-invariant: equal outright. The device-generic path (what CUDA runs) batches its
    // products by shape: equal up to the first near-tie.
    greedy_matches_one_at_a_time("llava-tiny", &Runtime::default(), true);
    greedy_matches_one_at_a_time("llama-tiny", &Runtime::default(), true);
    greedy_matches_one_at_a_time("llava-tiny", &Runtime::generic(Device::Cpu, DType::F32), false);
}

#[test]
fn sampled_tokens_depend_on_the_seed_only_not_on_the_batch_or_the_order() {
    let vlm = vlm("llava-tiny", &Runtime::default());
    let requests = random_requests(&vlm, 40, 5, 1.0);
    let alone = one_at_a_time(&vlm, &requests);
    let (by8, _) = batched(&vlm, requests.clone(), tight(&vlm, &requests, Policy::Continuous));
    assert_eq!(by8, alone, "batch 8 draws the tokens of batch 1");
    let mut reversed = requests.clone();
    reversed.reverse();
    let opts = EngineOptions { prefill_chunk: 64, ..EngineOptions::rows(5, None) };
    let (mut back, _) = batched(&vlm, reversed, opts);
    back.reverse();
    assert_eq!(back, alone, "another arrival order, batch 5, other prefill chunks: the same tokens");
    // The seed does decide: other seeds draw other tokens.
    let reseeded: Vec<Request> = requests.iter().map(|r| Request { seed: r.seed ^ 1, ..r.clone() }).collect();
    let (other, _) = batched(&vlm, reseeded, EngineOptions::default());
    let differ = other.iter().zip(&alone).filter(|(a, b)| a != b).count();
    assert!(differ > 30, "only {differ} of 40 answers changed with their seed");
}

#[test]
fn static_batching_computes_the_finished_rows_continuous_batching_does_not() {
    let vlm = vlm("llava-tiny", &Runtime::default());
    let requests = random_requests(&vlm, 32, 3, 0.0);
    let opts = |policy| EngineOptions { policy, ..EngineOptions::rows(8, None) };
    let (cont, c) = batched(&vlm, requests.clone(), opts(Policy::Continuous));
    let (stat, s) = batched(&vlm, requests.clone(), opts(Policy::Static));
    assert_eq!(cont, stat, "the schedule changes, not the answers");
    let new: usize = requests.iter().map(|r| r.params.max_new_tokens).sum();
    assert_eq!((c.new_tokens, s.new_tokens, c.finished, s.finished), (new, new, 32, 32));
    assert_eq!(c.wasted_rows, 0, "{c:?}");
    // Static: a batch runs until its longest row ends; the rows that ended earlier keep being computed.
    assert!(s.wasted_rows > 0 && s.decode_rows == c.decode_rows + s.wasted_rows, "{s:?} vs {c:?}");
    assert!(c.steps < s.steps, "continuous {} steps, static {}", c.steps, s.steps);
}

#[test]
fn the_cache_budget_delays_admission_and_refuses_what_can_never_fit() {
    let vlm = vlm("llava-tiny", &Runtime::default());
    let requests = random_requests(&vlm, 24, 9, 0.0);
    let (free, roomy) = batched(&vlm, requests.clone(), EngineOptions::rows(8, None));
    let opts = tight(&vlm, &requests, Policy::Continuous);
    let budget = opts.max_batch_tokens.unwrap();
    let (tight_out, t) = batched(&vlm, requests.clone(), opts);
    assert_eq!(tight_out, free);
    assert!(t.cache_rows <= budget, "the cache grew to {} rows, over the budget of {budget}", t.cache_rows);
    assert!(t.decode_rows < roomy.decode_rows || t.steps > roomy.steps, "the budget bound: {t:?} vs {roomy:?}");
    // Rows are reused: the cache holds what 8 requests need at once (grown by half at a time), not all of them.
    let used: usize = requests.iter().map(|r| r.ids.len() + r.params.max_new_tokens).sum();
    let most = requests.iter().map(|r| r.ids.len() + r.params.max_new_tokens).max().unwrap();
    assert!(
        roomy.cache_rows < used && roomy.cache_rows <= 12 * most,
        "cache of {} rows, {used} used",
        roomy.cache_rows
    );
    // A request larger than the whole budget is refused, naming the option.
    let mut engine = Engine::new(&vlm.model, &vlm.tok, EngineOptions::rows(8, Some(10)), Pass::INFER).unwrap();
    let err = engine.add(0, requests[0].clone()).unwrap_err().to_string();
    assert!(err.contains("--max-batch-tokens 10"), "{err}");
}

/// `n` questions over the fixture images, in LLaVA's model_vqa format (`same_text`: every question asks the same).
fn questions(path: &Path, n: usize, reversed: bool, same_text: bool) {
    let mut rows: Vec<String> = (0..n)
        .map(|i| {
            let text =
                if same_text { "What is in the picture?".to_string() } else { format!("What is in picture {i}?") };
            json!({"question_id": i, "image": IMAGES[i % IMAGES.len()], "text": text}).to_string()
        })
        .collect();
    if reversed {
        rows.reverse();
    }
    std::fs::write(path, rows.join("\n") + "\n").unwrap();
}

/// `bpo generate` on the tiny LLaVA and the fixture images, answering `q` into `answers`.
fn generate_args(q: &Path, answers: &Path, extra: &[&str]) -> Vec<String> {
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    let mut args = vec!["generate", "--model", s(&model), "--questions", s(q), "--images", s(&images)];
    args.extend(["--answers", s(answers)]);
    args.extend(extra);
    args.into_iter().map(String::from).collect()
}

fn answers_by_id(path: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| (r["question_id"].to_string(), r["text"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn sampled_answers_do_not_depend_on_the_batch_size_the_file_order_or_an_interruption() {
    // As a new user tried it: --temperature 0.9 --seed 5, batch 1 against batch 8, and the file reversed.
    let tmp = tempfile::tempdir().unwrap();
    let (q, rev) = (tmp.path().join("q.jsonl"), tmp.path().join("q-reversed.jsonl"));
    questions(&q, 40, false, false);
    questions(&rev, 40, true, false);
    let sampling = ["--temperature", "0.9", "--seed", "5", "--max-new-tokens", "12"];
    let run = |questions: &Path, name: &str, batch: &str| {
        let out = tmp.path().join(name);
        let args = generate_args(questions, &out, &[&sampling[..], &["--batch-size", batch]].concat());
        let o = crate::util::bpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", crate::util::stderr(&o));
        answers_by_id(&out)
    };
    let one = run(&q, "b1.jsonl", "1");
    assert_eq!(one.len(), 40);
    assert_eq!(run(&q, "b8.jsonl", "8"), one, "batch 8");
    assert_eq!(run(&rev, "rev.jsonl", "8"), one, "the file reversed");
    // Interrupted after 13 answers (the rest in progress lost), then resumed.
    let partial = tmp.path().join("resumed.jsonl");
    let b8 = std::fs::read_to_string(tmp.path().join("b8.jsonl")).unwrap();
    std::fs::write(&partial, b8.lines().take(13).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    assert_eq!(run(&q, "resumed.jsonl", "3"), one, "resumed with another batch size");
}

/// Peak resident memory (KiB) of `bpo args`, which must succeed.
#[allow(clippy::zombie_processes)] // the child is reaped by wait4, which std does not see
fn peak_rss_kib(args: &[String]) -> i64 {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bpo"));
    let child = command.args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, with valid out-pointers; `child` is not waited on again.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{args:?} failed");
    usage.ru_maxrss
}

#[test]
fn a_thousand_questions_take_the_memory_of_fifty() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for n in [50, 1000] {
        let q = tmp.path().join(format!("q{n}.jsonl"));
        // One question text: distinct ones would fill the tokenizer's own word cache (the tokenizers crate keeps up
        // to 10,000 words, here whole prompts), which is bounded but not the engine's.
        questions(&q, n, false, true);
        let out = tmp.path().join(format!("a{n}.jsonl"));
        peaks.push(peak_rss_kib(&generate_args(&q, &out, &["--max-new-tokens", "4", "--batch-size", "8"])));
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), n);
    }
    let (fifty, thousand) = (peaks[0] as f64, peaks[1] as f64);
    assert!(thousand <= 1.1 * fifty, "peak RSS {thousand} KiB for 1000 questions, {fifty} KiB for 50");
}

#[test]
fn a_contrast_request_decodes_two_rows_in_lockstep() {
    // With the same image on both rows and a combine that keeps the main row's logits, a contrast request is the
    // plain request: the contrast row is computed beside it without changing its tokens.
    let vlm = vlm("llava-tiny", &Runtime::default());
    let mut requests = random_requests(&vlm, 16, 21, 1.0);
    requests.retain(|r| r.image.is_some());
    let plain = one_at_a_time(&vlm, &requests);
    let paired: Vec<Request> = requests.iter().map(|r| Request { contrast: r.image.clone(), ..r.clone() }).collect();
    let keep = |main: &[f32], _: &[f32]| main.to_vec();
    let mut engine = Engine::new(&vlm.model, &vlm.tok, EngineOptions::rows(6, None), Pass::INFER).unwrap();
    engine = engine.with_combine(&keep);
    let got: Vec<Vec<u32>> = engine.generate_all(paired).unwrap().into_iter().map(|c| c.ids).collect();
    assert_eq!(got, plain);
    assert!(engine.stats().decode_rows % 2 == 0, "rows come in pairs: {:?}", engine.stats());
}

/// Per engine step on the device-generic path (what CUDA runs): (reads back from the device, bytes read, tokens
/// sampled).
fn reads_per_step(vlm: &Vlm, requests: Vec<Request>) -> Vec<(u64, u64, usize)> {
    use bpo::model::runtime::{host_read_bytes, host_reads};
    let mut engine = Engine::new(&vlm.model, &vlm.tok, EngineOptions::rows(8, None), Pass::INFER).unwrap();
    for (i, r) in requests.into_iter().enumerate() {
        engine.add(i, r).unwrap();
    }
    let mut steps = Vec::new();
    while engine.busy() {
        let (reads, bytes, tokens) = (host_reads(), host_read_bytes(), engine.stats().new_tokens);
        engine.step().unwrap();
        steps.push((host_reads() - reads, host_read_bytes() - bytes, engine.stats().new_tokens - tokens));
    }
    steps
}

#[test]
fn a_generic_decode_step_reads_back_the_new_token_ids_only() {
    let vlm = vlm("llava-tiny", &Runtime::generic(Device::Cpu, DType::F32));
    let vocab = vlm.model.llm.cfg.vocab_size as u64;
    // Greedy: one read per step that samples, of its new token ids (u32), and none in a step that only prefills.
    let steps = reads_per_step(&vlm, random_requests(&vlm, 12, 7, 0.0));
    assert!(steps.iter().filter(|s| s.2 > 1).count() >= 5, "steps with several rows: {steps:?}");
    for &(reads, bytes, tokens) in &steps {
        assert_eq!((reads, bytes), (u64::from(tokens > 0), 4 * tokens as u64), "greedy steps: {steps:?}");
    }
    // Sampled: still one read a step (the sampling rows' logits, sampled on the host by each request's generator).
    let steps = reads_per_step(&vlm, random_requests(&vlm, 12, 7, 1.0));
    for &(reads, bytes, tokens) in &steps {
        assert_eq!((reads, bytes), (u64::from(tokens > 0), 4 * vocab * tokens as u64), "sampled steps: {steps:?}");
    }
}
