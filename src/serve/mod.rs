//! `bpo serve`: an OpenAI-compatible HTTP server over the generation engine (docs/serve.md).
//!
//! - Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
//!   `GET /metrics` (Prometheus text). Replies and errors have OpenAI's shapes ([`api`]).
//! - One thread runs the model (`worker`): requests reach it over a channel once the HTTP side has parsed the
//!   body, decoded the image and tokenised the prompt (on tokio's blocking pool, beside the model's steps). The
//!   base model and each adapter ([`Served`]) share one copy of the base weights and have an engine each.
//! - Limits: a request body over `max_body_bytes` is a 413; an image over the processor's `max_pixels` or a prompt
//!   over the context a 400; with `max_queue` requests waiting or running, the next is a 503 with `Retry-After`.
//!   Nothing a client sends panics the server.
//! - With an API key, every `/v1/` request needs `Authorization: Bearer KEY`, compared in constant time; the key is
//!   never printed. `/health` and `/metrics` stay open, as in vLLM.
//! - A client that goes away (a dropped connection, a closed stream) cancels its request at the next step.
//! - Shutdown ([`Server::stop`], or SIGINT/SIGTERM in [`run`]): the listener closes, running requests finish
//!   (streams included) within the deadline, then the engine thread ends.

pub mod api;
pub mod metrics;
mod routes;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use axum::response::Response;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use self::api::{ApiError, Prepared};
use self::metrics::Metrics;
use self::worker::{Event, Job};
use crate::generate::{EngineOptions, Request};
use crate::model::{Model, Vlm};
use crate::{Error, Result};

/// The models one server answers for: the base (model id `names[0]`) and adapters over it (`names[1..]`, their
/// models in `adapters`, clones of the base sharing its weights).
pub struct Served {
    pub vlm: Vlm,
    pub names: Vec<String>,
    pub adapters: Vec<Model>,
}

impl Served {
    /// The base model alone, served as `name`.
    pub fn new(vlm: Vlm, name: impl Into<String>) -> Self {
        Served { vlm, names: vec![name.into()], adapters: Vec::new() }
    }

    /// Adds the adapter in `dir` as model `name`: a clone of the base model (its weights shared, not copied) with
    /// the adapter applied.
    pub fn add_adapter(&mut self, name: &str, dir: &std::path::Path, allow_non_finite: bool) -> Result<()> {
        if self.names.iter().any(|n| n == name) {
            crate::bail!("two served models are named {name:?}");
        }
        let mut model = self.vlm.model.clone();
        crate::train::checkpoint::load_adapter_with(&mut model, dir, allow_non_finite)?;
        self.names.push(name.to_string());
        self.adapters.push(model);
        Ok(())
    }

    /// Every model, the base first.
    fn models(&self) -> Vec<&Model> {
        std::iter::once(&self.vlm.model).chain(&self.adapters).collect()
    }

    /// The index of model id `name` (None: the base).
    fn index(&self, name: Option<&str>) -> std::result::Result<usize, ApiError> {
        match name.filter(|n| !n.is_empty()) {
            None => Ok(0),
            Some(n) => self.names.iter().position(|m| m == n).ok_or_else(|| {
                ApiError::invalid(
                    format!("the model {n:?} does not exist here; served: {}", self.names.join(", ")),
                    Some("model"),
                )
                .with_status(404, "invalid_request_error")
                .with_code("model_not_found")
            }),
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Required as `Authorization: Bearer KEY` on `/v1/` routes.
    pub api_key: Option<String>,
    /// Batching of each model's engine.
    pub engine: EngineOptions,
    /// Requests waiting or running at most; the next one gets a 503.
    pub max_queue: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens`; also what a request without one gets (within the context).
    pub max_tokens: usize,
    /// `file://` image URLs are read inside this folder (vLLM's `--allowed-local-media-path`); None refuses them.
    pub media_dir: Option<PathBuf>,
    /// How long running requests may take to finish after a shutdown starts.
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            api_key: None,
            engine: EngineOptions::default(),
            max_queue: 1024,
            max_body_bytes: 32 << 20,
            max_tokens: 4096,
            media_dir: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

struct Inner {
    served: Arc<Served>,
    opts: ServeOptions,
    jobs: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    metrics: Arc<Metrics>,
    created: u64,
    /// Numbers the reply ids.
    ids: std::sync::atomic::AtomicU64,
}

type Shared = Arc<Inner>;

/// A server started on its own threads ([`Server::start`]), for tests, benchmarks and embedding.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Serves `served` on `listener` (already bound) until [`Server::stop`] or drop.
    pub fn start(listener: std::net::TcpListener, served: Served, opts: ServeOptions) -> Result<Server> {
        let addr = listener.local_addr().map_err(net("the listening socket"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("bpo-serve".into()).spawn(move || {
            serve(listener, served, opts, async {
                let _ = rx.await;
            })
        });
        let thread = thread.map_err(net("starting the server thread"))?;
        Ok(Server { addr, stop: Some(tx), thread: Some(thread) })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets running requests finish (within the shutdown deadline) and waits for the end.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::invalid("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully (see the module notes).
pub fn run(listener: std::net::TcpListener, served: Served, opts: ServeOptions) -> Result<()> {
    serve(listener, served, opts, async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warning: cannot watch SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => eprintln!("SIGINT: finishing running requests, accepting no more"),
            _ = term.recv() => eprintln!("SIGTERM: finishing running requests, accepting no more"),
        }
    })
}

/// The server on `listener` until `shutdown` completes.
fn serve(
    listener: std::net::TcpListener,
    served: Served,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    listener.set_nonblocking(true).map_err(net("the listening socket"))?;
    let served = Arc::new(served);
    let metrics = Arc::new(Metrics::default());
    let (jobs, rx) = std::sync::mpsc::channel();
    let engine = worker::spawn(served.clone(), opts.engine.clone(), rx, metrics.clone())
        .map_err(net("starting the engine thread"))?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let deadline = opts.shutdown_timeout;
    let inner = Arc::new(Inner {
        served,
        opts,
        jobs: std::sync::Mutex::new(Some(jobs)),
        metrics,
        created,
        ids: Default::default(),
    });
    let app = routes::router(inner.clone());
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(net("starting the async runtime"))?;
    let waiting = inner.metrics.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(net("the listening socket"))?;
        let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
        let graceful = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        });
        let cut_off = async move {
            if stopping.await.is_ok() {
                tokio::time::sleep(deadline).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = graceful => r.map_err(net("serving"))?,
            () = cut_off => {
                let running = waiting.outstanding.load(Ordering::Relaxed);
                eprintln!("shutdown deadline of {deadline:?} passed: {running} requests cut off");
            }
        }
        Ok::<(), Error>(())
    })?;
    // No more jobs: the engine thread ends once the requests it holds have finished.
    inner.jobs.lock().map(|mut j| j.take()).unwrap_or_default();
    drop(rt);
    if inner.metrics.outstanding.load(Ordering::Relaxed) == 0 {
        let _ = engine.join();
    }
    Ok(())
}

/// A system error while `what`.
fn net(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::invalid(format!("{what}: {e}"))
}

impl Inner {
    /// Checks the API key, if one is set, in constant time.
    fn authorize(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(key) = &self.opts.api_key else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        let token = given.strip_prefix(b"Bearer ").unwrap_or_default();
        if constant_time_eq(token, key.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::invalid("a valid API key is required: Authorization: Bearer KEY", None)
                .with_status(401, "authentication_error")
                .with_code("invalid_api_key"))
        }
    }

    /// Counts the response's status and returns it.
    fn counted(&self, r: Response) -> Response {
        self.metrics.answered(r.status().as_u16());
        r
    }

    /// Hands a prepared request to the engine thread.
    fn submit(&self, model: usize, p: &mut Prepared) -> std::result::Result<UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = unbounded_channel();
        let req = Request {
            ids: std::mem::take(&mut p.ids),
            image: p.image.take(),
            params: p.params.clone(),
            seed: p.seed,
            contrast: None,
        };
        let busy = self.metrics.outstanding.fetch_add(1, Ordering::Relaxed);
        let refuse = |e: ApiError| {
            self.metrics.outstanding.fetch_sub(1, Ordering::Relaxed);
            Err(e)
        };
        if busy >= self.opts.max_queue {
            return refuse(
                ApiError::invalid(format!("the server is busy ({busy} requests queued or running); retry later"), None)
                    .with_status(503, "server_error")
                    .with_code("server_overloaded"),
            );
        }
        let sent = self
            .jobs
            .lock()
            .ok()
            .and_then(|j| j.as_ref().map(|j| j.send(Job { model, req, stream: p.stream, events }).is_ok()));
        match sent {
            Some(true) => Ok(rx),
            _ => refuse(ApiError::internal("the server is shutting down").with_status(503, "server_error")),
        }
    }
}

/// Equality of two byte strings in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_compare_equal_only_when_equal() {
        use super::constant_time_eq as eq;
        assert!(eq(b"sk-abc", b"sk-abc"));
        assert!(
            !eq(b"sk-abc", b"sk-abd") && !eq(b"sk-ab", b"sk-abc") && !eq(b"", b"sk") && !eq(b"sk-abc\xff", b"sk-abc")
        );
        assert!(eq(b"", b""));
    }
}
