//! The judged benchmarks (`bpo eval mmvet / llava-bench / mmhal`) against a mock judge on 127.0.0.1 (the
//! loopback [`Server`] of `bootstrap_http.rs`: bounded requests, bounded lifetime).
//!
//! Expected prompts and numbers come from the official scripts (MM-Vet `mm-vet_evaluator.py` @ acde843e02da,
//! LLaVA `eval_gpt_review_bench.py` + `summarize_gpt_review.py` @ c121f0432da2, MMHal-Bench `eval_gpt4.py` as
//! LLaVA-RLHF `Eval/eval_gpt_mmhal.py` @ 830a083fd83e) run unmodified by `scripts/make_judge_fixtures.py` on the
//! fixtures in `tests/fixtures/judge/`, with a stub client replaying the replies written below (numpy 2.4.6,
//! pandas 3.1.1; nothing runs Python at test time). The `*-request-*.json` fixtures are the requests they sent.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bpo::eval::{llava_bench, mmhal, mmvet};
use serde_json::{json, Value};

use crate::bootstrap_http::{Reply, Server};
use crate::util::{args, bpo_env, error_line, fixture, ok, read_json, s};

/// `tests/fixtures/judge/<name>`.
fn judge_file(name: &str) -> PathBuf {
    fixture(&format!("judge/{name}"))
}

/// `--judge-*` options for a mock server (two retries, 10 ms back-off).
fn judge_args(url: &str, model: &str, concurrency: usize) -> Vec<String> {
    judge_args_with(url, model, concurrency, 2, "0.01")
}

fn judge_args_with(url: &str, model: &str, concurrency: usize, retries: u32, backoff: &str) -> Vec<String> {
    let (c, r) = (concurrency.to_string(), retries.to_string());
    args(&[
        "--judge-url",
        url,
        "--judge-model",
        model,
        "--judge-concurrency",
        &c,
        "--judge-retries",
        &r,
        "--judge-backoff",
        backoff,
    ])
}

fn details(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("details.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn user_text(request: &Value) -> String {
    request["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string()
}

/// The row an MM-Vet request grades (its last line, without the retry instruction).
fn graded_row(request: &Value) -> String {
    user_text(request).trim_end_matches(mmvet::RETRY_SUFFIX).lines().last().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------------- MM-Vet

/// The replies of the MM-Vet fixture, per question, in the order the grader asks (runs 0, 1, 2 in turn).
fn mmvet_replies() -> HashMap<String, VecDeque<&'static str>> {
    let r: [(&str, &[&str]); 6] = [
        ("a cat", &["0.5", "0.6", "0.5"]),
        ("x = -1", &["1.0", "The answer", "0.8", "1.0"]),
        ("a pear", &["0.0", "0.0", "0.0"]),
        ("stop", &["1.5", "0.3", " 0.7", "0.7", "0.9 because"]),
        ("Monet", &["N/A", "N/A", "", "-0.1", "abc", "0.9", "0.2", "0.25"]),
        ("The total is 12.5 dollars.", &["0.1", "1", "0.4\n"]),
    ];
    r.iter().map(|(p, v)| (p.to_string(), v.iter().copied().collect())).collect()
}

/// A mock MM-Vet judge: finds the prediction in the graded row and replays that question's replies.
fn mmvet_server(max_requests: usize) -> Server {
    let queues = Mutex::new(mmvet_replies());
    Server::start(max_requests, move |_, req| {
        let row = graded_row(req);
        let mut queues = queues.lock().unwrap();
        let key = queues.keys().find(|p| row.ends_with(&format!("| {p} | "))).cloned();
        match key.and_then(|k| queues.get_mut(&k).unwrap().pop_front()) {
            Some(reply) => Reply::Text(reply.to_string()),
            None => Reply::Status(400),
        }
    })
}

fn mmvet_cmd(url: &str, out: &Path, concurrency: usize) -> Vec<String> {
    let mut a = args(&[
        "eval",
        "mmvet",
        "--questions",
        s(&judge_file("mm-vet.json")),
        "--answers",
        s(&judge_file("mmvet-results.json")),
    ]);
    a.extend(args(&["--runs", "3", "--out", s(out)]));
    a.extend(judge_args(url, "gpt-4-0613", concurrency));
    a
}

#[test]
fn mmvet_sends_the_official_prompt_and_scores_like_the_official_grader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let server = mmvet_server(40);
    let stdout = ok(&bpo_env(&mmvet_cmd(&server.url, &out, 1), &[]));
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 26, "3 + 4 + 3 + 5 + 8 + 3 requests");

    // The exact first request about v1_1 and the first retry about v1_4, as the official grader sent them.
    let about = |pred: &str| -> Vec<&Value> {
        requests.iter().filter(|r| graded_row(r).ends_with(&format!("| {pred} | "))).collect()
    };
    assert_eq!(*about("x = -1")[0], read_json(&judge_file("mmvet-request-v1_1.json")));
    let monet = about("Monet");
    assert_eq!(*monet[1], read_json(&judge_file("mmvet-retry-v1_4.json")));
    let temperatures: Vec<f64> = monet.iter().map(|r| r["temperature"].as_f64().unwrap()).collect();
    assert_eq!(temperatures, [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 0.0, 0.0]);

    // The official cap-score / cap-int-score rows for this fixture:
    //   rec 22.8, ocr 68.9, know 34.2, math 71.7, spat 50.0, total 45.8, std 10.2, runs [31.7, 55.0, 50.8]
    //   know_rec 34.2, ocr_math 93.3, rec 0.0, ocr 63.3, ocr_math_spat 50.0
    // (the official combination names join a Python set; bpo joins in data order: rec_know, ocr_spat_math).
    let scores = read_json(&out.join("scores.json"));
    assert_eq!(scores["kind"], "mmvet");
    let cols = |key: &str| -> Vec<(String, u64, f64)> {
        scores[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().into(), c["count"].as_u64().unwrap(), c["score"].as_f64().unwrap()))
            .collect()
    };
    let want = |v: &[(&str, u64, f64)]| -> Vec<(String, u64, f64)> {
        v.iter().map(|(n, c, x)| (n.to_string(), *c, *x)).collect()
    };
    assert_eq!(
        cols("capabilities"),
        want(&[("rec", 3, 22.8), ("ocr", 3, 68.9), ("know", 2, 34.2), ("math", 2, 71.7), ("spat", 1, 50.0)])
    );
    assert_eq!(
        cols("integrations"),
        want(&[
            ("rec_know", 2, 34.2),
            ("ocr_math", 1, 93.3),
            ("rec", 1, 0.0),
            ("ocr", 1, 63.3),
            ("ocr_spat_math", 1, 50.0)
        ])
    );
    assert_eq!((scores["total"].as_f64(), scores["std"].as_f64()), (Some(45.8), Some(10.2)));
    assert_eq!(scores["run_totals"], json!([31.7, 55.0, 50.8]));
    assert_eq!(scores["gave_up"], 1);
    assert!(stdout.contains("45.8"), "{stdout}");

    // details.jsonl: the official grade file's score/content per run, and every raw reply.
    let rows = details(&out);
    let v1_4 = rows.iter().find(|r| r["id"] == "v1_4").unwrap();
    assert_eq!(v1_4["score"], json!([0.0, 0.2, 0.25]));
    assert_eq!(v1_4["grades"][0]["content"], "0.9", "the sixth reply is kept but not read, as in the grader");
    assert_eq!(v1_4["grades"][0]["replies"].as_array().unwrap().len(), 6);
    let v1_3 = rows.iter().find(|r| r["id"] == "v1_3").unwrap();
    assert_eq!(v1_3["grades"][1]["replies"], json!([" 0.7", "0.7"]));

    // A second run over the same folder asks nothing and gives the same scores.
    let idle = Server::start(5, |_, _| Reply::Status(500));
    ok(&bpo_env(&mmvet_cmd(&idle.url, &out, 3), &[]));
    assert_eq!(idle.count(), 0, "every reply comes from the cache");
    assert_eq!(read_json(&out.join("scores.json")), scores);
}

#[test]
fn mmvet_parses_scores_like_the_official_grader() {
    // `content.split(" ")[0].strip()` then `float()` in [0, 1]; None = the grader asks again.
    let cases: &[(&str, Option<f64>)] = &[
        ("0.5", Some(0.5)),
        ("0.5 The prediction", Some(0.5)),
        ("1.0 0.0", Some(1.0)),
        ("0.4\n", Some(0.4)),
        ("1", Some(1.0)),
        ("0.25", Some(0.25)),
        (" 0.5", None),
        ("1.5", None),
        ("-0.1", None),
        ("", None),
        ("0.3,0.4", None),
        ("Score: 0.5", None),
        ("0.7.", None),
        ("nan", None),
    ];
    for (reply, want) in cases {
        assert_eq!(mmvet::parse_score(reply), *want, "{reply:?}");
    }
}

// ----------------------------------------------------------------------------------------------- LLaVA-Bench

#[test]
fn llava_bench_parses_scores_like_llava() {
    // Outputs of `parse_score` in eval_gpt_review_bench.py; None = [-1, -1]. ("nan 3" gives [nan, 3.0] there.)
    let cases: &[(&str, Option<[f64; 2]>)] = &[
        ("8 9\nAssistant 1 was detailed.", Some([8.0, 9.0])),
        ("8,9", Some([8.0, 9.0])),
        ("8, 9", None),
        ("7 6.5", Some([7.0, 6.5])),
        ("Assistant 1: 8\nAssistant 2: 9", None),
        ("", None),
        ("10 3", Some([10.0, 3.0])),
        ("9 8 \n", None),
        (" 8 9", None),
        ("8\t9", None),
        ("7 8\r\nx", Some([7.0, 8.0])),
        ("1e1 5", Some([10.0, 5.0])),
        ("nan 3", None),
    ];
    for (review, want) in cases {
        assert_eq!(llava_bench::parse_score(review), *want, "{review:?}");
    }
}

#[test]
fn llava_bench_sends_llavas_review_and_summarizes_like_llava() {
    let reviews = ["8 9\nok", "7 6", "9 7\nexpl", "Assistant 1: 8", "8 8", "10 7.5", "6,9"];
    let server = Server::start(20, move |_, req| {
        let text = user_text(req);
        let i: usize = text
            .split("[Question]\nQuestion ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        Reply::Text(reviews[i].to_string())
    });
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut a = args(&[
        "eval",
        "llava-bench",
        "--questions",
        s(&judge_file("llava-questions.jsonl")),
        "--context",
        s(&judge_file("llava-context.jsonl")),
    ]);
    a.extend(args(&[
        "--references",
        s(&judge_file("llava-references.jsonl")),
        "--answers",
        s(&judge_file("llava-answers.jsonl")),
        "--out",
        s(&out),
    ]));
    a.extend(judge_args(&server.url, "gpt-4-0314", 3));
    let stdout = ok(&bpo_env(&a, &[]));
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 7);
    let first = requests.iter().find(|r| user_text(r).contains("[Question]\nQuestion 0 ")).unwrap();
    assert_eq!(first["messages"], read_json(&judge_file("llava-request-0.json")));
    assert_eq!(
        (first["temperature"].as_f64(), first["max_tokens"].as_u64(), first["model"].as_str()),
        (Some(0.2), Some(1024), Some("gpt-4-0314"))
    );

    // summarize_gpt_review.py on these reviews prints (relative, reference x10, model x10):
    //   all 96.8 67.1 65.0 / llava_bench_complex 102.1 80.0 81.7 / llava_bench_conv 100.0 75.0 75.0 /
    //   llava_bench_detail 75.0 40.0 30.0
    let scores = read_json(&out.join("scores.json"));
    let got: Vec<(String, f64, f64, f64)> = scores["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["category"].as_str().unwrap().into(),
                c["relative"].as_f64().unwrap(),
                c["reference"].as_f64().unwrap(),
                c["model"].as_f64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("all", 96.8, 67.1, 65.0),
        ("complex", 102.1, 80.0, 81.7),
        ("conv", 100.0, 75.0, 75.0),
        ("detail", 75.0, 40.0, 30.0),
    ];
    assert_eq!(got, want.map(|(c, r, a, b)| (c.to_string(), r, a, b)));
    assert_eq!(scores["unparsed"], 1);
    assert!(stdout.contains("96.8"), "{stdout}");
    let rows = details(&out);
    assert_eq!(rows[3]["content"], "Assistant 1: 8");
    assert_eq!(rows[3]["tuple"], json!([-1.0, -1.0]));
}

// ---------------------------------------------------------------------------------------------- MMHal-Bench

/// The replies of the MMHal fixture: record `i` gets `MMHAL_REPLIES[(7 i) % 11]`.
const MMHAL_REPLIES: [&str; 11] = [
    "Explanation.\nRating: 6, very informative",
    "rating: 5",
    "RATING: 4",
    "Rating: 3",
    "Rating: 2, very informative, with hallucination",
    "Rating: 1",
    "Rating: 0",
    "No rating here",
    "Rating: 2 ... or maybe Rating: 4",
    "rating:5",
    "Rating: 60",
];

fn mmhal_record_index(req: &Value) -> usize {
    user_text(req)
        .split("### Question\nQ")
        .nth(1)
        .and_then(|t| t.split('?').next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn mmhal_server(max_requests: usize) -> Server {
    Server::start(max_requests, |_, req| Reply::Text(MMHAL_REPLIES[(mmhal_record_index(req) * 7) % 11].to_string()))
}

fn mmhal_cmd(url: &str, records: &Path, out: &Path, concurrency: usize) -> Vec<String> {
    let mut a = mmhal_base(records, out);
    a.extend(judge_args(url, "gpt-4-0314", concurrency));
    a
}

fn mmhal_base(records: &Path, out: &Path) -> Vec<String> {
    args(&["eval", "mmhal", "--responses", s(records), "--out", s(out)])
}

/// eval_gpt_mmhal.py on `mmhal-records.json` with these replies prints: average score 2.46, hallucination rate
/// 0.54, per question type 2.75, 2.25, 2.5, 2.75, 2.25, 2.58, 2.25, 2.33.
fn assert_official_mmhal_scores(out: &Path) {
    let scores = read_json(&out.join("scores.json"));
    assert_eq!((scores["average_score"].as_f64(), scores["hallucination_rate"].as_f64()), (Some(2.46), Some(0.54)));
    let types: Vec<(String, f64)> = scores["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["question_type"].as_str().unwrap().into(), t["average"].as_f64().unwrap()))
        .collect();
    let names = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"];
    let want = [2.75, 2.25, 2.5, 2.75, 2.25, 2.58, 2.25, 2.33];
    assert_eq!(types, names.iter().zip(want).map(|(n, w)| (n.to_string(), w)).collect::<Vec<_>>());
    // Replies 7 (no rating), 8 (two ratings) and 9 ("rating:5") hold no single rating.
    let unparsed = (0..96).filter(|i| [7, 8, 9].contains(&((i * 7) % 11))).count();
    assert_eq!(scores["unparsed"], unparsed);
}

#[test]
fn mmhal_sends_the_official_template_and_scores_like_the_official_script() {
    let server = mmhal_server(100);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&bpo_env(&mmhal_cmd(&server.url, &judge_file("mmhal-records.json"), &out, 4), &[]));
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 96);
    let first = requests.iter().find(|r| mmhal_record_index(r) == 0).unwrap();
    assert_eq!(*first, read_json(&judge_file("mmhal-request-0.json")), "model, messages, temperature; no max_tokens");
    assert_official_mmhal_scores(&out);
    let rows = details(&out);
    assert_eq!((rows[3]["content"].as_str(), rows[3]["rating"].as_u64()), (Some("Rating: 60"), Some(6)));
}

#[test]
fn mmhal_parses_ratings_like_the_official_script() {
    // The one s in 0..=6 with "rating: {s}" in the lower-cased reply; None = several or none (rated 0).
    let cases: &[(&str, Option<u8>)] = &[
        ("The answer is fine.\nRating: 6, very informative with good analysis", Some(6)),
        ("RATING: 3", Some(3)),
        ("rating:5", None),
        ("Rating: 60", Some(6)),
        ("Rating: 1.5", Some(1)),
        ("Rating: 2 ... Rating: 4", None),
        ("Rating: 4. Rating: 4", Some(4)),
        ("Rating: 7", None),
        ("", None),
    ];
    for (reply, want) in cases {
        assert_eq!(mmhal::parse_rating(reply), *want, "{reply:?}");
    }
}

/// A one-record MMHal file in `dir`.
fn one_record(dir: &Path) -> PathBuf {
    let path = dir.join("one.json");
    let record = json!([{"question_type": "attribute", "image_content": ["Cat"], "question": "Q0?", "gt_answer": "A cat.", "model_answer": "A dog."}]);
    std::fs::write(&path, record.to_string()).unwrap();
    path
}

#[test]
fn rate_limits_and_server_errors_are_retried_with_back_off() {
    let tmp = tempfile::tempdir().unwrap();
    let records = one_record(tmp.path());
    let server = Server::start(5, |n, _| match n {
        0 => Reply::Status(429),
        1 => Reply::Status(503),
        _ => Reply::Text("Rating: 5".into()),
    });
    let mut a = mmhal_base(&records, &tmp.path().join("a"));
    a.extend(judge_args_with(&server.url, "gpt-4-0314", 1, 2, "0.2"));
    let start = Instant::now();
    ok(&bpo_env(&a, &[]));
    assert!(start.elapsed() >= Duration::from_millis(600), "waits 0.2 s, then 0.4 s: {:?}", start.elapsed());
    assert_eq!(server.count(), 3);
    assert_eq!(read_json(&tmp.path().join("a/scores.json"))["average_score"], 5.0);

    // One retry is not enough: one error line naming the judge and the last status.
    let server = Server::start(5, |_, _| Reply::Status(503));
    let mut a = mmhal_base(&records, &tmp.path().join("b"));
    a.extend(judge_args_with(&server.url, "gpt-4-0314", 1, 1, "0.01"));
    let line = error_line(&bpo_env(&a, &[]));
    assert!(
        line.contains("judge")
            && line.contains(&server.url)
            && line.contains("503")
            && line.contains("after 2 attempts"),
        "{line}"
    );
    assert_eq!(server.count(), 2);

    // Other 4xx (a bad key) are not retried.
    let server = Server::start(5, |_, _| Reply::Status(401));
    let line = error_line(&bpo_env(&mmhal_cmd(&server.url, &records, &tmp.path().join("c"), 1), &[]));
    assert!(line.contains("401"), "{line}");
    assert_eq!(server.count(), 1);
}

#[test]
fn an_unreachable_judge_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let line = error_line(&bpo_env(&mmhal_cmd(&url, &one_record(tmp.path()), &tmp.path().join("run"), 1), &[]));
    assert!(
        line.contains("judge") && line.contains(&format!("127.0.0.1:{port}")) && line.contains("cannot connect"),
        "{line}"
    );
    // Checked before a model spends time answering: the model folder is never opened.
    let mut a = args(&[
        "eval",
        "mmvet",
        "--questions",
        s(&judge_file("mm-vet.json")),
        "--model",
        "/no/such/model",
        "--out",
        s(&tmp.path().join("m")),
    ]);
    a.extend(judge_args(&url, "m", 1));
    let line = error_line(&bpo_env(&a, &[]));
    assert!(line.contains("cannot connect") && !line.contains("/no/such/model"), "{line}");
    // https judges are accepted; a host that does not resolve (.invalid never does, RFC 2606) is one line naming it.
    let line = error_line(&bpo_env(
        &mmhal_cmd("https://judge.invalid", &one_record(tmp.path()), &tmp.path().join("run"), 1),
        &[],
    ));
    assert!(line.contains("https://judge.invalid") && line.contains("cannot resolve"), "{line}");
}

#[test]
fn the_api_key_comes_from_the_environment_and_is_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let secret = "sk-test-5ecret-never-on-disk";
    let server = Server::start(5, |_, _| Reply::Text("Rating: 4".into()));
    let mut a = mmhal_cmd(&server.url, &one_record(tmp.path()), &out, 1);
    a.extend(args(&["--judge-key-env", "BPO_TEST_JUDGE_KEY"]));
    let run = bpo_env(&a, &[("BPO_TEST_JUDGE_KEY", secret)]);
    ok(&run);
    assert_eq!(*server.auth.lock().unwrap(), vec![Some(format!("Bearer {secret}"))]);
    assert!(
        !String::from_utf8_lossy(&run.stdout).contains(secret)
            && !String::from_utf8_lossy(&run.stderr).contains(secret)
    );
    let files: Vec<PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        assert!(!std::fs::read_to_string(&f).unwrap().contains(secret), "{} holds the key", f.display());
    }
    // Without the variable no Authorization header is sent.
    let server = Server::start(5, |_, _| Reply::Text("Rating: 4".into()));
    ok(&bpo_env(&mmhal_cmd(&server.url, &one_record(tmp.path()), &tmp.path().join("plain"), 1), &[]));
    assert_eq!(*server.auth.lock().unwrap(), vec![None]);
}

#[test]
fn a_killed_run_resumes_without_asking_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let records = judge_file("mmhal-records.json");
    // The first judge answers ten requests, then holds the eleventh forever.
    let stalling = Server::start(11, |n, req| {
        if n < 10 {
            Reply::Text(MMHAL_REPLIES[(mmhal_record_index(req) * 7) % 11].into())
        } else {
            Reply::Stall
        }
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(mmhal_cmd(&stalling.url, &records, &out, 1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = out.join("judge-cache.jsonl");
    let deadline = Instant::now() + Duration::from_secs(15);
    while stalling.count() < 11 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    let cached = std::fs::read_to_string(&cache).unwrap().lines().count();
    assert_eq!(cached, 10, "every answered request is on disk before the next is sent");
    assert!(!out.join("scores.json").exists());

    let server = mmhal_server(100);
    ok(&bpo_env(&mmhal_cmd(&server.url, &records, &out, 4), &[]));
    assert_eq!(server.count(), 86, "only the requests the killed run had not finished");
    assert_official_mmhal_scores(&out);
}

#[test]
fn a_model_answers_mmvet_before_the_judge_grades() {
    let tmp = tempfile::tempdir().unwrap();
    let questions = tmp.path().join("mm-vet.json");
    let data = json!({
        "v1_0": {"imagename": "chelsea.png", "capability": ["rec"], "question": "What animal is this?", "answer": "cat"},
        "v1_1": {"imagename": "coffee.png", "capability": ["rec", "know"], "question": "What drink is this?", "answer": "coffee"},
    });
    std::fs::write(&questions, data.to_string()).unwrap();
    let out = tmp.path().join("run");
    let server = Server::start(10, |_, _| Reply::Text("0.5".into()));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny");
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let mut a = args(&[
        "eval",
        "mmvet",
        "--questions",
        s(&questions),
        "--model",
        s(&model),
        "--images",
        s(&images),
        "--max-new-tokens",
        "4",
    ]);
    a.extend(args(&["--runs", "2", "--out", s(&out)]));
    a.extend(judge_args(&server.url, "judge", 2));
    ok(&bpo_env(&a, &[]));
    let answers: Vec<Value> = std::fs::read_to_string(out.join("answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2);
    assert_eq!(
        (answers[0]["question_id"].as_str(), answers[0]["prompt"].as_str()),
        (Some("v1_0"), Some("What animal is this?"))
    );
    let q = mmvet::Question {
        id: "v1_0".into(),
        image: String::new(),
        capabilities: vec![],
        question: "What animal is this?".into(),
        answer: "cat".into(),
    };
    let want = mmvet::grading_prompt(&q, answers[0]["text"].as_str().unwrap());
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 4, "two questions, two runs");
    assert_eq!(requests.iter().filter(|r| user_text(r) == want).count(), 2);
    assert_eq!(read_json(&out.join("scores.json"))["total"], 50.0);
}

#[test]
fn bad_benchmark_files_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(1, |_, _| Reply::Status(500));
    // An answer missing for a question.
    let partial = tmp.path().join("partial.json");
    std::fs::write(&partial, r#"{"v1_0": "a cat"}"#).unwrap();
    let mut a = args(&[
        "eval",
        "mmvet",
        "--questions",
        s(&judge_file("mm-vet.json")),
        "--answers",
        s(&partial),
        "--out",
        s(&tmp.path().join("x")),
    ]);
    a.extend(judge_args(&server.url, "j", 1));
    let line = error_line(&bpo_env(&a, &[]));
    assert!(line.contains("partial.json") && line.contains("v1_1"), "{line}");
    // A LLaVA-Bench category without a rule.
    let q = tmp.path().join("q.jsonl");
    std::fs::write(&q, "{\"question_id\": 0, \"image\": \"001.jpg\", \"text\": \"Q\", \"category\": \"conv\"}\n{\"question_id\": 1, \"image\": \"001.jpg\", \"text\": \"Q\", \"category\": \"chat\"}\n").unwrap();
    let mut a = args(&[
        "eval",
        "llava-bench",
        "--questions",
        s(&q),
        "--context",
        s(&judge_file("llava-context.jsonl")),
        "--references",
        s(&judge_file("llava-references.jsonl")),
    ]);
    a.extend(args(&["--answers", s(&judge_file("llava-answers.jsonl")), "--out", s(&tmp.path().join("y"))]));
    a.extend(judge_args(&server.url, "j", 1));
    let line = error_line(&bpo_env(&a, &[]));
    assert!(line.contains("q.jsonl:2") && line.contains("chat"), "{line}");
    // An MMHal record without its question.
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"question_type": "attribute", "image_content": [], "gt_answer": "x", "model_answer": "y"}]"#,
    )
    .unwrap();
    let line = error_line(&bpo_env(&mmhal_cmd(&server.url, &bad, &tmp.path().join("z"), 1), &[]));
    assert!(line.contains("bad.json") && line.contains("record 0") && line.contains("question"), "{line}");
    assert_eq!(server.count(), 0, "nothing is asked before the inputs are checked");
}
