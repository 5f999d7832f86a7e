//! `bpo serve` on the tiny fixture model, on 127.0.0.1 port 0: greedy parity with `bpo generate` (PNG, JPEG,
//! adapters), streaming, every row of the error table (each answered with OpenAI's error object while the server
//! keeps serving), cancellation, SIGTERM with 8 running requests, and bpo's own clients against it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::util::{fixture, model_copy, s};

/// A `bpo serve` process; killed when dropped.
struct Serving {
    child: Child,
    url: String,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

impl Serving {
    fn start(args: &[&str]) -> Serving {
        Self::start_env(args, &[])
    }

    fn start_env(args: &[&str], env: &[(&str, &str)]) -> Serving {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpo"));
        cmd.args(["serve", "--port", "0"]).args(args).stderr(Stdio::piped()).stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("bpo serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://") {
                    let url = line[at..].split("/v1").next().unwrap_or_default().to_string();
                    let _ = tx.send(url);
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
            panic!("bpo serve did not start: {}", stderr.lock().unwrap());
        });
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .proxy(None)
            .build()
            .into();
        Serving { child, url, stderr, agent }
    }

    /// POSTs `body` (bytes) to `path`: the status and the body.
    fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut req = self.agent.post(format!("{}{path}", self.url)).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req.send(body).expect("the server answers");
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &[], body.to_string().as_bytes());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut resp = self.agent.get(format!("{}{path}", self.url)).call().expect("the server answers");
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    /// The content of a successful chat answer.
    fn answer(&self, body: &Value) -> String {
        let (status, v) = self.post("/v1/chat/completions", body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }

    /// A metric's value.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        line.and_then(|l| l[name.len()..].trim().parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
    }

    /// `status` with OpenAI's error object, then a good request still answered.
    fn refuses(&self, path: &str, body: &[u8], status: u16, needle: &str) -> Value {
        let (got, text) = self.post_raw(path, &[], body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(got, status, "{text}");
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().contains(needle), "{needle:?} in {text}");
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{text}");
        let mut good = chat("Is it still up?", None, json!({"max_tokens": 2}));
        good.as_object_mut().unwrap().remove("model");
        let (still, reply) = self.post("/v1/chat/completions", &good);
        assert_eq!(still, 200, "{reply}");
        v
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_url(path: &Path) -> String {
    let mime = if path.extension().is_some_and(|e| e == "jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()))
}

/// A chat request: one user message with `text` and an optional image URL (first, as LLaVA has it), greedy, with
/// the fields of `extra`.
fn chat(text: &str, image: Option<&str>, extra: Value) -> Value {
    let mut content = Vec::new();
    if let Some(url) = image {
        content.push(json!({"type": "image_url", "image_url": {"url": url, "detail": "auto"}}));
    }
    content.push(json!({"type": "text", "text": text}));
    let mut body = json!({"model": "llava-tiny", "messages": [{"role": "user", "content": content}], "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `bpo generate`'s answer (trimmed, as it prints it).
fn generate(model: &Path, image: &Path, prompt: &str, tokens: usize, adapter: Option<&Path>) -> String {
    let n = tokens.to_string();
    let mut args =
        vec!["generate", "--model", s(model), "--image", s(image), "--prompt", prompt, "--max-new-tokens", &n];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let o = crate::util::bpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn greedy_answers_equal_generate_for_png_and_jpeg_data_urls() {
    let model = fixture("llava-tiny");
    let server = Serving::start(&["--model", s(&model)]);
    for image in [fixture("images/chelsea.png"), fixture("images/rocket.jpg")] {
        let prompt = "What is in the image?";
        let served = server.answer(&chat(prompt, Some(&data_url(&image)), json!({"max_tokens": 12})));
        assert_eq!(served.trim(), generate(&model, &image, prompt, 12, None), "{}", image.display());
    }
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"], "llava-tiny");
    assert_eq!(server.get("/health"), (200, "ok".to_string()));
}

/// Concatenated `data:` chunks of a streamed reply, with the finish reason; every chunk is well-formed and the
/// stream ends with `[DONE]`.
fn streamed(server: &Serving, path: &str, body: &Value) -> (String, String) {
    let (status, text) = server.post_raw(path, &[], body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let (mut out, mut finish) = (String::new(), String::new());
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        let c = &v["choices"][0];
        out.push_str(c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (out, finish)
}

#[test]
fn streaming_gives_the_text_of_non_streaming() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    let image = data_url(&fixture("images/coffee.png"));
    for (extra, image) in
        [(json!({"max_tokens": 20}), Some(image.as_str())), (json!({"max_tokens": 16, "stop": ["e"]}), None)]
    {
        let body = chat("Describe the picture in detail.", image, extra);
        let (status, whole) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200);
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let (text, finish) = streamed(&server, "/v1/chat/completions", &streaming);
        assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
        assert_eq!(finish, whole["choices"][0]["finish_reason"].as_str().unwrap());
    }
    // Text completions too, with the usage chunk asked for.
    let body = json!({"prompt": "USER: Tell a story. ASSISTANT:", "max_tokens": 24, "temperature": 0});
    let (_, whole) = server.post("/v1/completions", &body);
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (text, _) = streamed(&server, "/v1/completions", &streaming);
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

/// A copy of the fixture adapter with LoRA B matrices set to a pattern of `sign`: a real, non-zero update.
fn adapter(dir: &Path, name: &str, sign: f32) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let src = fixture("dpo/init-adapter");
    std::fs::copy(src.join("adapter_config.json"), out.join("adapter_config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let changed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            if !k.contains("lora_B") {
                return (k, t);
            }
            let n = t.elem_count();
            let v: Vec<f32> = (0..n).map(|i| sign * 0.2 * ((i * 7919 % 97) as f32 / 48.0 - 1.0)).collect();
            (k, candle_core::Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&changed, out.join("adapter_model.safetensors")).unwrap();
    out
}

#[test]
fn two_adapters_and_the_base_answer_differently_each_as_generate_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (adapter(tmp.path(), "sft", 1.0), adapter(tmp.path(), "bpo", -1.0));
    let model = fixture("llava-tiny");
    let (sa, sb) = (format!("sft={}", s(&a)), format!("bpo={}", s(&b)));
    let server =
        Serving::start(&["--model", s(&model), "--adapter", &sa, "--adapter", &sb, "--served-model-name", "base"]);
    let (_, models) = server.get("/v1/models");
    let ids: Vec<String> = serde_json::from_str::<Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["base", "sft", "bpo"]);
    let image = fixture("images/chelsea.png");
    let prompt = "What animal is this?";
    let mut answers = Vec::new();
    for (name, dir) in [("base", None), ("sft", Some(a.as_path())), ("bpo", Some(b.as_path()))] {
        let served = server.answer(&chat(prompt, Some(&data_url(&image)), json!({"model": name, "max_tokens": 10})));
        assert_eq!(served.trim(), generate(&model, &image, prompt, 10, dir), "model {name}");
        answers.push(served);
    }
    assert!(answers[0] != answers[1] && answers[1] != answers[2] && answers[0] != answers[2], "{answers:?}");
    // An unknown model id is a 404 naming the served ones.
    let v = server.refuses(
        "/v1/chat/completions",
        chat("hi", None, json!({"model": "gpt-4"})).to_string().as_bytes(),
        404,
        "sft",
    );
    assert_eq!(v["error"]["code"], "model_not_found");
}

// The error table: one test per row.

#[test]
fn bad_json_is_a_400() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    server.refuses("/v1/chat/completions", b"{\"messages\": [", 400, "not valid JSON");
    server.refuses("/v1/chat/completions", br#"{"messages": "hello"}"#, 400, "not valid JSON");
    server.refuses(
        "/v1/chat/completions",
        br#"{"messages": [{"role": "user", "content": "x"}], "temperature": -1}"#,
        400,
        "temperature",
    );
    server.refuses(
        "/v1/chat/completions",
        br#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#,
        400,
        "n = 1",
    );
    server.refuses("/v1/completions", br#"{"prompt": 5}"#, 400, "prompt");
}

#[test]
fn a_bad_image_is_a_400() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    let garbage =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"not a png at all"));
    let v = server.refuses(
        "/v1/chat/completions",
        chat("What?", Some(&garbage), json!({})).to_string().as_bytes(),
        400,
        "bad image",
    );
    assert_eq!(v["error"]["code"], "invalid_image");
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some("data:image/png;base64,@@@"), json!({})).to_string().as_bytes(),
        400,
        "base64",
    );
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some("data:image/gif;base64,AAAA"), json!({})).to_string().as_bytes(),
        400,
        "image/gif",
    );
}

#[test]
fn a_prompt_over_the_context_is_a_400() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    let long = "cat ".repeat(400);
    let v = server.refuses("/v1/chat/completions", chat(&long, None, json!({})).to_string().as_bytes(), 400, "context");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let v = server.refuses(
        "/v1/chat/completions",
        chat("hi", None, json!({"max_tokens": 250})).to_string().as_bytes(),
        400,
        "context",
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let v = server.refuses("/v1/completions", json!({"prompt": long}).to_string().as_bytes(), 400, "context");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

#[test]
fn a_body_over_the_limit_is_a_413() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny")), "--max-body-bytes", "20000"]);
    let image = data_url(&fixture("images/chelsea.png"));
    assert!(image.len() > 20000);
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some(&image), json!({})).to_string().as_bytes(),
        413,
        "--max-body-bytes",
    );
    // Far over the limit: the client is still sending when the server has its answer, and must still read it.
    let mut big = chat("What?", Some(&image), json!({})).to_string().into_bytes();
    big.extend(std::iter::repeat_n(b' ', 16 << 20));
    server.refuses("/v1/chat/completions", &big, 413, "--max-body-bytes");
    let (status, _) = server.post_raw("/v1/no/such/route", &[], &big);
    assert_eq!(status, 404);
}

#[test]
fn an_image_over_the_pixel_limit_is_a_400() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny")), "--max-image-pixels", "100"]);
    let image = data_url(&fixture("images/chelsea.png"));
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some(&image), json!({})).to_string().as_bytes(),
        400,
        "--max-image-pixels",
    );
}

#[test]
fn remote_and_file_urls_are_refused_unless_a_local_folder_is_allowed() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    let chelsea = fixture("images/chelsea.png");
    let file = format!("file://{}", s(&chelsea));
    for (url, needle) in [
        ("https://example.com/cat.png", "remote"),
        ("http://127.0.0.1:1/cat.png", "remote"),
        (file.as_str(), "--allowed-local-media-path"),
    ] {
        let v = server.refuses(
            "/v1/chat/completions",
            chat("What?", Some(url), json!({})).to_string().as_bytes(),
            400,
            needle,
        );
        assert_eq!(v["error"]["code"], "invalid_image_url");
    }
    drop(server);
    // Allowed: files inside the folder (as the data URL of the same file answers); outside, refused.
    let images = fixture("images");
    let model = fixture("llava-tiny");
    let server = Serving::start(&["--model", s(&model), "--allowed-local-media-path", s(&images)]);
    let by_file = server.answer(&chat("What?", Some(&file), json!({"max_tokens": 6})));
    assert_eq!(by_file, server.answer(&chat("What?", Some(&data_url(&chelsea)), json!({"max_tokens": 6}))));
    let outside = format!("file://{}", s(&model.join("config.json")));
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some(&outside), json!({})).to_string().as_bytes(),
        400,
        "outside",
    );
    let sneaky = format!("file://{}/../llava-tiny/config.json", s(&images));
    server.refuses(
        "/v1/chat/completions",
        chat("What?", Some(&sneaky), json!({})).to_string().as_bytes(),
        400,
        "outside",
    );
}

/// Opens a streaming request and reads until its first token has arrived: the request is running.
fn open_stream(url: &str, body: &Value) -> std::net::TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = tcp.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        assert!(n > 0 && !text.starts_with("HTTP/1.1 4") && !text.starts_with("HTTP/1.1 5"), "{text}");
    }
    tcp
}

#[test]
fn a_full_queue_is_a_503() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny")), "--max-queue", "1"]);
    let long = chat("Tell me everything.", None, json!({"max_tokens": 150, "stream": true, "stop": ["never-said"]}));
    let held = open_stream(&server.url, &long);
    let (status, text) =
        server.post_raw("/v1/chat/completions", &[], chat("hi", None, json!({})).to_string().as_bytes());
    // Unless the first request already ended (EOS), the queue is full.
    if server.metric("bpo_requests_running") >= 1.0 {
        assert_eq!(status, 503, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "server_overloaded");
    }
    drop(held);
    let start = Instant::now();
    while server.post("/v1/chat/completions", &chat("hi", None, json!({"max_tokens": 2}))).0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(30), "the queue never emptied");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_api_key_is_required_when_set_and_never_logged() {
    let key = "sk-test-4c0ffee-very-secret";
    let server = Serving::start_env(
        &["--model", s(&fixture("llava-tiny")), "--api-key-env", "BPO_TEST_KEY"],
        &[("BPO_TEST_KEY", key)],
    );
    let body = chat("hi", None, json!({"max_tokens": 2})).to_string();
    for headers in
        [vec![], vec![("Authorization", "Bearer wrong")], vec![("Authorization", "sk-test-4c0ffee-very-secret")]]
    {
        let (status, text) = server.post_raw("/v1/chat/completions", &headers, body.as_bytes());
        assert_eq!(status, 401, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["type"], "authentication_error");
    }
    let auth = format!("Bearer {key}");
    let (status, text) = server.post_raw("/v1/chat/completions", &[("Authorization", &auth)], body.as_bytes());
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.get("/health").0, 200, "health needs no key");
    server.post_raw("/v1/chat/completions", &[("Authorization", &auth)], b"{bad json");
    let log = server.log();
    assert!(log.contains("API key required") && !log.contains(key), "{log}");
}

#[test]
fn a_client_that_goes_away_cancels_its_sequence() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny"))]);
    let long = chat("Tell me everything.", None, json!({"max_tokens": 150, "stream": true, "stop": ["never-said"]}));
    let held = open_stream(&server.url, &long);
    drop(held);
    let start = Instant::now();
    while server.metric("bpo_requests_running") > 0.0 || server.metric("bpo_requests_cancelled_total") < 1.0 {
        // Either cancelled, or it ended by itself (EOS) before the disconnect was seen.
        if server.metric("bpo_generation_tokens_total") > 0.0 && server.metric("bpo_requests_running") == 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the sequence kept running: {}", server.get("/metrics").1);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.metric("bpo_requests_running"), 0.0);
}

#[test]
fn sigterm_lets_eight_running_requests_finish() {
    let server = Serving::start(&["--model", s(&fixture("llava-tiny")), "--batch-size", "8"]);
    let streams: Vec<std::net::TcpStream> = (0..8)
        .map(|i| {
            let body = chat(&format!("Story number {i}, please."), None, json!({"max_tokens": 120, "stream": true}));
            open_stream(&server.url, &body)
        })
        .collect();
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    for mut tcp in streams {
        let mut rest = String::new();
        tcp.read_to_string(&mut rest).unwrap();
        assert!(rest.contains("data: [DONE]") && rest.contains("finish_reason\":\""), "{rest}");
    }
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", server.log());
    assert!(server.log().contains("SIGTERM"));
}

#[test]
fn bootstrap_inject_and_mmvet_judge_run_against_a_served_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    // The few-shot prompts need more than the fixture's 256 positions: the same weights with a longer context.
    let model = model_copy("llava-tiny", tmp.path());
    let cfg_path = model.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["max_position_embeddings"] = json!(4096);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let server = Serving::start(&["--model", s(&model), "--served-model-name", "tiny"]);

    let data = tmp.path().join("llava.json");
    let samples = json!([
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red bus next to a tree."}]},
        {"id": "2", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Two cats on a sofa."}]}
    ]);
    std::fs::write(&data, samples.to_string()).unwrap();
    let out = tmp.path().join("records.jsonl");
    let o = crate::util::bpo(&[
        "bootstrap",
        "inject",
        "--llm-url",
        &server.url,
        "--server-model",
        "tiny",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--max-tokens",
        "16",
        "--seed",
        "1",
        "--retries",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(summary["requests"], 2, "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);

    let judged = tmp.path().join("mmvet");
    let j = |f: &str| fixture("judge").join(f);
    let o = crate::util::bpo(&[
        "eval",
        "mmvet",
        "--questions",
        s(&j("mm-vet.json")),
        "--answers",
        s(&j("mmvet-results.json")),
        "--runs",
        "1",
        "--out",
        s(&judged),
        "--judge-url",
        &server.url,
        "--judge-model",
        "tiny",
        "--judge-retries",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scores: Value = serde_json::from_str(&std::fs::read_to_string(judged.join("scores.json")).unwrap()).unwrap();
    assert_eq!(scores["kind"], "mmvet");
    assert!(server.metric("bpo_requests_total{status=\"200\"}") >= 8.0, "2 injections + 6 gradings at least");
}
