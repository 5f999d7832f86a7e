//! The judge as a client of an OpenAI-compatible chat server (feature `http`): requests, the reply cache, and a
//! reachability check. See [`super`] for what it guarantees.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Ask, ChatRequest, Grader, JudgeOptions, Reply};
use crate::data::{ResumableWriter, Shape};
use crate::hash::stable_hash;
use crate::http::{endpoint_url, Endpoint, HttpCompleter, HttpOptions};
use crate::{bail, jsonl, Error, Result};

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

/// What every line of the cache holds.
const CACHE: Shape =
    Shape { what: "judge cache", key: "key", fields: &["model", "reply", "request", "run", "served_model"] };

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
            max_reply_bytes: crate::http::DEFAULT_MAX_REPLY_BYTES,
            allow_empty: true,
            backoff: opts.backoff,
            concurrency: opts.concurrency,
        })?;
        if let Some(dir) = opts.cache.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let inputs: Vec<&std::path::Path> = opts.inputs.iter().map(|p| p.as_path()).collect();
        let (writer, reopened) = ResumableWriter::open_as(&opts.cache, CACHE, &inputs)?;
        let note =
            reopened.torn.map(|t| format!("{}:{}: cut a torn last line ({})", opts.cache.display(), t.line, t.reason));
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

impl Grader for Judge {
    fn model(&self) -> &str {
        Judge::model(self)
    }
    fn concurrency(&self) -> usize {
        Judge::concurrency(self)
    }
    fn counts(&self) -> (usize, usize) {
        Judge::counts(self)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::judge::Message;

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
            inputs: Vec::new(),
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
        assert_eq!(
            body,
            json!({"model": "a", "messages": [{"role": "user", "content": "q"}], "temperature": 0.0, "max_tokens": 3})
        );
        assert!(a.body(&ChatRequest { max_tokens: None, ..r }).get("max_tokens").is_none());
    }
}
