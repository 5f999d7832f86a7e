//! A client for OpenAI-compatible HTTP servers (llama.cpp `llama-server`, vLLM, Ollama, ...): error injection
//! sends its prompts through it (a [`crate::bootstrap::Completer`]) and the judged benchmarks their judge requests.
//!
//! - Endpoint: `/v1/completions` (raw text; the caller wraps the chat format itself) or `/v1/chat/completions`
//!   (the server applies its chat template; the prompt is sent as one user message). `--llm-url` may be the
//!   server root, `.../v1`, or the full endpoint URL.
//! - A query string in the URL (`?api-version=...`) stays at the end, after the endpoint's path.
//! - The settings are checked when the client is made ([`crate::range`]: concurrency, timeout, back-off, and an
//!   API key an HTTP header can carry); [`api_key_from_env`] reads a key without ever printing it.
//! - `http://` or `https://` (ureq's rustls, Mozilla roots compiled in). Environment proxies are ignored (LLM
//!   servers are usually local, and a proxy in the environment would otherwise capture loopback requests).
//! - Servers are untrusted. Each request has a total time limit (default [`DEFAULT_TIMEOUT`], connecting at most
//!   [`CONNECT_TIMEOUT`]) and a reply is read up to [`DEFAULT_MAX_REPLY_BYTES`]. A 2xx reply counts only when it is
//!   the expected JSON ([`parse_reply`]) with a non-empty text (unless `allow_empty`); HTML, malformed JSON, no
//!   `choices`, a `null` or empty text, or an oversized body is a failed attempt, like a connection error, a
//!   timeout, 5xx or 429. Failed attempts are retried with exponential back-off (`backoff * 2^k`, at most 30 s);
//!   a 429 or 503 that says `Retry-After` (seconds or an HTTP date; OpenAI's `retry-after-ms` too) waits that
//!   long instead when it is longer, at most [`MAX_RETRY_AFTER`]; other 4xx fail at once. A request that still fails is `Err(Error::Http)` for that prompt only, naming the
//!   URL, the last reason (status, what was wrong, the first bytes of the body) and the number of attempts.
//! - Up to `concurrency` requests run at once on scoped std threads.

use std::time::Duration;

use serde_json::Value;

use crate::{bail, range, Error, Result};

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
    /// Why, and how long the server asked us to wait (`Retry-After`), if it did.
    Retry(String, Option<Duration>),
}

use crate::range::MAX_BACKOFF;

/// Longest wait a server's `Retry-After` is honoured for; a longer one waits this long, then retries.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl HttpCompleter {
    pub fn new(opts: HttpOptions) -> Result<Self> {
        let url = endpoint_url(&opts.url, opts.endpoint)?;
        range::check("concurrency", opts.concurrency, range::at_least_one)?;
        range::check("request timeout (s)", opts.timeout.as_secs_f64(), |t| {
            if t > 0.0 && opts.timeout <= range::MAX_TIMEOUT {
                Ok(())
            } else {
                Err(format!("must be in (0, {}]", range::MAX_TIMEOUT.as_secs()))
            }
        })?;
        range::check("back-off (s)", opts.backoff.as_secs_f64(), range::backoff)?;
        if let Some(key) = &opts.api_key {
            check_key(key).map_err(|why| Error::invalid(format!("the API key {why}")))?;
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
                Attempt::Retry(msg, _) if attempt >= self.opts.retries => {
                    return Err(Error::Http(format!("{}: {msg} (after {} attempts)", self.url, attempt + 1)));
                }
                Attempt::Retry(_, asked) => {
                    std::thread::sleep(asked.map_or(wait, |a| a.min(MAX_RETRY_AFTER).max(wait)));
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
            Err(e) => return Attempt::Retry(e.to_string(), None),
        };
        let status = resp.status().as_u16();
        let asked = match status {
            429 | 503 => retry_after(resp.headers(), std::time::SystemTime::now()),
            _ => None,
        };
        let limit = self.opts.max_reply_bytes;
        let text = match resp.body_mut().with_config().limit(limit).lossy_utf8(true).read_to_string() {
            Ok(t) => t,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return Attempt::Retry(format!("status {status}: reply larger than {limit} bytes"), asked)
            }
            Err(e) => return Attempt::Retry(format!("status {status}: reading the reply: {e}"), asked),
        };
        match status {
            200..=299 => match parse_reply(&text, self.opts.endpoint) {
                Ok(reply) if reply.text.trim().is_empty() && !self.opts.allow_empty => {
                    Attempt::Retry(format!("status {status}: reply text is empty: {}", snippet(&text)), None)
                }
                Ok(reply) => Attempt::Done(Ok(reply)),
                Err(e) => Attempt::Retry(format!("status {status}: {e}"), None),
            },
            429 | 500..=599 => Attempt::Retry(format!("status {status}: {}", snippet(&text)), asked),
            _ => Attempt::Done(Err(Error::Http(format!("{}: status {status}: {}", self.url, snippet(&text))))),
        }
    }
}

/// The endpoint URL for a user-given server address; a query string (`?api-version=...`) is kept after the path.
pub fn endpoint_url(base: &str, endpoint: Endpoint) -> Result<String> {
    let given = base.trim();
    if !given.starts_with("http://") && !given.starts_with("https://") {
        bail!("LLM URL {given:?}: give an http:// or https:// URL");
    }
    if given.contains('#') {
        bail!("LLM URL {given:?}: a URL with a #fragment is not a server address");
    }
    let (base, query) = match given.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (given, String::new()),
    };
    let base = base.trim_end_matches('/');
    if base.ends_with("/completions") {
        return Ok(format!("{base}{query}"));
    }
    let path = match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat/completions",
    };
    Ok(if base.ends_with("/v1") { format!("{base}/{path}{query}") } else { format!("{base}/v1/{path}{query}") })
}

/// The API key held by the environment variable `var`: `None` when it is unset or blank. A value that is not
/// UTF-8, or holds characters an HTTP header cannot carry, is an error naming the variable (never the key), where
/// it would otherwise be sent as no key, or fail every request.
pub fn api_key_from_env(var: &str) -> Result<Option<String>> {
    let key = match std::env::var(var) {
        Ok(key) => key.trim().to_string(),
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("environment variable {var}: the API key is not valid UTF-8")
        }
    };
    if key.is_empty() {
        return Ok(None);
    }
    check_key(&key).map_err(|why| Error::invalid(format!("environment variable {var}: the API key {why}")))?;
    Ok(Some(key))
}

/// Whether `key` can travel in an `Authorization` header: printable ASCII only.
fn check_key(key: &str) -> std::result::Result<(), String> {
    match key.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        Some(c) if c.is_control() => {
            Err("holds a control character (a line break?), which a header cannot carry".into())
        }
        Some(_) => Err("holds a character other than printable ASCII, which a header cannot carry".into()),
        None => Ok(()),
    }
}

/// How long a 429 or 503 reply asks the client to wait: OpenAI's `retry-after-ms`, else `Retry-After` as
/// seconds or as an HTTP date (RFC 9110: `Sun, 06 Nov 1994 08:49:37 GMT`), measured from `now`. A past date is
/// no wait; a header that reads as neither is ignored.
fn retry_after(headers: &ureq::http::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let seconds = |v: f64| (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v.min(1e9)));
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).and_then(|v| seconds(v / 1000.0)) {
        return Some(ms);
    }
    let value = get("retry-after")?;
    if let Ok(s) = value.parse::<f64>() {
        return seconds(s);
    }
    let at = http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An HTTP date in the preferred format (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(text: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else { return None };
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else { return None };
    if !(1..=31).contains(&day) || !(1970..=9999).contains(&year) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + m * 60 + s).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
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
        // A query string stays at the end (Azure's api-version), whatever the path.
        assert_eq!(
            endpoint_url("https://h/openai/deployments/g?api-version=2024-02-01", Endpoint::Chat).unwrap(),
            "https://h/openai/deployments/g/v1/chat/completions?api-version=2024-02-01"
        );
        assert_eq!(endpoint_url("http://h:1/v1/?k=v&w=x", c).unwrap(), "http://h:1/v1/completions?k=v&w=x");
        assert_eq!(endpoint_url("http://h/v1/chat/completions?k=v", c).unwrap(), "http://h/v1/chat/completions?k=v");
        assert!(endpoint_url("http://h/v1#x", c).is_err());
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let wait = |pairs: &[(&'static str, &str)]| {
            let mut h = ureq::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            retry_after(&h, now)
        };
        assert_eq!(wait(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(wait(&[("Retry-After", " 1.5 ")]), Some(Duration::from_millis(1500)));
        assert_eq!(wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:47 GMT")]), Some(Duration::from_secs(10)));
        assert_eq!(wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:00 GMT")]), Some(Duration::ZERO), "past");
        assert_eq!(wait(&[("retry-after", "3"), ("retry-after-ms", "250")]), Some(Duration::from_millis(250)));
        for bad in ["soon", "-4", "NaN", "Sun, 06 Nov 1994 25:49:00 GMT", "Sun, 06 Foo 1994 08:49:00 GMT"] {
            assert_eq!(wait(&[("retry-after", bad)]), None, "{bad}");
        }
        assert_eq!(wait(&[]), None);
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(std::time::UNIX_EPOCH));
        assert_eq!(
            http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_835_438_400))
        );
    }

    #[test]
    fn settings_and_keys_are_checked_when_the_client_is_made() {
        let opts = |f: &dyn Fn(&mut HttpOptions)| {
            let mut o = HttpOptions { url: "http://127.0.0.1:9".into(), ..Default::default() };
            f(&mut o);
            HttpCompleter::new(o).err().map(|e| e.to_string())
        };
        assert_eq!(opts(&|_| {}), None);
        assert!(opts(&|o| o.concurrency = 0).unwrap().contains("at least 1"));
        assert!(opts(&|o| o.timeout = Duration::ZERO).unwrap().contains("(0, 86400]"));
        assert!(opts(&|o| o.backoff = Duration::from_secs(31)).unwrap().contains("[0, 30]"));
        let err = opts(&|o| o.api_key = Some("sk-abc\nX-Evil: 1".into())).unwrap();
        assert!(err.contains("control character") && !err.contains("sk-abc"), "{err}");
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
