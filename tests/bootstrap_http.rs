//! The HTTP completer against a small OpenAI-compatible server started here on 127.0.0.1 (port 0): a normal
//! server, one that fails with 5xx/429 before answering (retries), one that stalls (timeout), one that
//! refuses (4xx, no retry), and `bpo bootstrap inject` end to end. Every server accepts a bounded number of
//! requests and lives a bounded time; only loopback addresses are used. The judged benchmarks' tests
//! (`judge.rs`) use the same [`Server`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bpo::bootstrap::{run_inject, Completer, CompletionOptions, Endpoint, HttpCompleter, HttpOptions, InjectOptions};
use bpo::data::{read_input, InputOptions, Record, ResumableWriter};
use bpo::progress::Silent;
use bpo::Error;
use serde_json::{json, Value};

/// What the server does with request number `n` (0-based).
pub(crate) enum Reply {
    Text(String),
    Status(u16),
    /// This status and body as they are (HTML, malformed JSON, a reply without text, a huge body).
    Raw(u16, String),
    /// This status, extra headers (`Retry-After`) and body.
    Headers(u16, Vec<(&'static str, String)>, String),
    Stall,
}

pub(crate) struct Server {
    pub(crate) url: String,
    pub(crate) requests: Arc<Mutex<Vec<Value>>>,
    /// The `Authorization` header of each request, if any.
    pub(crate) auth: Arc<Mutex<Vec<Option<String>>>>,
    /// The target of each request line (path and query).
    pub(crate) paths: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves at most `max_requests` requests, for at most 20 s, one at a time.
    pub(crate) fn start(max_requests: usize, respond: impl Fn(usize, &Value) -> Reply + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, auth_log, path_log, halt) = (requests.clone(), auth.clone(), paths.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut held = Vec::new(); // stalled connections stay open until the server ends
            let mut n = 0;
            while n < max_requests && Instant::now() < deadline && !halt.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let Some((body, authorization, target)) = read_request(&mut stream) else { continue };
                log.lock().unwrap().push(body.clone());
                auth_log.lock().unwrap().push(authorization);
                path_log.lock().unwrap().push(target);
                match respond(n, &body) {
                    Reply::Text(text) => write_response(&mut stream, 200, &completion_body(&body, &text)),
                    Reply::Status(code) => write_response(&mut stream, code, "{\"error\": \"busy\"}"),
                    Reply::Raw(code, body) => write_response(&mut stream, code, &body),
                    Reply::Headers(code, headers, body) => write_response_with(&mut stream, code, &headers, &body),
                    Reply::Stall => held.push(stream),
                }
                n += 1;
            }
            // Keep stalled connections open until the test is done with them.
            while !held.is_empty() && Instant::now() < deadline && !halt.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Server { url, requests, auth, paths, stop, thread: Some(thread) }
    }

    pub(crate) fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP request and returns its JSON body, its `Authorization` header and its target (path and query).
fn read_request(stream: &mut TcpStream) -> Option<(Value, Option<String>, String)> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let raw_head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let target = raw_head.split(' ').nth(1).unwrap_or_default().to_string();
    let head = raw_head.to_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap_or(0))?;
    let authorization = raw_head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization").then(|| value.trim().to_string())
    });
    while buf.len() < header_end + len {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((serde_json::from_slice(&buf[header_end..header_end + len]).ok()?, authorization, target))
}

fn write_response(stream: &mut TcpStream, code: u16, body: &str) {
    write_response_with(stream, code, &[], body)
}

fn write_response_with(stream: &mut TcpStream, code: u16, headers: &[(&str, String)], body: &str) {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes()));
}

/// An OpenAI reply in the shape of the request's endpoint.
fn completion_body(request: &Value, text: &str) -> String {
    let choice = if request.get("messages").is_some() {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": text, "finish_reason": "stop"})
    };
    json!({"id": "x", "object": "text_completion", "choices": [choice]}).to_string()
}

/// The text a request asked about: the prompt or the user message.
pub(crate) fn prompt_of(request: &Value) -> String {
    let p = request.get("prompt").or_else(|| request.pointer("/messages/0/content"));
    p.and_then(Value::as_str).unwrap_or_default().to_string()
}

pub(crate) fn completer(url: &str, endpoint: Endpoint, timeout_ms: u64, retries: u32) -> HttpCompleter {
    HttpCompleter::new(HttpOptions {
        url: url.to_string(),
        endpoint,
        model: Some("test-model".into()),
        api_key: None,
        timeout: Duration::from_millis(timeout_ms),
        max_reply_bytes: 1 << 20,
        allow_empty: false,
        retries,
        backoff: Duration::from_millis(10),
        concurrency: 3,
    })
    .unwrap()
}

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("prompt {i}")).collect()
}

#[test]
fn normal_server_answers_every_prompt_in_order() {
    for endpoint in [Endpoint::Completions, Endpoint::Chat] {
        let server = Server::start(10, |_, req| Reply::Text(format!(" echo {}", prompt_of(req))));
        let c = completer(&server.url, endpoint, 5000, 0);
        let opts = CompletionOptions { stop: vec!["</s>".into()], seed: Some(9), ..Default::default() };
        let out = c.complete(&prompts(7), &opts).unwrap();
        let got: Vec<String> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..7).map(|i| format!(" echo prompt {i}")).collect::<Vec<_>>(), "{endpoint:?}");
        let reqs = server.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 7);
        assert_eq!(
            (reqs[0]["model"].as_str(), reqs[0]["stop"][0].as_str(), reqs[0]["seed"].as_u64()),
            (Some("test-model"), Some("</s>"), Some(9))
        );
        assert_eq!(reqs[0]["max_tokens"], 1024);
    }
}

#[test]
fn server_errors_are_retried_until_success() {
    // 500, 429, 503 for the first three requests, then answers.
    let server = Server::start(10, |n, req| match n {
        0 => Reply::Status(500),
        1 => Reply::Status(429),
        2 => Reply::Status(503),
        _ => Reply::Text(format!(" ok {}", prompt_of(req))),
    });
    let c = completer(&server.url, Endpoint::Completions, 5000, 3);
    assert_eq!(c.complete_one("p", &CompletionOptions::default()).unwrap(), " ok p");
    assert_eq!(server.count(), 4);
}

#[test]
fn retries_run_out_and_client_errors_are_not_retried() {
    let server = Server::start(10, |_, _| Reply::Status(500));
    let c = completer(&server.url, Endpoint::Completions, 5000, 2);
    let err = c.complete_one("p", &CompletionOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Http(m) if m.contains("500") && m.contains("3 attempts")), "{err}");
    assert_eq!(server.count(), 3);
    let server = Server::start(10, |_, _| Reply::Status(400));
    let c = completer(&server.url, Endpoint::Completions, 5000, 2);
    assert!(matches!(c.complete_one("p", &CompletionOptions::default()), Err(Error::Http(m)) if m.contains("400")));
    assert_eq!(server.count(), 1);
}

#[test]
fn stalled_server_times_out_and_is_counted() {
    let server = Server::start(10, |_, _| Reply::Stall);
    let c = completer(&server.url, Endpoint::Completions, 300, 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("records.jsonl");
    let rec = |id: &str| Record {
        id: id.into(),
        prompt: "q".into(),
        image: None,
        completions: vec![bpo::data::Completion::gt("A red bus.")],
    };
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let counts = run_inject(vec![rec("a"), rec("b")], &c, &InjectOptions::default(), &mut w, &Silent).unwrap();
    assert_eq!((counts.request_failed, counts.records.failed, counts.records.written), (2, 2, 0));
    assert_eq!(server.count(), 4, "two prompts, two attempts each");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "");
}

#[test]
fn unreadable_reply_is_retried_then_a_request_failure() {
    // Status 200 with a body that has no `choices` is no answer: retried, then failed with the reason.
    let server = Server::start(10, |_, _| Reply::Status(200));
    let c = completer(&server.url, Endpoint::Completions, 5000, 3);
    let err = c.complete_one("p", &CompletionOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Http(m) if m.contains("no `choices`") && m.contains("4 attempts")), "{err}");
    assert_eq!(server.count(), 4);
}

#[test]
fn inject_command_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("llava.json");
    let samples = json!([
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red bus next to a tree."}]},
        {"id": "2", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Two cats on a sofa."}]}
    ]);
    std::fs::write(&data, samples.to_string()).unwrap();
    let server = Server::start(4, |_, req| {
        let p = prompt_of(req);
        Reply::Text(if p.contains("red bus") {
            " A blue bus next to a tree and a dog.</s>".into()
        } else {
            " Three cats on a sofa.".into()
        })
    });
    let out = dir.path().join("records.jsonl");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_bpo"))
            .args([
                "bootstrap",
                "inject",
                "--llm-url",
                &server.url,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--concurrency", "2", "--timeout-s", "10", "--retries", "0", "--seed", "1"])
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = bpo::jsonl::read::<Record>(&out).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].id, "1#0");
    assert_eq!(records[0].completions[1].response, "A blue bus next to a tree and a dog.");
    assert_eq!(records[1].completions[1].response, "Three cats on a sofa.");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("\"added\": 2"), "{stdout}");
    // Re-run: nothing left, no request made.
    let o = run();
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"already_done\": 2"));
    assert_eq!(server.count(), 2);
    let input = read_input(&out, &InputOptions::default()).unwrap();
    assert_eq!(input.records, records, "records output reads back as input");
}
