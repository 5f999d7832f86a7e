//! The OpenAI request shapes `bpo serve` reads, turned into engine requests, and the error object it answers with.
//!
//! Requests are parsed leniently where OpenAI's clients differ (unknown fields are ignored, as vLLM does; `stop`
//! may be a string or a list; `max_completion_tokens` is `max_tokens`; an `image_url` part may hold the URL
//! directly) and strictly where a silent change would give a wrong answer: `n` other than 1, `logprobs`, a system
//! message, an image outside the first user message, or an image URL that is not a data URL (unless
//! `--allowed-local-media-path` lets `file://` URLs in) are refused with a 400 that says so.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generate::{request_seed, SamplingParams};
use crate::model::Vlm;

/// An error answered with OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param, code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: u16, kind: &'static str) -> Self {
        self.status = status;
        self.kind = kind;
        self
    }

    /// A 500: the server failed, not the request.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::invalid(message, None).with_status(500, "server_error")
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The sampling fields shared by both endpoints.
#[derive(Deserialize, Default)]
struct Sampling {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// vLLM's extension: 0 or -1 = off.
    top_k: Option<i64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

/// A parsed request, before it meets the model: the prompt and the settings.
pub struct Parsed {
    /// The model id asked for (None: the base model).
    pub model: Option<String>,
    pub prompt: Prompt,
    sampling: Sampling,
}

/// What the model is asked.
pub enum Prompt {
    /// Chat: earlier (question, answer) turns, the question, and the image of the first user message.
    Chat { earlier: Vec<(String, String)>, question: String, image: Option<ImageSource> },
    /// Completions: the text as given.
    Text(String),
}

/// Where an image comes from.
pub enum ImageSource {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// A request ready for the engine.
pub struct Prepared {
    pub model: Option<String>,
    pub ids: Vec<u32>,
    pub image: Option<Tensor>,
    pub params: SamplingParams,
    pub seed: u64,
    pub stream: bool,
    pub include_usage: bool,
}

fn json_error(e: serde_json::Error) -> ApiError {
    ApiError::invalid(format!("the request body is not valid JSON for this endpoint: {e}"), None)
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], media: Option<&Path>) -> Result<Parsed, ApiError> {
    let b: ChatBody = serde_json::from_slice(body).map_err(json_error)?;
    let mut turns: Vec<(String, Option<String>)> = Vec::new();
    let mut image = None;
    for (i, m) in b.messages.iter().enumerate() {
        let (text, img) = content(&m.content, media)?;
        match m.role.as_str() {
            "user" => {
                if img.is_some() && (image.is_some() || !turns.is_empty()) {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}]: an image may only be in the first user message (LLaVA takes one image)"
                        ),
                        Some("messages"),
                    ));
                }
                image = image.or(img);
                match turns.last_mut() {
                    Some((q, None)) => {
                        q.push('\n');
                        q.push_str(&text);
                    }
                    _ => turns.push((text, None)),
                }
            }
            "assistant" => {
                let Some((_, answer @ None)) = turns.last_mut() else {
                    return Err(ApiError::invalid(
                        format!("messages[{i}]: an assistant message must follow a user message"),
                        Some("messages"),
                    ));
                };
                *answer = Some(text);
                if img.is_some() {
                    return Err(ApiError::invalid(format!("messages[{i}]: an assistant message has an image"), None));
                }
            }
            "system" | "developer" => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}]: system messages are not supported: the chat template (--template) sets the \
                         system text"
                    ),
                    Some("messages"),
                ))
            }
            other => return Err(ApiError::invalid(format!("messages[{i}]: unknown role {other:?}"), Some("messages"))),
        }
    }
    let Some((question, None)) = turns.pop() else {
        return Err(ApiError::invalid("the last message must be a user message", Some("messages")));
    };
    let earlier = turns.into_iter().map(|(q, a)| (q, a.unwrap_or_default())).collect();
    Ok(Parsed {
        model: b.sampling.model.clone(),
        prompt: Prompt::Chat { earlier, question, image },
        sampling: b.sampling,
    })
}

/// Parses a `/v1/completions` body: `prompt` a string (or a list of one string).
pub fn parse_completion(body: &[u8]) -> Result<Parsed, ApiError> {
    let b: CompletionBody = serde_json::from_slice(body).map_err(json_error)?;
    let text = match &b.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(ApiError::invalid("`prompt` must be a string (or a list of one string)", Some("prompt"))),
    };
    if b.sampling.echo == Some(true) {
        return Err(ApiError::invalid("`echo` is not supported", Some("echo")));
    }
    Ok(Parsed { model: b.sampling.model.clone(), prompt: Prompt::Text(text), sampling: b.sampling })
}

/// A message's text (parts joined by newlines) and its image, if any.
fn content(content: &Value, media: Option<&Path>) -> Result<(String, Option<ImageSource>), ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("messages"));
    match content {
        Value::String(s) => Ok((s.clone(), None)),
        Value::Null => Ok((String::new(), None)),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            let mut image = None;
            for p in parts {
                match p["type"].as_str() {
                    Some("text") => {
                        texts.push(p["text"].as_str().ok_or_else(|| bad("a text part without text".into()))?)
                    }
                    Some("image_url") => {
                        let url = p["image_url"]["url"].as_str().or(p["image_url"].as_str());
                        let url = url.ok_or_else(|| bad("an image_url part without a url".into()))?;
                        if image.is_some() {
                            return Err(bad("a message has more than one image (LLaVA takes one image)".into()));
                        }
                        image = Some(image_source(url, media)?);
                    }
                    other => return Err(bad(format!("unsupported content part type {other:?} (text, image_url)"))),
                }
            }
            Ok((texts.join("\n"), image))
        }
        _ => Err(bad("a message's content must be a string or a list of parts".into())),
    }
}

/// The image of a URL: a base64 data URL; a `file://` URL only inside `media` (`--allowed-local-media-path`).
fn image_source(url: &str, media: Option<&Path>) -> Result<ImageSource, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("messages")).with_code("invalid_image_url");
    if let Some(rest) = url.strip_prefix("data:") {
        let (head, data) = rest.split_once(',').ok_or_else(|| bad("a data URL without a comma".into()))?;
        let Some(mime) = head.strip_suffix(";base64") else {
            return Err(bad("a data URL must be base64 (data:image/png;base64,...)".into()));
        };
        if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg" | "image/webp") {
            return Err(bad(format!("unsupported image type {mime:?}: send image/png, image/jpeg or image/webp")));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| bad(format!("the data URL's base64 is invalid: {e}")))?;
        return Ok(ImageSource::Bytes(bytes));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let Some(dir) = media else {
            return Err(bad(
                "file:// image URLs are refused unless the server runs with --allowed-local-media-path DIR".into(),
            ));
        };
        return local_file(Path::new(path), dir).map(ImageSource::File);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad(
            "remote image URLs are not fetched: send the image as a data URL (data:image/png;base64,...)".into()
        ));
    }
    Err(bad(format!("unsupported image URL {:?}: send a data URL", url.chars().take(40).collect::<String>())))
}

/// `path` resolved (links followed) and kept inside `dir` (already resolved).
fn local_file(path: &Path, dir: &Path) -> Result<PathBuf, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("messages")).with_code("invalid_image_url");
    let real = path.canonicalize().map_err(|e| bad(format!("file://{}: {e}", path.display())))?;
    if !real.starts_with(dir) {
        return Err(bad(format!("file://{} is outside --allowed-local-media-path", path.display())));
    }
    Ok(real)
}

/// Settings the server applies to every request.
pub struct Limits {
    /// The largest `max_tokens` accepted.
    pub max_tokens: usize,
}

impl Parsed {
    /// The request's parameter holding the prompt, which errors about it name.
    fn prompt_param(&self) -> &'static str {
        if matches!(self.prompt, Prompt::Text(_)) {
            "prompt"
        } else {
            "messages"
        }
    }

    /// The prompt's token ids and the decoded image, refused when the prompt cannot fit `context` tokens.
    fn tokens(&self, vlm: &Vlm, context: usize) -> Result<(Vec<u32>, Option<Tensor>), ApiError> {
        let param = self.prompt_param();
        let too_long =
            |e: crate::Error| ApiError::invalid(format!("{e}"), Some(param)).with_code("context_length_exceeded");
        Ok(match &self.prompt {
            Prompt::Chat { earlier, question, image } => {
                let image = match image {
                    None => None,
                    Some(ImageSource::Bytes(b)) => Some(vlm.image_from_bytes(b)),
                    Some(ImageSource::File(p)) => Some(vlm.load_image(p)),
                }
                .transpose()
                .map_err(|e| {
                    ApiError::invalid(format!("bad image: {e}"), Some("messages")).with_code("invalid_image")
                })?;
                let ids = vlm.chat_ids(earlier, question, image.is_some()).map_err(too_long)?;
                (ids, image)
            }
            Prompt::Text(text) => {
                if vlm.tok.surely_longer_than(text, context) {
                    return Err(too_long(crate::Error::invalid(format!(
                        "a prompt of {} bytes cannot fit the model's context of {context} tokens",
                        text.len()
                    ))));
                }
                let ids = crate::text::template::prompt_ids(&vlm.tok, text, vlm.style, None).map_err(too_long)?;
                (ids, None)
            }
        })
    }

    /// Tokenises the prompt and decodes the image on `vlm` (blocking work), and resolves the sampling settings.
    pub fn prepare(self, vlm: &Vlm, limits: &Limits) -> Result<Prepared, ApiError> {
        let s = &self.sampling;
        if s.n.is_some_and(|n| n != 1) || s.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        if s.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != json!(false))
            || s.top_logprobs.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(ApiError::invalid("logprobs are not supported", Some("logprobs")));
        }
        let context = vlm.model.llm.cfg.max_position_embeddings;
        let param = self.prompt_param();
        let (ids, image) = self.tokens(vlm, context)?;
        let room = context.saturating_sub(ids.len());
        if room == 0 {
            return Err(ApiError::invalid(
                format!("the prompt has {} tokens, the model's whole context of {context}", ids.len()),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
        let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
            None => room.min(limits.max_tokens),
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
            Some(n) if n as usize > limits.max_tokens => {
                return Err(ApiError::invalid(
                    format!("max_tokens = {n} is over this server's cap of {} (--max-tokens-cap)", limits.max_tokens),
                    Some("max_tokens"),
                ))
            }
            Some(n) => n as usize,
        };
        crate::generate::fits_context(ids.len(), max_tokens, context)
            .map_err(|e| ApiError::invalid(format!("{e}"), Some("max_tokens")).with_code("context_length_exceeded"))?;
        let stop = match &s.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let params = SamplingParams {
            max_new_tokens: max_tokens,
            temperature: s.temperature.unwrap_or(1.0),
            top_k: s.top_k.map_or(0, |k| k.max(0) as usize),
            top_p: s.top_p.unwrap_or(1.0),
            seed: 0,
            stop,
        };
        params.validate().map_err(|e| ApiError::invalid(format!("{e}"), None))?;
        // A given seed draws what `bpo generate --seed S` draws for one prompt; none draws afresh.
        let seed = match s.seed {
            Some(seed) => request_seed(seed as u64, ""),
            None => rand::random(),
        };
        Ok(Prepared {
            model: self.model,
            ids,
            image,
            params,
            seed,
            stream: s.stream.unwrap_or(false),
            include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Parsed, ApiError> {
        parse_chat(v.to_string().as_bytes(), None)
    }

    #[test]
    fn conversations_become_turns_with_the_image_of_the_first_question() {
        let png = "data:image/png;base64,iVBORw0KGgo=";
        let p = chat(json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": png, "detail": "low"}}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Colour?"},
            {"role": "user", "content": [{"type": "text", "text": "Be brief."}]}
        ], "unknown_field": [1, 2]}))
        .unwrap();
        assert_eq!(p.model.as_deref(), Some("m"));
        let Prompt::Chat { earlier, question, image } = p.prompt else { panic!("a chat") };
        assert_eq!(earlier, [("What?".to_string(), "A cat.".to_string())]);
        assert_eq!(question, "Colour?\nBe brief.");
        assert!(matches!(image, Some(ImageSource::Bytes(b)) if b.starts_with(b"\x89PNG")));
    }

    #[test]
    fn what_would_change_the_answer_is_refused() {
        let user = |c: Value| json!({"role": "user", "content": c});
        let cases = [
            (json!([{"role": "system", "content": "Be nice."}, user(json!("hi"))]), "system"),
            (json!([user(json!("hi")), {"role": "assistant", "content": "yo"}]), "last message"),
            (json!([{"role": "tool", "content": "x"}]), "unknown role"),
            (json!([user(json!([{"type": "input_audio"}]))]), "input_audio"),
            (json!([user(json!([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]))]), "remote"),
            (
                json!([user(json!([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]))]),
                "--allowed-local-media-path",
            ),
            (
                json!([user(json!("a")), {"role": "assistant", "content": "b"}, user(json!([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]))]),
                "first user message",
            ),
        ];
        for (messages, needle) in cases {
            let e = chat(json!({"messages": messages})).err().unwrap_or_else(|| panic!("{messages} accepted"));
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{needle:?} in {}", e.message);
        }
        let e = parse_completion(br#"{"prompt": "x", "echo": true}"#).err().unwrap();
        assert_eq!(e.param, Some("echo"));
    }

    #[test]
    fn errors_have_openais_shape() {
        let v = ApiError::invalid("bad", Some("model"))
            .with_status(404, "invalid_request_error")
            .with_code("model_not_found")
            .body();
        assert_eq!(
            v,
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        );
    }
}
