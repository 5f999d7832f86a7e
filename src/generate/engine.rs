//! The generation engine: continuous batching over a slot cache, the one way bpo generates.
//!
//! Requests ([`Request`]: prompt ids, image, sampling settings, seed, an optional contrast row) come in, completions
//! come out as they finish. Each [`Engine::step`] is one forward pass over a packed batch
//! ([`crate::model::slots`]): one new token for every running sequence that decodes, plus the next chunk of the
//! prompts being prefilled (at most [`EngineOptions::prefill_chunk`] prompt tokens a step, so that a long prefill
//! shares its steps with the rows that decode instead of stalling them). A sequence that ends leaves at once; its
//! rows of the KV cache go to the next waiting request, which is admitted when it fits: at most
//! [`EngineOptions::max_rows`] sequences, and its rows (prompt + most new tokens, per sequence) within the cache's
//! token budget ([`EngineOptions::max_batch_tokens`]). The cache is allocated once and grown, never per request.
//!
//! A request with a contrast image runs two sequences in lockstep (same ids, the other image), admitted and
//! prefilled together; the engine's [`Combine`] merges their logits before sampling and both take the token.
//!
//! Determinism: a request samples from its own seeded generator, so its tokens do not depend on its position or
//! neighbours. On the CPU in f32 the step's arithmetic is also batch-invariant ([`crate::model::cpu_decode`]): a
//! request gets the same bits alone, in a batch of 8 or in another arrival order. On other runtimes (CUDA, bf16)
//! the products depend on the batch's shape, so tokens agree up to float rounding (a near-tie may go either way).
//!
//! [`Policy::Static`] replays static batching for comparison (`bpo bench generate --workload mixed`): a batch is
//! admitted only when the previous one has ended, and its finished rows keep being computed until its longest row
//! ends, as left-padded static batches do.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::request::{EngineOptions, EngineStats, Feed, Finished, Policy, Request};
use super::step::{forward, FreeRows, Picked, Plan};
use super::{fits_context, sample, Combine, Completion, SamplingParams};
use crate::model::cpu_decode::{self, SeqSpan};
use crate::model::runtime::read_back;
use crate::model::{Kernels, Model, Pass, SlotCache};
use crate::text::Tokenizer;
use crate::{bail, Error, Result};

/// The continuous-batching engine over one model (see the module notes).
pub struct Engine<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    pass: Pass,
    opts: EngineOptions,
    combine: Option<Combine<'a>>,
    budget: usize,
    cache: SlotCache,
    free: FreeRows,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    stats: EngineStats,
    /// Added to the logits before a greedy pick on the device: the image placeholder at -inf (made once).
    image_mask: Option<Tensor>,
}

struct Waiting {
    id: usize,
    req: Request,
    added: Instant,
}

/// An admitted request.
struct Running {
    id: usize,
    /// The first cache row of each of its sequences (main, then contrast).
    starts: Vec<usize>,
    reserve: usize,
    /// Prompt embeddings (prompt, hidden) of each sequence, until prefilled.
    embeds: Vec<Tensor>,
    prompt: usize,
    /// Positions in the cache (the same for both sequences).
    cached: usize,
    /// The token to feed at the next step.
    next: u32,
    params: SamplingParams,
    rng: StdRng,
    out: Completion,
    sampled: usize,
    added: Instant,
    first_token: Option<Duration>,
    /// Finished (kept only under [`Policy::Static`], computed until its batch ends).
    done: bool,
}

impl<'a> Engine<'a> {
    pub fn new(model: &'a Model, tok: &'a Tokenizer, opts: EngineOptions, pass: Pass) -> Result<Self> {
        let context = model.llm.cfg.max_position_embeddings;
        if opts.max_rows == 0 || opts.prefill_chunk == 0 || opts.max_batch_tokens == Some(0) {
            bail!("the engine needs at least 1 row, 1 prefill token and 1 cache token: {opts:?}");
        }
        let budget = opts.max_batch_tokens.unwrap_or(opts.max_rows * context);
        let vocab = model.llm.cfg.vocab_size;
        let image_mask = match model.image_token().map(|t| t as usize).filter(|&t| t < vocab) {
            Some(t) if model.rt.kernels == Kernels::Generic => {
                let mut mask = vec![0f32; vocab];
                mask[t] = f32::NEG_INFINITY;
                Some(Tensor::from_vec(mask, (1, vocab), &model.rt.device)?)
            }
            _ => None,
        };
        Ok(Engine {
            model,
            tok,
            pass,
            combine: None,
            budget,
            cache: SlotCache::new(&model.llm.cfg, model.rt.dtype, &model.rt.device),
            free: FreeRows::new(budget),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
            image_mask,
            opts,
        })
    }

    /// Sets how contrast requests merge the logits of their two sequences: `combine(main, contrast)`.
    pub fn with_combine(mut self, combine: Combine<'a>) -> Self {
        self.combine = Some(combine);
        self
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues a request under `id`. Refuses one that cannot run: bad sampling settings, an empty prompt, a prompt
    /// that leaves no room in the context for its new tokens, or one that needs more rows or cache than the engine
    /// has.
    pub fn add(&mut self, id: usize, req: Request) -> Result<()> {
        req.params.validate()?;
        if req.ids.is_empty() {
            bail!("empty prompt");
        }
        if req.params.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        fits_context(req.ids.len(), req.params.max_new_tokens, self.model.llm.cfg.max_position_embeddings)?;
        if req.contrast.is_some() && self.combine.is_none() {
            bail!("a contrast request needs an engine with a combine function");
        }
        if req.rows() > self.opts.max_rows {
            bail!("a request of {} sequences does not fit a batch of {} rows", req.rows(), self.opts.max_rows);
        }
        if req.rows() * req.reserve() > self.budget {
            bail!(
                "a request of {} cache tokens ({} prompt + {} new{}) does not fit --max-batch-tokens {}",
                req.rows() * req.reserve(),
                req.ids.len(),
                req.params.max_new_tokens,
                if req.rows() > 1 { ", twice for the contrast row" } else { "" },
                self.budget
            );
        }
        self.waiting.push_back(Waiting { id, req, added: Instant::now() });
        Ok(())
    }

    /// Whether requests are waiting or running.
    pub fn busy(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Sequences waiting and running.
    fn queued_rows(&self) -> usize {
        self.waiting.iter().map(|w| w.req.rows()).sum::<usize>() + self.running_rows()
    }

    fn running_rows(&self) -> usize {
        self.running.iter().map(|r| r.starts.len()).sum()
    }

    /// Runs until `feed` has no more requests and every one has finished, taking a request from it whenever there
    /// is a row for it.
    pub fn run(&mut self, feed: &mut dyn Feed) -> Result<()> {
        let mut more = true;
        loop {
            while more && self.queued_rows() < self.opts.max_rows {
                match feed.next()? {
                    Some((id, req)) => self.add(id, req)?,
                    None => more = false,
                }
            }
            if !self.busy() {
                return Ok(());
            }
            for f in self.step()? {
                feed.done(f)?;
            }
        }
    }

    /// [`Engine::run`] over an iterator of requests (ids 0, 1, ...; an `Err` stops the run), `done` called as
    /// each finishes.
    pub fn run_each<I, F>(&mut self, requests: I, done: F) -> Result<()>
    where
        I: IntoIterator<Item = Result<Request>>,
        F: FnMut(Finished) -> Result<()>,
    {
        struct Each<I, F>(std::iter::Enumerate<I>, F);
        impl<I: Iterator<Item = Result<Request>>, F: FnMut(Finished) -> Result<()>> Feed for Each<I, F> {
            fn next(&mut self) -> Result<Option<(usize, Request)>> {
                self.0.next().map(|(i, r)| r.map(|r| (i, r))).transpose()
            }
            fn done(&mut self, finished: Finished) -> Result<()> {
                (self.1)(finished)
            }
        }
        self.run(&mut Each(requests.into_iter().enumerate(), done))
    }

    /// Completes every request, returned in order.
    pub fn generate_all(&mut self, requests: Vec<Request>) -> Result<Vec<Completion>> {
        let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
        self.run_each(requests.into_iter().map(Ok), |f| {
            out[f.id] = Some(f.completion);
            Ok(())
        })?;
        out.into_iter().map(|c| c.ok_or_else(|| Error::invalid("a request did not finish"))).collect()
    }

    /// Admits what fits, then runs one forward pass: a token for every decoding sequence and the next prefill
    /// chunk. Returns the requests that finished.
    pub fn step(&mut self) -> Result<Vec<Finished>> {
        self.admit()?;
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.plan()?;
        let logits = self.forward(&plan)?;
        self.stats.steps += 1;
        for (ri, take) in &plan.advance {
            let r = &mut self.running[*ri];
            r.cached += take;
            if r.cached == r.prompt {
                r.embeds.clear();
            }
        }
        self.sample(&plan, logits)
    }

    /// Moves waiting requests into the batch while rows and cache allow, in arrival order.
    fn admit(&mut self) -> Result<()> {
        if self.opts.policy == Policy::Static && !self.running.is_empty() {
            return Ok(());
        }
        // The cache grows once for everything admitted now (by half again at least, so that it rarely grows).
        let mut end = 0;
        while let Some(w) = self.waiting.front() {
            let (rows, reserve) = (w.req.rows(), w.req.reserve());
            if self.running_rows() + rows > self.opts.max_rows {
                break;
            }
            let mut starts = Vec::with_capacity(rows);
            for _ in 0..rows {
                match self.free.take(reserve) {
                    Some(s) => starts.push(s),
                    None => break,
                }
            }
            if starts.len() < rows {
                starts.into_iter().for_each(|s| self.free.give(s, reserve));
                break;
            }
            end = end.max(starts.iter().map(|s| s + reserve).max().unwrap_or(0));
            let Some(Waiting { id, req, added }) = self.waiting.pop_front() else { break };
            let (model, pass) = (self.model, self.pass);
            let images = std::iter::once(req.image.as_ref()).chain(req.contrast.as_ref().map(Some));
            let embeds = cpu_decode::run(model.rt.kernels == Kernels::Fused, || {
                images.map(|image| model.prompt_embeds(&req.ids, image, pass)).collect::<Result<Vec<_>>>()
            })?;
            self.running.push(Running {
                id,
                starts,
                reserve,
                embeds,
                prompt: req.ids.len(),
                cached: 0,
                next: self.tok.pad,
                rng: StdRng::seed_from_u64(req.seed),
                params: req.params,
                out: Completion::default(),
                sampled: 0,
                added,
                first_token: None,
                done: false,
            });
        }
        if end > self.cache.rows() {
            let grown = end.max(self.cache.rows() * 3 / 2).min(self.budget);
            self.cache.grow(grown)?;
            self.stats.cache_rows = grown;
        }
        Ok(())
    }

    /// What the next forward pass computes: decoding sequences first, then prefill chunks in admission order.
    fn plan(&mut self) -> Result<Plan> {
        let mut p = Plan::default();
        let decoding = self.running.iter().any(|r| r.cached >= r.prompt);
        self.stats.decode_steps += usize::from(decoding);
        for (ri, r) in self.running.iter().enumerate().filter(|(_, r)| r.cached >= r.prompt) {
            let first = p.tokens();
            // A finished row (static batching) keeps computing a pad token over its own last cache row.
            let (at, feed) = if r.done { (r.cached.min(r.reserve - 1), self.tok.pad) } else { (r.cached, r.next) };
            for &start in &r.starts {
                p.spans.push(SeqSpan { token: p.tokens(), len: 1, start, past: at });
                p.positions.push(at as u32);
                p.decode_ids.push(feed);
            }
            self.stats.decode_rows += r.starts.len();
            if r.done {
                self.stats.wasted_rows += r.starts.len();
            } else {
                p.advance.push((ri, 1));
                p.samplers.push((ri, (first..p.tokens()).collect()));
            }
        }
        let mut budget = self.opts.prefill_chunk;
        for (ri, r) in self.running.iter().enumerate().filter(|(_, r)| r.cached < r.prompt) {
            let rows = r.starts.len();
            // At least one token when nothing else runs, so that a chunk smaller than a contrast pair still moves.
            let take = (r.prompt - r.cached).min(budget / rows).max(usize::from(p.spans.is_empty()));
            if take == 0 {
                break;
            }
            budget = budget.saturating_sub(take * rows);
            let mut lasts = Vec::with_capacity(rows);
            for (&start, embeds) in r.starts.iter().zip(&r.embeds) {
                p.spans.push(SeqSpan { token: p.tokens(), len: take, start, past: r.cached });
                p.positions.extend((r.cached..r.cached + take).map(|x| x as u32));
                p.prefill.push(embeds.narrow(0, r.cached, take)?);
                lasts.push(p.tokens() - 1);
            }
            self.stats.prefill_tokens += take * rows;
            p.advance.push((ri, take));
            if r.cached + take == r.prompt {
                // The prompt is in: its last token's logits give the first new token.
                p.samplers.push((ri, lasts));
            }
        }
        Ok(p)
    }

    /// The forward pass of `plan` and its one read back from the device ([`read_back`]): for an all-greedy step on
    /// the device-generic path (what CUDA runs), the chosen ids (argmax on the device, the image placeholder
    /// excluded); otherwise each sampler's logits as f32 rows, sampled on the host with the requests' own generators.
    fn forward(&mut self, plan: &Plan) -> Result<Picked> {
        let device_pick = self.model.rt.kernels == Kernels::Generic
            && plan.samplers.iter().all(|(ri, t)| t.len() == 1 && self.running[*ri].params.temperature <= 0.0);
        let (model, cache, pass) = (self.model, &mut self.cache, self.pass);
        let pick = device_pick.then_some(self.image_mask.as_ref());
        let out = cpu_decode::run(model.rt.kernels == Kernels::Fused, || forward(model, cache, plan, pass, pick))?;
        Ok(match out {
            None => Picked::Logits(Vec::new(), 0),
            Some(ids) if device_pick => Picked::Ids(read_back(&ids)?),
            Some(logits) => Picked::Logits(read_back(&logits)?, logits.dim(1)?),
        })
    }

    /// Samples the next token of every request of `plan` that has logits, and retires the finished ones.
    fn sample(&mut self, plan: &Plan, mut picked: Picked) -> Result<Vec<Finished>> {
        let image_token = self.model.image_token();
        let mut row = 0;
        let mut ended = false;
        for (ri, tokens) in &plan.samplers {
            let r = &mut self.running[*ri];
            let id = match &mut picked {
                Picked::Ids(ids) => ids[row],
                Picked::Logits(flat, vocab) => {
                    let vocab = *vocab;
                    let mut combined;
                    let logits = match (tokens.len(), self.combine) {
                        (2, Some(combine)) => {
                            combined = combine(&flat[row * vocab..][..vocab], &flat[(row + 1) * vocab..][..vocab]);
                            &mut combined[..]
                        }
                        _ => &mut flat[row * vocab..][..vocab],
                    };
                    // The image placeholder is never an output: fed back, it would ask for an image that is not there.
                    if let Some(slot) = image_token.and_then(|t| logits.get_mut(t as usize)) {
                        *slot = f32::NEG_INFINITY;
                    }
                    sample(logits, &r.params, &mut r.rng)
                }
            };
            row += tokens.len();
            r.first_token.get_or_insert_with(|| r.added.elapsed());
            r.sampled += 1;
            r.next = id;
            self.stats.new_tokens += 1;
            if r.out.push(id, self.tok, &r.params.stop)? || r.sampled >= r.params.max_new_tokens {
                if !r.out.stopped || r.params.stop.is_empty() {
                    r.out.text = self.tok.decode(&r.out.ids)?;
                }
                r.done = true;
                ended = true;
            }
        }
        let leave = ended
            && match self.opts.policy {
                Policy::Continuous => true,
                Policy::Static => self.running.iter().all(|r| r.done),
            };
        if !leave {
            return Ok(Vec::new());
        }
        let (gone, stay): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|r| r.done);
        self.running = stay;
        self.stats.finished += gone.len();
        Ok(gone
            .into_iter()
            .map(|r| {
                r.starts.iter().for_each(|&s| self.free.give(s, r.reserve));
                Finished { id: r.id, completion: r.out, first_token: r.first_token.unwrap_or_default() }
            })
            .collect())
    }

    /// Drops request `id`, waiting or running (its client went away): its cache rows are free for the next step.
    /// Whether it was there.
    pub fn cancel(&mut self, id: usize) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            return true;
        }
        let Some(i) = self.running.iter().position(|r| r.id == id) else { return false };
        let r = self.running.remove(i);
        r.starts.iter().for_each(|&s| self.free.give(s, r.reserve));
        true
    }

    /// The tokens each running request has sampled so far (EOS excluded), by id: what a streaming client has
    /// been sent is a prefix of them.
    pub fn partial(&self) -> impl Iterator<Item = (usize, &[u32])> {
        self.running.iter().filter(|r| !r.done).map(|r| (r.id, r.out.ids.as_slice()))
    }

    /// Requests waiting and running.
    pub fn queue(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }
}
