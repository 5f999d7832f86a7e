//! An LLM judge behind an OpenAI-compatible chat server, for the judged benchmarks ([`super::mmvet`],
//! [`super::llava_bench`], [`super::mmhal`]).
//!
//! - A request is what the official scripts send to `/v1/chat/completions`: `model`, `messages`,
//!   `temperature`, and `max_tokens` only where the script sets one. Transport, retries and back-off are
//!   [`HttpCompleter::send`]'s: connection errors, timeouts, 429, 5xx and replies that are not the expected JSON
//!   (HTML, malformed JSON, no `choices`, a `null` message, an oversized body) are retried `retries`
//!   times with a doubling wait; any other failure, or one that outlasts the retries, stops the run with one line
//!   naming the judge URL and the reason. Nothing unread is cached.
//! - Every reply is appended to a cache file (JSON Lines) under a key derived from (judge model, run index,
//!   messages, temperature, max_tokens) before it is used, so a killed run asks only what it had not asked, and
//!   a re-run with the same answers sends nothing. A line torn by a kill is cut away on open. The cache holds
//!   requests and replies, never the API key (the caller reads it from an environment variable; it only ever
//!   travels in the `Authorization` header).
//! - [`map_concurrent`] grades items on `concurrency` scoped threads; the first error stops the others from
//!   starting new items. [`check_reachable`] lets a caller fail before any work when the judge is not there.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bootstrap::http::{endpoint_url, Endpoint, HttpCompleter, HttpOptions};
use crate::data::ResumableWriter;
use crate::hash::stable_hash;
use crate::{bail, jsonl, Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Message { role: "system".into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message { role: "user".into(), content: content.into() }
    }
}

/// One judge request, as an official script builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub temperature: f64,
    /// `max_tokens`, only when the official script sets it.
    pub max_tokens: Option<u32>,
}

/// What the judge said: the message text and the model that served it (the reply's `model` field).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: String,
    pub model: String,
}

/// Anything that answers judge requests: the [`Judge`], or a closure in tests. `run` is the repetition index
/// (MM-Vet grades each answer several times); it is part of the cache key.
pub trait Ask: Sync {
    fn ask(&self, request: &ChatRequest, run: usize) -> Result<Reply>;
}

impl<F: Fn(&ChatRequest, usize) -> Result<Reply> + Sync> Ask for F {
    fn ask(&self, request: &ChatRequest, run: usize) -> Result<Reply> {
        self(request, run)
    }
}

/// Settings of [`Judge::open`].
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// Server root (`http://127.0.0.1:8000`), `.../v1`, or the full `/v1/chat/completions` URL.
    pub url: String,
    /// `model` of every request (the official judges: `gpt-4-0613` for MM-Vet, `gpt-4-0314` for LLaVA-Bench
    /// and MMHal-Bench).
    pub model: String,
    /// Sent as `Authorization: Bearer <key>`; never written anywhere.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Extra attempts after a connection error, timeout, 429 or 5xx.
    pub retries: u32,
    /// First wait before a retry, doubled each time (at most 30 s).
    pub backoff: Duration,
    /// Total time allowed for one request (default [`crate::bootstrap::http::DEFAULT_TIMEOUT`] in the CLI).
    pub timeout: Duration,
    /// The reply cache (JSON Lines), created if missing.
    pub cache: PathBuf,
}

/// One line of the cache file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheLine {
    key: String,
    model: String,
    run: usize,
    request: ChatRequest,
    reply: String,
    served_model: String,
}

struct Cache {
    writer: ResumableWriter,
    lines: HashMap<String, CacheLine>,
}

/// The judge: an HTTP client, its reply cache and request counters.
pub struct Judge {
    http: HttpCompleter,
    model: String,
    concurrency: usize,
    cache: Mutex<Cache>,
    sent: AtomicUsize,
    cached: AtomicUsize,
}

impl Judge {
    /// Opens the cache (repairing a torn last line, reported in the returned message) and checks the URL.
    pub fn open(opts: &JudgeOptions) -> Result<(Judge, Option<String>)> {
        if opts.model.trim().is_empty() {
            bail!("the judge model name is empty");
        }
        let http = HttpCompleter::new(HttpOptions {
            url: opts.url.clone(),
            endpoint: Endpoint::Chat,
            model: Some(opts.model.clone()),
            api_key: opts.api_key.clone(),
            timeout: opts.timeout,
            retries: opts.retries,
            max_reply_bytes: crate::bootstrap::http::DEFAULT_MAX_REPLY_BYTES,
            allow_empty: true,
            backoff: opts.backoff,
            concurrency: opts.concurrency,
        })?;
        if let Some(dir) = opts.cache.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let (writer, reopened) = ResumableWriter::open_with_key(&opts.cache, "key")?;
        let note = reopened.torn.map(|t| format!("{}:{}: cut a torn last line ({})", opts.cache.display(), t.line, t.reason));
        let lines = jsonl::read::<CacheLine>(&opts.cache)?.into_iter().map(|l| (l.key.clone(), l)).collect();
        let judge = Judge {
            http,
            model: opts.model.clone(),
            concurrency: opts.concurrency,
            cache: Mutex::new(Cache { writer, lines }),
            sent: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
        };
        Ok((judge, note))
    }

    /// The judge model requests name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Requests in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Requests sent to the server so far, and requests answered from the cache.
    pub fn counts(&self) -> (usize, usize) {
        (self.sent.load(Ordering::Relaxed), self.cached.load(Ordering::Relaxed))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Cache>> {
        self.cache.lock().map_err(|_| Error::invalid("judge cache lock poisoned by a failed worker"))
    }

    /// The cache key of a request: a stable hash of (model, run, request) as JSON.
    fn key(&self, request: &ChatRequest, run: usize) -> Result<String> {
        let text = serde_json::to_string(request).map_err(|e| Error::invalid(format!("judge request: {e}")))?;
        Ok(format!("{:016x}", stable_hash(&[&self.model, &run.to_string(), &text])))
    }

    /// The request body the official scripts send.
    fn body(&self, request: &ChatRequest) -> Value {
        let mut body = json!({"model": self.model, "messages": request.messages, "temperature": request.temperature});
        if let Some(n) = request.max_tokens {
            body["max_tokens"] = json!(n);
        }
        body
    }
}

impl Ask for Judge {
    fn ask(&self, request: &ChatRequest, run: usize) -> Result<Reply> {
        let key = self.key(request, run)?;
        if let Some(line) = self.lock()?.lines.get(&key).filter(|l| l.request == *request && l.model == self.model) {
            self.cached.fetch_add(1, Ordering::Relaxed);
            return Ok(Reply { content: line.reply.clone(), model: line.served_model.clone() });
        }
        let raw = self.http.send(&self.body(request)).map_err(|e| Error::Http(format!("judge {e}")))?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let reply = Reply { content: raw.text, model: raw.model.unwrap_or_else(|| self.model.clone()) };
        let line = CacheLine {
            key: key.clone(),
            model: self.model.clone(),
            run,
            request: request.clone(),
            reply: reply.content.clone(),
            served_model: reply.model.clone(),
        };
        let mut cache = self.lock()?;
        // Two workers may ask the same request at once (identical prompts): keep the first reply on disk.
        if !cache.writer.is_done(&key) {
            cache.writer.append(&line)?;
            cache.lines.insert(key, line);
        }
        Ok(reply)
    }
}

/// Applies `f` to every item on `workers` scoped threads, keeping the input order, and calls `progress` after
/// each finished item. The first error is returned; items not yet started are then skipped.
pub fn map_concurrent<I: Sync, T: Send>(
    items: &[I],
    workers: usize,
    f: impl Fn(&I) -> Result<T> + Sync,
    progress: impl Fn() + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let mut slots: Vec<Option<T>> = items.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.clamp(1, items.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::SeqCst) {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(item) = items.get(i) else { break };
                        match f(item) {
                            Ok(t) => {
                                done.push((i, t));
                                progress();
                            }
                            Err(e) => {
                                failed.store(true, Ordering::SeqCst);
                                if let Ok(mut slot) = first_error.lock() {
                                    slot.get_or_insert(e);
                                }
                            }
                        }
                    }
                    done
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(done) => done.into_iter().for_each(|(i, t)| slots[i] = Some(t)),
                Err(_) => failed.store(true, Ordering::SeqCst),
            }
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    slots.into_iter().map(|s| s.ok_or_else(|| Error::invalid("a judge worker thread panicked"))).collect()
}

/// Checks that a TCP connection to the judge's host and port opens (nothing is sent), so a run that would
/// first spend hours generating answers stops at once when the judge is not there.
pub fn check_reachable(url: &str, timeout: Duration) -> Result<()> {
    let full = endpoint_url(url, Endpoint::Chat)?;
    let (rest, default_port) = match full.strip_prefix("https://") {
        Some(rest) => (rest, 443),
        None => (full.trim_start_matches("http://"), 80),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let has_port = if host.starts_with('[') { host.contains("]:") } else { host.contains(':') };
    let target = if has_port { host.to_string() } else { format!("{host}:{default_port}") };
    let fail = |what: String| Error::Http(format!("judge {full}: {what}"));
    let addrs = target.to_socket_addrs().map_err(|e| fail(format!("cannot resolve {host}: {e}")))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(fail(format!("cannot connect to {target}: {}", last.map_or("no address".to_string(), |e| e.to_string()))))
}

/// The default cache file of a run folder.
pub fn cache_path(out: &Path) -> PathBuf {
    out.join("judge-cache.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_order_and_stops_at_the_first_error() {
        let items: Vec<usize> = (0..50).collect();
        let out = map_concurrent(&items, 4, |&i| Ok(i * 2), || {}).unwrap();
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let calls = AtomicUsize::new(0);
        let err = map_concurrent(
            &items,
            1,
            |&i| {
                calls.fetch_add(1, Ordering::SeqCst);
                if i == 3 {
                    Err(Error::Http("boom".into()))
                } else {
                    Ok(i)
                }
            },
            || {},
        );
        assert_eq!(err.unwrap_err().to_string(), "boom");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one worker stops after the failing item");
        assert!(map_concurrent(&Vec::<u8>::new(), 3, |&i| Ok(i), || {}).unwrap().is_empty());
    }

    #[test]
    fn keys_depend_on_model_run_and_request() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |model: &str| JudgeOptions {
            url: "http://127.0.0.1:9".into(),
            model: model.into(),
            api_key: None,
            concurrency: 1,
            retries: 0,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(1),
            cache: dir.path().join(format!("{model}.jsonl")),
        };
        let (a, _) = Judge::open(&opts("a")).unwrap();
        let (b, _) = Judge::open(&opts("b")).unwrap();
        let r = ChatRequest { messages: vec![Message::user("q")], temperature: 0.0, max_tokens: Some(3) };
        let r2 = ChatRequest { temperature: 0.5, ..r.clone() };
        let keys = [a.key(&r, 0).unwrap(), a.key(&r, 1).unwrap(), b.key(&r, 0).unwrap(), a.key(&r2, 0).unwrap()];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
        assert_eq!(a.key(&r, 0).unwrap(), a.key(&r.clone(), 0).unwrap());
        let body = a.body(&r);
        assert_eq!(body, json!({"model": "a", "messages": [{"role": "user", "content": "q"}], "temperature": 0.0, "max_tokens": 3}));
        assert!(a.body(&ChatRequest { max_tokens: None, ..r }).get("max_tokens").is_none());
    }
}
