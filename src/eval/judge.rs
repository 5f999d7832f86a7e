//! An LLM judge behind an OpenAI-compatible chat server, for the judged benchmarks ([`super::mmvet`],
//! [`super::llava_bench`], [`super::mmhal`]).
//!
//! - A request is what the official scripts send to `/v1/chat/completions`: `model`, `messages`,
//!   `temperature`, and `max_tokens` only where the script sets one. Transport, retries and back-off are
//!   [`crate::http::HttpCompleter::send`]'s: connection errors, timeouts, 429, 5xx and replies that are not the expected JSON
//!   (HTML, malformed JSON, no `choices`, a `null` message, an oversized body) are retried `retries`
//!   times with a doubling wait; any other failure, or one that outlasts the retries, stops the run with one line
//!   naming the judge URL and the reason. Nothing unread is cached.
//! - Every reply is appended to a cache file (JSON Lines) under a key derived from (judge model, run index,
//!   messages, temperature, max_tokens) before it is used, so a killed run asks only what it had not asked, and
//!   a re-run with the same answers sends nothing. A line torn by a kill is cut away on open; a file that is not
//!   a judge cache (an input given as `--judge-cache` by mistake) is refused unchanged. The cache holds
//!   requests and replies, never the API key (the caller reads it from an environment variable; it only ever
//!   travels in the `Authorization` header).
//! - [`map_concurrent`] grades items on `concurrency` scoped threads; the first error stops the others from
//!   starting new items. [`check_reachable`] lets a caller fail before any work when the judge is not there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[cfg(feature = "http")]
mod client;
#[cfg(feature = "http")]
pub use client::{check_reachable, Judge};

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

/// A judge a benchmark run grades with ([`Judge`] with the `http` feature): it answers requests, and says its
/// model, how many requests it takes at once, and what it cost.
pub trait Grader: Ask {
    fn model(&self) -> &str;
    fn concurrency(&self) -> usize;
    /// Requests sent, and requests answered from a cache.
    fn counts(&self) -> (usize, usize);
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
    /// Total time allowed for one request (default [`crate::http::DEFAULT_TIMEOUT`] in the CLI).
    pub timeout: Duration,
    /// The reply cache (JSON Lines), created if missing. It is checked as an output (a regular file or nothing,
    /// none of `inputs`), and a file that is not a judge cache bpo wrote is refused, unchanged.
    pub cache: PathBuf,
    /// The run's input files (questions, answers, references, ...), which the cache may not be.
    pub inputs: Vec<PathBuf>,
}

/// Applies `f` to every item on `workers` scoped threads, keeping the input order, and advances `events` by one
/// after each finished item. The first error is returned; items not yet started are then skipped.
pub fn map_concurrent<I: Sync, T: Send>(
    items: &[I],
    workers: usize,
    f: impl Fn(&I) -> Result<T> + Sync,
    events: &dyn crate::progress::Events,
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
                                events.advance(1);
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

/// The default cache file of a run folder.
pub fn cache_path(out: &Path) -> PathBuf {
    out.join("judge-cache.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_order_and_stops_at_the_first_error() {
        use crate::progress::{Events, Recorder, Silent};
        let items: Vec<usize> = (0..50).collect();
        let seen = Recorder::default();
        seen.stage("grading", Some(50));
        let out = map_concurrent(&items, 4, |&i| Ok(i * 2), &seen).unwrap();
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(seen.done_in("grading"), 50, "one unit an item, from every worker");
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
            &Silent,
        );
        assert_eq!(err.unwrap_err().to_string(), "boom");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one worker stops after the failing item");
        assert!(map_concurrent(&Vec::<u8>::new(), 3, |&i| Ok(i), &Silent).unwrap().is_empty());
    }
}
