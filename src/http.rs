//! A client for OpenAI-compatible HTTP servers (llama.cpp `llama-server`, vLLM, Ollama, ...): error injection
//! sends its prompts through it (a [`crate::bootstrap::Completer`]) and the judged benchmarks their judge requests.
//!
//! - Endpoint: `/v1/completions` (raw text; the caller wraps the chat format itself) or `/v1/chat/completions`
//!   (the server applies its chat template; the prompt is sent as one user message). `--llm-url` may be the
//!   server root, `.../v1`, or the full endpoint URL.
//! - `http://` or `https://` (ureq's rustls, Mozilla roots compiled in). Environment proxies are ignored (LLM
//!   servers are usually local, and a proxy in the environment would otherwise capture loopback requests).
//! - Servers are untrusted. Each request has a total time limit (default [`DEFAULT_TIMEOUT`], connecting at most
//!   [`CONNECT_TIMEOUT`]) and a reply is read up to [`DEFAULT_MAX_REPLY_BYTES`]. A 2xx reply counts only when it is
//!   the expected JSON ([`parse_reply`]) with a non-empty text (unless `allow_empty`); HTML, malformed JSON, no
//!   `choices`, a `null` or empty text, or an oversized body is a failed attempt, like a connection error, a
//!   timeout, 5xx or 429. Failed attempts are retried with exponential back-off (`backoff * 2^k`, at most 30 s);
//!   other 4xx fail at once. A request that still fails is `Err(Error::Http)` for that prompt only, naming the
//!   URL, the last reason (status, what was wrong, the first bytes of the body) and the number of attempts.
//! - Up to `concurrency` requests run at once on scoped std threads.

use std::time::Duration;

use serde_json::Value;

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
    /// Total time allowed for one request, body included; default [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// Largest reply body read; a bigger one fails the attempt. Default [`DEFAULT_MAX_REPLY_BYTES`].
    pub max_reply_bytes: u64,
    /// Accept a reply whose text is empty or blank; default false (such a reply is a failed attempt). The
    /// judges set it: an empty verdict is an answer their official graders handle themselves (MM-Vet re-asks).
    pub allow_empty: bool,
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
            timeout: DEFAULT_TIMEOUT,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            allow_empty: false,
            retries: 3,
            backoff: Duration::from_secs(1),
            concurrency: 4,
        }
    }
}

/// Default total time of one request (connection, sending, waiting, reading the reply).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a connection; a shorter total timeout applies when it is shorter.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a reply body: a completion or a judge's verdict is a few kB, so 4 MiB is far beyond any real
/// reply and still cheap to hold.
pub const DEFAULT_MAX_REPLY_BYTES: u64 = 4 << 20;

/// What a server answered: the text of `choices[0]`, and the `model` field that served it, if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub text: String,
    pub model: Option<String>,
}

/// An OpenAI-compatible server: posts request bodies, retries, and reads the replies as the module doc says.
pub struct HttpCompleter {
    opts: HttpOptions,
    url: String,
    agent: ureq::Agent,
}

/// Outcome of one attempt.
enum Attempt {
    Done(Result<ServerReply>),
    Retry(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl HttpCompleter {
    pub fn new(opts: HttpOptions) -> Result<Self> {
        let url = endpoint_url(&opts.url, opts.endpoint)?;
        if opts.concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        if opts.timeout.is_zero() {
            bail!("the request timeout must be above 0 s");
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .timeout_connect(Some(CONNECT_TIMEOUT.min(opts.timeout)))
            .http_status_as_error(false)
            .proxy(None)
            .build();
        Ok(HttpCompleter { opts, url, agent: config.into() })
    }

    /// The full URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// Posts `body` to the endpoint, retrying as the module doc says; the first 2xx reply that reads as the
    /// endpoint's JSON with a text (non-empty unless `allow_empty`).
    pub fn send(&self, body: &Value) -> Result<ServerReply> {
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
        let limit = self.opts.max_reply_bytes;
        let text = match resp.body_mut().with_config().limit(limit).lossy_utf8(true).read_to_string() {
            Ok(t) => t,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return Attempt::Retry(format!("status {status}: reply larger than {limit} bytes"))
            }
            Err(e) => return Attempt::Retry(format!("status {status}: reading the reply: {e}")),
        };
        match status {
            200..=299 => match parse_reply(&text, self.opts.endpoint) {
                Ok(reply) if reply.text.trim().is_empty() && !self.opts.allow_empty => {
                    Attempt::Retry(format!("status {status}: reply text is empty: {}", snippet(&text)))
                }
                Ok(reply) => Attempt::Done(Ok(reply)),
                Err(e) => Attempt::Retry(format!("status {status}: {e}")),
            },
            429 | 500..=599 => Attempt::Retry(format!("status {status}: {}", snippet(&text))),
            _ => Attempt::Done(Err(Error::Http(format!("{}: status {status}: {}", self.url, snippet(&text))))),
        }
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

/// Reads a reply body: `choices[0].text` (completions) or `choices[0].message.content` (chat), which must be a
/// string, and the `model` field. Anything else is an [`Error::Invalid`] saying what is wrong, with the first
/// bytes of the body.
pub fn parse_reply(body: &str, endpoint: Endpoint) -> Result<ServerReply> {
    let bad = |what: &str| Error::invalid(format!("{what}: {}", snippet(body)));
    let v: Value = serde_json::from_str(body).map_err(|e| bad(&format!("reply is not JSON ({e})")))?;
    let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
        return Err(bad("reply has no `choices`"));
    };
    let (text, field) = match endpoint {
        Endpoint::Completions => (&choice["text"], "choices[0].text"),
        Endpoint::Chat => (&choice["message"]["content"], "choices[0].message.content"),
    };
    match text.as_str() {
        None => Err(bad(&format!("reply has no text ({field} is {})", kind(text)))),
        Some(t) => Ok(ServerReply { text: t.to_string(), model: v["model"].as_str().map(String::from) }),
    }
}

/// A JSON value's kind, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null or missing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The first 200 characters of a reply, quoted and escaped so that an HTML page stays on one line.
fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    let more = if t.len() < text.len() { format!(" ... ({} bytes)", text.len()) } else { String::new() };
    format!("{t:?}{more}")
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
        assert_eq!(
            endpoint_url("https://api.example.com/v1", Endpoint::Chat).unwrap(),
            "https://api.example.com/v1/chat/completions"
        );
        assert!(endpoint_url("ftp://api.example.com", c).is_err());
    }

    #[test]
    fn reply_parsing() {
        let text = |body: &str, endpoint| parse_reply(body, endpoint).map(|r| r.text);
        assert_eq!(text(r#"{"choices": [{"text": " hi"}]}"#, Endpoint::Completions).unwrap(), " hi");
        let chat = r#"{"model": "m1", "choices": [{"message": {"role": "assistant", "content": "yo"}}]}"#;
        assert_eq!(
            parse_reply(chat, Endpoint::Chat).unwrap(),
            ServerReply { text: "yo".into(), model: Some("m1".into()) }
        );
        let cases = [
            (chat, Endpoint::Completions, "choices[0].text is null"),
            ("<html>\n<body>busy</body>", Endpoint::Chat, "not JSON"),
            (r#"{"choices": [{"text": "#, Endpoint::Completions, "not JSON"),
            (r#"{"object": "list"}"#, Endpoint::Completions, "no `choices`"),
            (r#"{"choices": []}"#, Endpoint::Completions, "no `choices`"),
            (r#"{"choices": [{"text": null}]}"#, Endpoint::Completions, "null"),
            (r#"{"choices": [{"text": 3}]}"#, Endpoint::Completions, "a number"),
        ];
        for (body, endpoint, needle) in cases {
            let err = text(body, endpoint).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Invalid(_)) && msg.contains(needle), "{body}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }
}
