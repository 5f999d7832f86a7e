//! The HTTP side of [`super`]: the routes, reading and limiting bodies, OpenAI's reply and chunk shapes.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, ApiError, Limits, Parsed};
use super::worker::Event;
use super::Shared;
use crate::generate::Completion;

/// Every route of the server over its shared state.
pub(super) fn router(inner: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(inner)
}

/// An error as an HTTP response.
fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, json_response(e.body())).into_response();
    if e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn json_response(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// How many bytes past the limit a refused body is still read (and dropped) for.
const DRAIN_BYTES: usize = 64 << 20;

/// The request body, at most `limit` bytes; over it, a 413. The body is read to its end either way (up to
/// [`DRAIN_BYTES`] past the limit): a server that answers before the client has finished sending closes on unread
/// bytes, and the client then sees a reset connection instead of the answer.
async fn read_body(body: Body, limit: usize) -> std::result::Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}"), None))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else {
            kept = Vec::new();
            if seen > limit.saturating_add(DRAIN_BYTES) {
                break;
            }
        }
    }
    if seen > limit {
        let msg = format!("the request body is over this server's limit of {limit} bytes (--max-body-bytes)");
        return Err(ApiError::invalid(msg, None).with_status(413, "invalid_request_error"));
    }
    Ok(Bytes::from(kept))
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

async fn chat(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&s, &headers, body, Kind::Chat).await;
    s.counted(r.unwrap_or_else(|e| error_response(&e)))
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&s, &headers, body, Kind::Text).await;
    s.counted(r.unwrap_or_else(|e| error_response(&e)))
}

/// Both generating endpoints: parse, prepare (blocking pool), queue, answer or stream.
async fn generate(s: &Shared, headers: &HeaderMap, body: Body, kind: Kind) -> std::result::Result<Response, ApiError> {
    let body = read_body(body, s.opts.max_body_bytes).await;
    s.authorize(headers)?;
    let body = body?;
    let s2 = s.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let media = s2.opts.media_dir.as_deref();
        let parsed: Parsed = match kind {
            Kind::Chat => api::parse_chat(&body, media)?,
            Kind::Text => api::parse_completion(&body)?,
        };
        let model = s2.served.index(parsed.model.as_deref())?;
        let limits = Limits { max_tokens: s2.opts.max_tokens };
        parsed.prepare(&s2.served.vlm, &limits).map(|p| (model, p))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the request's preparation failed: {e}")))?;
    let (model, mut p) = prepared?;
    let head = Head {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
            s.ids.fetch_add(1, Ordering::Relaxed)
        ),
        created: s.created,
        model: s.served.names[model].clone(),
        kind,
        prompt_tokens: p.ids.len(),
    };
    let mut rx = s.submit(model, &mut p)?;
    if p.stream {
        return Ok(Sse::new(sse_stream(rx, head, p.include_usage)).keep_alive(KeepAlive::default()).into_response());
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Delta(d)) => text.push_str(&d),
            Some(Event::Done(c)) => return Ok(json_response(head.full(&c))),
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the engine stopped before the answer was complete")),
        }
    }
}

/// The fields every reply of one request shares.
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Head {
    fn usage(&self, c: &Completion) -> Value {
        let out = c.ids.len();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": out, "total_tokens": self.prompt_tokens + out})
    }

    fn finish_reason(c: &Completion) -> &'static str {
        if c.stopped {
            "stop"
        } else {
            "length"
        }
    }

    /// The whole answer.
    fn full(&self, c: &Completion) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": null, "finish_reason": Self::finish_reason(c)})
            }
            Kind::Text => {
                json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": Self::finish_reason(c)})
            }
        };
        let object = if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(c)})
    }

    /// One streamed chunk: `delta` text (chat: with `role` on the first), or the finish reason.
    fn chunk(&self, delta: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut d = json!({});
                if first {
                    d["role"] = json!("assistant");
                }
                if let Some(t) = delta {
                    d["content"] = json!(t);
                }
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
        };
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }
}

/// Server-sent events of one streamed answer, in OpenAI's chunk format, ending with `data: [DONE]`.
fn sse_stream(
    rx: UnboundedReceiver<Event>,
    head: Head,
    include_usage: bool,
) -> impl Stream<Item = std::result::Result<SseEvent, Infallible>> {
    enum St {
        Open { rx: UnboundedReceiver<Event>, first: bool },
        Done,
        End,
    }
    let head = Arc::new(head);
    futures_util::stream::unfold(St::Open { rx, first: true }, move |st| {
        let head = head.clone();
        async move {
            let data = |v: Value| SseEvent::default().data(v.to_string());
            match st {
                St::Open { mut rx, first } => match rx.recv().await {
                    Some(Event::Delta(d)) => {
                        Some((Ok(data(head.chunk(Some(&d), first, None))), St::Open { rx, first: false }))
                    }
                    Some(Event::Done(c)) => {
                        let mut last = head.chunk(first.then_some(""), first, Some(Head::finish_reason(&c)));
                        if include_usage {
                            last["usage"] = head.usage(&c);
                        }
                        Some((Ok(data(last)), St::Done))
                    }
                    Some(Event::Failed(e)) => Some((Ok(data(e.body())), St::Done)),
                    None => Some((Ok(data(ApiError::internal("the engine stopped").body())), St::Done)),
                },
                St::Done => Some((Ok(SseEvent::default().data("[DONE]")), St::End)),
                St::End => None,
            }
        }
    })
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let r = s.authorize(&headers).map(|()| {
        let root = &s.served.names[0];
        let data: Vec<Value> = s
            .served
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"id": n, "object": "model", "created": s.created, "owned_by": "bpo", "root": root, "parent": if i == 0 { Value::Null } else { json!(root) },
                       "max_model_len": s.served.vlm.model.llm.cfg.max_position_embeddings})
            })
            .collect();
        json_response(json!({"object": "list", "data": data}))
    });
    s.counted(r.unwrap_or_else(|e| error_response(&e)))
}

async fn metrics_text(State(s): State<Shared>) -> Response {
    let mut r = s.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

async fn not_found(State(s): State<Shared>, uri: axum::http::Uri, body: Body) -> Response {
    let _ = read_body(body, 0).await;
    let e = ApiError::invalid(format!("no route {}", uri.path()), None).with_status(404, "invalid_request_error");
    s.counted(error_response(&e))
}
