//! [`Completer`] over an OpenAI-compatible HTTP server (llama.cpp `llama-server`, vLLM, Ollama, ...).
//!
//! - Endpoint: `/v1/completions` (raw text; the caller wraps the chat format itself) or `/v1/chat/completions`
//!   (the server applies its chat template; the prompt is sent as one user message). `--llm-url` may be the
//!   server root, `.../v1`, or the full endpoint URL.
//! - Plain `http://` only: ureq is built without TLS. Environment proxies are ignored (LLM servers are usually
//!   local, and a proxy in the environment would otherwise capture loopback requests).
//! - Each request has a total time limit. Connection errors, timeouts, 5xx and 429 are retried with exponential
//!   back-off (`backoff * 2^k`, at most 30 s); other 4xx fail at once. A request that still fails is
//!   `Err(Error::Http)` for that prompt only; a reply without text is `Err(Error::Invalid)`.
//! - Up to `concurrency` requests run at once on scoped std threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::inject::{Completer, CompletionOptions};
use crate::{bail, Error, Result};

/// Which OpenAI endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    /// `/v1/completions`: `prompt` in, `choices[0].text` out.
    #[default]
    Completions,
    /// `/v1/chat/completions`: one user message in, `choices[0].message.content` out.
    Chat,
}

/// Settings of [`HttpCompleter`].
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Server root (`http://127.0.0.1:8080`), `.../v1`, or the full endpoint URL.
    pub url: String,
    pub endpoint: Endpoint,
    /// `model` field of each request; servers with one model (llama.cpp) ignore it.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Total time allowed for one request, body included; default 300 s.
    pub timeout: Duration,
    /// Extra attempts after a retryable failure; default 3.
    pub retries: u32,
    /// First back-off wait, doubled each retry; default 1 s.
    pub backoff: Duration,
    /// Requests in flight at once; default 4.
    pub concurrency: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            url: String::new(),
            endpoint: Endpoint::Completions,
            model: None,
            api_key: None,
            timeout: Duration::from_secs(300),
            retries: 3,
            backoff: Duration::from_secs(1),
            concurrency: 4,
        }
    }
}

/// An OpenAI-compatible server as a [`Completer`].
pub struct HttpCompleter {
    opts: HttpOptions,
    url: String,
    agent: ureq::Agent,
}

/// Outcome of one attempt.
enum Attempt {
    Done(Result<String>),
    Retry(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl HttpCompleter {
    pub fn new(opts: HttpOptions) -> Result<Self> {
        let url = endpoint_url(&opts.url, opts.endpoint)?;
        if opts.concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .http_status_as_error(false)
            .proxy(None)
            .build();
        Ok(HttpCompleter { opts, url, agent: config.into() })
    }

    /// The full URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One prompt, with retries.
    pub fn complete_one(&self, prompt: &str, opts: &CompletionOptions) -> Result<String> {
        reply_text(&self.send(&self.request_body(prompt, opts))?, self.opts.endpoint)
    }

    /// Posts `body` to the endpoint, retrying as the module doc says; the body of the first 2xx reply.
    pub fn send(&self, body: &Value) -> Result<String> {
        let mut wait = self.opts.backoff;
        let mut attempt = 0;
        loop {
            match self.attempt(body) {
                Attempt::Done(result) => return result,
                Attempt::Retry(msg) if attempt >= self.opts.retries => {
                    return Err(Error::Http(format!("{}: {msg} (after {} attempts)", self.url, attempt + 1)));
                }
                Attempt::Retry(_) => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }

    fn request_body(&self, prompt: &str, opts: &CompletionOptions) -> Value {
        let mut body = json!({
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "max_tokens": opts.max_tokens,
            "n": 1,
            "stream": false,
        });
        match self.opts.endpoint {
            Endpoint::Completions => body["prompt"] = json!(prompt),
            Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": prompt}]),
        }
        if !opts.stop.is_empty() {
            body["stop"] = json!(opts.stop);
        }
        if let Some(seed) = opts.seed {
            body["seed"] = json!(seed);
        }
        if let Some(model) = &self.opts.model {
            body["model"] = json!(model);
        }
        body
    }

    fn attempt(&self, body: &Value) -> Attempt {
        let mut req = self.agent.post(&self.url);
        if let Some(key) = &self.opts.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let mut resp = match req.send_json(body) {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(e.to_string()),
        };
        let status = resp.status().as_u16();
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(format!("reading the reply: {e}")),
        };
        match status {
            200..=299 => Attempt::Done(Ok(text)),
            429 | 500..=599 => Attempt::Retry(format!("status {status}: {}", snippet(&text))),
            _ => Attempt::Done(Err(Error::Http(format!("{}: status {status}: {}", self.url, snippet(&text))))),
        }
    }
}

impl Completer for HttpCompleter {
    fn complete(&self, prompts: &[String], opts: &CompletionOptions) -> Result<Vec<Result<String>>> {
        let next = AtomicUsize::new(0);
        let workers = self.opts.concurrency.min(prompts.len());
        let mut slots: Vec<Option<Result<String>>> = prompts.iter().map(|_| None).collect();
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(prompt) = prompts.get(i) else { return done };
                            done.push((i, self.complete_one(prompt, opts)));
                        }
                    })
                })
                .collect();
            for handle in handles {
                let done = handle.join().map_err(|_| Error::Http("an HTTP worker thread panicked".into()))?;
                for (i, result) in done {
                    slots[i] = Some(result);
                }
            }
            Ok(())
        })?;
        Ok(slots.into_iter().map(|s| s.unwrap_or_else(|| Err(Error::Http("request was not run".into())))).collect())
    }
}

/// The endpoint URL for a user-given server address.
pub fn endpoint_url(base: &str, endpoint: Endpoint) -> Result<String> {
    let base = base.trim().trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        bail!("LLM URL {base:?}: give an http:// or https:// URL");
    }
    if base.ends_with("/completions") {
        return Ok(base.to_string());
    }
    let path = match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat/completions",
    };
    Ok(if base.ends_with("/v1") { format!("{base}/{path}") } else { format!("{base}/v1/{path}") })
}

/// `choices[0].text` (completions) or `choices[0].message.content` (chat) of a reply body.
pub fn reply_text(body: &str, endpoint: Endpoint) -> Result<String> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| Error::invalid(format!("reply is not JSON ({e}): {}", snippet(body))))?;
    let choice = &v["choices"][0];
    let text = match endpoint {
        Endpoint::Completions => &choice["text"],
        Endpoint::Chat => &choice["message"]["content"],
    };
    text.as_str().map(str::to_string).ok_or_else(|| Error::invalid(format!("reply has no text: {}", snippet(body))))
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Endpoint::Completions;
        assert_eq!(endpoint_url("http://127.0.0.1:8080", c).unwrap(), "http://127.0.0.1:8080/v1/completions");
        assert_eq!(endpoint_url("http://h:1/v1/", Endpoint::Chat).unwrap(), "http://h:1/v1/chat/completions");
        assert_eq!(endpoint_url("http://h:1/v1/chat/completions", c).unwrap(), "http://h:1/v1/chat/completions");
        assert_eq!(endpoint_url("https://api.example.com/v1", Endpoint::Chat).unwrap(), "https://api.example.com/v1/chat/completions");
        assert!(endpoint_url("ftp://api.example.com", c).is_err());
    }

    #[test]
    fn reply_parsing() {
        assert_eq!(reply_text(r#"{"choices": [{"text": " hi"}]}"#, Endpoint::Completions).unwrap(), " hi");
        let chat = r#"{"choices": [{"message": {"role": "assistant", "content": "yo"}}]}"#;
        assert_eq!(reply_text(chat, Endpoint::Chat).unwrap(), "yo");
        assert!(matches!(reply_text(chat, Endpoint::Completions), Err(Error::Invalid(_))));
        assert!(matches!(reply_text("<html>", Endpoint::Chat), Err(Error::Invalid(_))));
    }

    #[test]
    fn request_bodies() {
        let mk = |endpoint| {
            let opts = HttpOptions { url: "http://x".into(), endpoint, model: Some("m".into()), ..Default::default() };
            HttpCompleter::new(opts).unwrap()
        };
        let copts = CompletionOptions { stop: vec!["</s>".into()], seed: Some(3), ..Default::default() };
        let b = mk(Endpoint::Completions).request_body("P", &copts);
        assert_eq!((b["prompt"].as_str(), b["model"].as_str(), b["seed"].as_u64()), (Some("P"), Some("m"), Some(3)));
        assert_eq!((b["max_tokens"].as_u64(), b["stop"][0].as_str()), (Some(1024), Some("</s>")));
        assert!((b["temperature"].as_f64().unwrap() - 0.8).abs() < 1e-6);
        let b = mk(Endpoint::Chat).request_body("P", &CompletionOptions::default());
        assert_eq!(b["messages"], json!([{"role": "user", "content": "P"}]));
        assert!(b.get("stop").is_none() && b.get("seed").is_none());
    }
}
