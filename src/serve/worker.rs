//! The engine thread: the one thread that runs the model. Requests arrive over a channel; each served model (the
//! base and every adapter) has its own [`Engine`], stepped in turn; tokens (when streamed) and completions go back
//! over each request's own channel. A request whose channel is closed (its client went away) is cancelled at the
//! next step, freeing its rows.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::api::ApiError;
use super::metrics::Metrics;
use super::Served;
use crate::generate::{Completion, Engine, EngineOptions, Finished, Request};
use crate::model::Pass;
use crate::text::Tokenizer;

/// A request for the engine thread.
pub struct Job {
    /// Index of the served model (0: the base).
    pub model: usize,
    pub req: Request,
    /// Send text as it is generated.
    pub stream: bool,
    pub events: UnboundedSender<Event>,
}

/// What the engine thread sends back about a request.
pub enum Event {
    /// More text (streaming only).
    Delta(String),
    Done(Completion),
    Failed(ApiError),
}

/// A request in the engine.
struct Live {
    engine: usize,
    events: UnboundedSender<Event>,
    stream: bool,
    /// Bytes held back from streaming: the longest stop string, which the text may still end with.
    hold: usize,
    /// The text streamed so far.
    sent: String,
    prompt: usize,
}

/// Runs until the job channel is closed and every request has finished.
pub fn run(served: &Served, opts: &EngineOptions, jobs: Receiver<Job>, metrics: &Metrics) {
    let models = served.models();
    let tok = &served.vlm.tok;
    let new_engine = |i: usize| Engine::new(models[i], tok, opts.clone(), Pass::INFER);
    let mut engines: Vec<Engine> = match (0..models.len()).map(new_engine).collect::<crate::Result<_>>() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: the engine cannot start: {e}");
            return;
        }
    };
    let mut live: HashMap<usize, Live> = HashMap::new();
    let mut next_id = 0usize;
    let mut open = true;
    loop {
        // Wait for work when there is none; otherwise take what has arrived and step.
        if live.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(job) => add(&mut engines, &mut live, &mut next_id, job, metrics),
                Err(_) => return,
            }
        }
        open &= take_arrived(&jobs, &mut engines, &mut live, &mut next_id, metrics);
        live.retain(|&id, l| {
            if !l.events.is_closed() {
                return true;
            }
            engines[l.engine].cancel(id);
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            metrics.outstanding.fetch_sub(1, Ordering::Relaxed);
            false
        });
        for (i, engine) in engines.iter_mut().enumerate() {
            if !engine.busy() {
                continue;
            }
            match engine.step() {
                Ok(finished) => {
                    stream(engine, tok, &mut live);
                    for f in finished {
                        if let Some(l) = live.remove(&f.id) {
                            finish(l, f, metrics);
                        }
                    }
                }
                Err(e) => {
                    // A failed step leaves the engine's state unknown: its requests fail and it starts afresh.
                    eprintln!("error: generation step failed: {e}");
                    live.retain(|_, l| {
                        if l.engine != i {
                            return true;
                        }
                        let _ = l.events.send(Event::Failed(ApiError::internal(format!("generation failed: {e}"))));
                        metrics.outstanding.fetch_sub(1, Ordering::Relaxed);
                        false
                    });
                    match new_engine(i) {
                        Ok(fresh) => *engine = fresh,
                        Err(e) => {
                            eprintln!("error: the engine cannot restart: {e}");
                            return;
                        }
                    }
                }
            }
        }
        let (waiting, running) = engines.iter().map(Engine::queue).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        metrics.waiting.store(waiting, Ordering::Relaxed);
        metrics.running.store(running, Ordering::Relaxed);
    }
}

/// Adds the jobs that have arrived, without waiting; false once the channel is closed.
fn take_arrived(
    jobs: &Receiver<Job>,
    engines: &mut [Engine],
    live: &mut HashMap<usize, Live>,
    next_id: &mut usize,
    metrics: &Metrics,
) -> bool {
    loop {
        match jobs.try_recv() {
            Ok(job) => add(engines, live, next_id, job, metrics),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

/// Counts a finished request and sends its end: for a stream, the rest of the text (what the stop strings held
/// back, or a last token), then the completion.
fn finish(mut l: Live, f: Finished, metrics: &Metrics) {
    metrics.first_token(f.first_token);
    let c = f.completion;
    metrics.prompt_tokens.fetch_add(l.prompt as u64, Ordering::Relaxed);
    metrics.generation_tokens.fetch_add((c.ids.len() + usize::from(c.stopped)) as u64, Ordering::Relaxed);
    metrics.outstanding.fetch_sub(1, Ordering::Relaxed);
    if l.stream {
        match c.text.strip_prefix(l.sent.as_str()) {
            Some(rest) if !rest.is_empty() => {
                let _ = l.events.send(Event::Delta(rest.to_string()));
            }
            Some(_) => {}
            None => eprintln!("warning: request {}: streamed text is not a prefix of the answer", f.id),
        }
        l.sent.clear();
    }
    let _ = l.events.send(Event::Done(c));
}

fn add(engines: &mut [Engine], live: &mut HashMap<usize, Live>, next_id: &mut usize, job: Job, metrics: &Metrics) {
    let id = *next_id;
    *next_id += 1;
    let hold = job.req.params.stop.iter().map(String::len).max().unwrap_or(0);
    let prompt = job.req.ids.len();
    match engines[job.model].add(id, job.req) {
        Ok(()) => {
            let l =
                Live { engine: job.model, events: job.events, stream: job.stream, hold, sent: String::new(), prompt };
            live.insert(id, l);
        }
        Err(e) => {
            metrics.outstanding.fetch_sub(1, Ordering::Relaxed);
            let _ = job.events.send(Event::Failed(ApiError::invalid(format!("{e}"), None)));
        }
    }
}

/// Sends each streaming request of `engine` the text its new tokens added, holding back what a stop string may
/// still cut and what later tokens may still change (an incomplete character, a run of byte tokens).
fn stream(engine: &Engine, tok: &Tokenizer, live: &mut HashMap<usize, Live>) {
    for (id, ids) in engine.partial() {
        let Some(l) = live.get_mut(&id).filter(|l| l.stream) else { continue };
        // Trailing byte tokens are held back: with the next ones they may decode to other text.
        let stable = ids.len() - ids.iter().rev().take_while(|&&id| tok.is_byte_token(id)).count();
        let Ok(text) = tok.decode(&ids[..stable]) else { continue };
        let text = text.trim_end_matches('\u{FFFD}');
        let mut end = text.len().saturating_sub(l.hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= l.sent.len() || !text.starts_with(l.sent.as_str()) {
            continue;
        }
        let delta = &text[l.sent.len()..end];
        if l.events.send(Event::Delta(delta.to_string())).is_ok() {
            l.sent.push_str(delta);
        }
    }
}

/// Spawns the engine thread over `served`.
pub fn spawn(
    served: Arc<Served>,
    opts: EngineOptions,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("bpo-engine".into()).spawn(move || run(&served, &opts, jobs, &metrics))
}
