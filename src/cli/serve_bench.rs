//! `bpo bench serve`: a `bpo serve` server in this process on 127.0.0.1, driven by N concurrent HTTP clients.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bpo::bench::Size;
use bpo::serve::{ServeOptions, Served, Server};
use serde_json::{json, Value};

use super::RuntimeArgs;

#[derive(clap::Args)]
pub struct ServeBench {
    /// Model configuration, built with random weights in memory.
    #[arg(long, value_enum, default_value = "small")]
    size: Size,
    /// Serve this model folder instead of a random-weight one.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Concurrent clients to time, one setting after the other (1 = one request at a time, the baseline).
    #[arg(long, num_args = 1.., default_values_t = [1, 32], value_parser = super::range::at_least_one)]
    clients: Vec<usize>,
    /// Requests per setting (the same requests for every setting).
    #[arg(long, default_value_t = 64, value_parser = super::range::at_least_one)]
    requests: usize,
    /// Words of each prompt (a chat message, no image unless --image).
    #[arg(long, default_value_t = 16, value_parser = super::range::at_least_one)]
    prompt_words: usize,
    /// max_tokens of each request (greedy; an answer may end earlier at EOS).
    #[arg(long, default_value_t = 32, value_parser = super::range::at_least_one)]
    max_tokens: usize,
    /// Send a 64x48 PNG with every request (as a data URL), so that each prefill runs the vision tower.
    #[arg(long)]
    image: bool,
    /// The server's batch size (sequences generated together).
    #[arg(long, default_value_t = 32, value_parser = super::range::at_least_one)]
    batch_size: usize,
    /// Instead: a load of this many requests from --load-clients clients, every --malformed-every-th of them
    /// malformed (bad JSON, a bad image, a prompt over the context, an unknown model, n = 2, in turn); reports
    /// failures and the server's memory after the first 100 requests and at the end.
    #[arg(long)]
    load: Option<usize>,
    #[arg(long, default_value_t = 64, value_parser = super::range::at_least_one)]
    load_clients: usize,
    #[arg(long, default_value_t = 10, value_parser = super::range::at_least_one)]
    malformed_every: usize,
}

/// One request's timings.
struct Timing {
    latency: Duration,
    first_token: Duration,
    tokens: usize,
}

pub fn run(a: ServeBench) -> anyhow::Result<()> {
    let scratch = tempdir()?;
    let rt = a.runtime.runtime()?;
    let vlm = match &a.model {
        Some(dir) => bpo::model::Vlm::load(dir, &bpo::model::LoadOptions::new(&rt), bpo::text::Template::VicunaV1)?,
        None => a.size.random_vlm(&rt, &scratch)?,
    };
    let context = vlm.model.llm.cfg.max_position_embeddings;
    let vocab = vlm.tok.vocab_size();
    let what = a.model.as_ref().map_or(format!("{:?} (random weights)", a.size), |m| m.display().to_string());
    let opts = ServeOptions { engine: bpo::generate::EngineOptions::rows(a.batch_size, None), ..Default::default() };
    let server = Server::start(std::net::TcpListener::bind("127.0.0.1:0")?, Served::new(vlm, "bench"), opts)?;
    let url = format!("{}/v1/chat/completions", server.url());
    let image = a.image.then(png_data_url);
    let body = |i: usize| {
        let words: Vec<String> =
            (0..a.prompt_words).map(|j| format!("w{}", 10 + (i * 7919 + j * 131) % (vocab - 20))).collect();
        chat_body(&words.join(" "), image.as_deref(), a.max_tokens)
    };
    if let Some(load) = a.load {
        let r = load_test(&url, load, a.load_clients, a.malformed_every, context, &body);
        server.stop()?;
        return r;
    }
    outln!(
        "bench serve: {what}, {} requests of {} prompt words{}, max_tokens {}, server batch {}",
        a.requests,
        a.prompt_words,
        if a.image { " + an image" } else { "" },
        a.max_tokens,
        a.batch_size
    );
    outln!(
        "{:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "clients",
        "failed",
        "req/s",
        "tokens/s",
        "p50 s",
        "p99 s",
        "ttft p50",
        "ttft p99"
    );
    let mut baseline = None;
    for &clients in &a.clients {
        let start = Instant::now();
        let (timings, failed) = drive(&url, a.requests, clients, &|i| (body(i), true));
        let wall = start.elapsed().as_secs_f64();
        let rps = timings.len() as f64 / wall;
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let mut lat: Vec<f64> = timings.iter().map(|t| t.latency.as_secs_f64()).collect();
        let mut ttft: Vec<f64> = timings.iter().map(|t| t.first_token.as_secs_f64()).collect();
        outln!(
            "{clients:>8} {failed:>8} {rps:>10.2} {:>10.1} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            tokens as f64 / wall,
            quantile(&mut lat, 0.5),
            quantile(&mut lat, 0.99),
            quantile(&mut ttft, 0.5),
            quantile(&mut ttft, 0.99)
        );
        match baseline {
            None => baseline = Some(rps),
            Some(b) => {
                outln!("         {clients} clients: {:.2}x the requests/s of {} client(s)", rps / b, a.clients[0])
            }
        }
    }
    server.stop()?;
    std::fs::remove_dir_all(&scratch).ok();
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bpo-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn chat_body(text: &str, image: Option<&str>, max_tokens: usize) -> Value {
    let mut content = vec![json!({"type": "text", "text": text})];
    if let Some(url) = image {
        content.insert(0, json!({"type": "image_url", "image_url": {"url": url}}));
    }
    json!({"model": "bench", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens})
}

/// A 64x48 gradient as a PNG data URL.
fn png_data_url() -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
    let mut png = Vec::new();
    let _ = img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png);
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .proxy(None)
        .build()
        .into()
}

/// Sends request `i` of `n` (its body and whether it streams) from `clients` threads; the timings of the answered
/// ones and the number that failed.
fn drive(
    url: &str,
    n: usize,
    clients: usize,
    request: &(dyn Fn(usize) -> (Value, bool) + Sync),
) -> (Vec<Timing>, usize) {
    let next = AtomicUsize::new(0);
    let out = Mutex::new((Vec::new(), 0usize));
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                let agent = agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let (body, stream) = request(i);
                    let r = send(&agent, url, &body, stream);
                    if let Ok(mut o) = out.lock() {
                        match r {
                            Ok(t) => o.0.push(t),
                            Err(e) => {
                                o.1 += 1;
                                errln!("request {i} failed: {e}");
                            }
                        }
                    }
                }
            });
        }
    });
    out.into_inner().unwrap_or_default()
}

/// One request, streamed (the first token timed) or not.
fn send(agent: &ureq::Agent, url: &str, body: &Value, stream: bool) -> anyhow::Result<Timing> {
    use std::io::BufRead;
    let mut body = body.clone();
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let start = Instant::now();
    let mut resp = agent.post(url).send_json(&body)?;
    if resp.status() != 200 {
        bail!("status {}: {}", resp.status(), resp.body_mut().read_to_string().unwrap_or_default());
    }
    if !stream {
        let v: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
        let latency = start.elapsed();
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        return Ok(Timing { latency, first_token: latency, tokens });
    }
    let (mut first, mut tokens, mut done) = (None, 0, false);
    for line in std::io::BufReader::new(resp.body_mut().as_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            bail!("{data}");
        }
        if first.is_none() && v["choices"][0]["delta"]["content"].is_string() {
            first = Some(start.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    let latency = start.elapsed();
    Ok(Timing { latency, first_token: first.unwrap_or(latency), tokens })
}

/// A malformed request of kind `k`: (body bytes as JSON text, what it is).
fn malformed(k: usize, context: usize) -> (String, &'static str) {
    match k % 5 {
        0 => ("{\"messages\": [{\"role\": \"user\", \"content\": ".into(), "bad JSON"),
        1 => (chat_body("What?", Some("data:image/png;base64,bm90IGEgcG5n"), 8).to_string(), "bad image"),
        2 => (chat_body(&"w11 ".repeat(context + 10), None, 8).to_string(), "prompt over the context"),
        3 => (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).to_string(), "unknown model"),
        _ => (json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(), "n = 2"),
    }
}

/// The load test's clients: well-formed requests from `body`, every `every`-th one malformed instead.
struct Load<'a> {
    url: &'a str,
    clients: usize,
    every: usize,
    context: usize,
    body: &'a (dyn Fn(usize) -> Value + Sync),
    /// Malformed requests not answered with a 4xx.
    wrong: AtomicUsize,
}

impl Load<'_> {
    /// Whether request `i` is one of the malformed ones.
    fn is_malformed(&self, i: usize) -> bool {
        i % self.every == self.every - 1
    }

    /// Sends malformed request `i`, counting it in `wrong` unless it is answered with a 4xx.
    fn malformed(&self, agent: &ureq::Agent, i: usize) {
        let (text, what) = malformed(i / self.every, self.context);
        let status = agent
            .post(self.url)
            .header("Content-Type", "application/json")
            .send(text.as_bytes())
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if !(400..500).contains(&status) {
            self.wrong.fetch_add(1, Ordering::Relaxed);
            errln!("malformed request {i} ({what}) answered {status}");
        }
    }

    /// Requests `from..to` over the clients: (well-formed answered, well-formed failed).
    fn phase(&self, from: usize, to: usize) -> (usize, usize) {
        let next = AtomicUsize::new(from);
        let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..self.clients {
                s.spawn(|| {
                    let agent = agent();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            break;
                        }
                        if self.is_malformed(i) {
                            self.malformed(&agent, i);
                            continue;
                        }
                        match send(&agent, self.url, &(self.body)(i), i.is_multiple_of(2)) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                errln!("request {i} failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                });
            }
        });
        (ok.into_inner(), failed.into_inner())
    }
}

/// The load test (see `--load`).
fn load_test(
    url: &str,
    n: usize,
    clients: usize,
    every: usize,
    context: usize,
    body: &(dyn Fn(usize) -> Value + Sync),
) -> anyhow::Result<()> {
    let load = Load { url, clients, every, context, body, wrong: AtomicUsize::new(0) };
    let phase = |from, to| load.phase(from, to);
    let start = Instant::now();
    let first = phase(0, n.min(100));
    let after_100 = (bpo::memory::heap_live(), bpo::memory::resident());
    let rest = phase(n.min(100), n);
    let end = (bpo::memory::heap_live(), bpo::memory::resident());
    let wall = start.elapsed().as_secs_f64();
    let malformed_count = (0..n).filter(|&i| load.is_malformed(i)).count();
    let (ok, failed) = (first.0 + rest.0, first.1 + rest.1);
    outln!(
        "load: {n} requests from {clients} clients in {wall:.1} s ({:.1} req/s), {malformed_count} malformed",
        n as f64 / wall
    );
    outln!(
        "  well-formed answered 200: {ok}, failed: {failed}; malformed not answered 4xx: {}",
        load.wrong.load(Ordering::Relaxed)
    );
    let mib = |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64));
    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if a > 0 => format!("{:+.1}%", (b as f64 / a as f64 - 1.0) * 100.0),
        _ => "n/a".into(),
    };
    outln!(
        "  live heap after 100 requests {}, at the end {} ({})",
        mib(after_100.0),
        mib(end.0),
        pct(after_100.0, end.0)
    );
    outln!(
        "  resident set after 100 requests {}, at the end {} ({})",
        mib(after_100.1),
        mib(end.1),
        pct(after_100.1, end.1)
    );
    if failed > 0 || load.wrong.load(Ordering::Relaxed) > 0 {
        bail!(
            "{failed} well-formed requests failed, {} malformed ones were not refused with a 4xx",
            load.wrong.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
