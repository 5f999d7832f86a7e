//! What the [`super::Engine`] takes and gives: requests, their options and seeds, finished requests, statistics,
//! and the [`Feed`] that streams requests in.

use std::time::Duration;

use candle_core::Tensor;

use super::{Completion, SamplingParams};
use crate::hash::stable_hash;
use crate::Result;

/// How an [`super::Engine`] batches.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences in a step at most (the batch size; a contrast request is two sequences). Default 8.
    pub max_rows: usize,
    /// Token budget of the KV cache, shared by the running sequences: a request is admitted when its sequences
    /// (prompt + most new tokens each) fit beside the others. None: `max_rows` times the model's context, which
    /// never binds; the cache then grows to what the requests really use.
    pub max_batch_tokens: Option<usize>,
    /// Prompt tokens prefilled in one step at most (chunked prefill). Default 512.
    pub prefill_chunk: usize,
    pub policy: Policy,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_rows: 8, max_batch_tokens: None, prefill_chunk: 512, policy: Policy::Continuous }
    }
}

impl EngineOptions {
    /// Continuous batching of up to `max_rows` sequences within `max_batch_tokens`.
    pub fn rows(max_rows: usize, max_batch_tokens: Option<usize>) -> Self {
        EngineOptions { max_rows, max_batch_tokens, ..Default::default() }
    }
}

/// When waiting requests join and when finished ones leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// At every step: a finished sequence leaves at once and a waiting request takes its place.
    #[default]
    Continuous,
    /// Static batching, for comparison only (see the module notes).
    Static,
}

/// One prompt to complete.
#[derive(Clone, Default)]
pub struct Request {
    /// Token ids, image positions already expanded.
    pub ids: Vec<u32>,
    /// The preprocessed image (3, H, W), if the prompt has image positions.
    pub image: Option<Tensor>,
    pub params: SamplingParams,
    /// Seeds this request's sampling, and nothing else's (see [`request_seed`]); `params.seed` is not read.
    pub seed: u64,
    /// A contrast sequence: the same ids with this image, decoded in lockstep (see the module notes).
    pub contrast: Option<Tensor>,
}

impl Request {
    /// Sequences it runs (1, or 2 with a contrast image).
    pub(super) fn rows(&self) -> usize {
        1 + usize::from(self.contrast.is_some())
    }

    /// Cache rows each of its sequences needs at most: the prompt and every new token but the last.
    pub(super) fn reserve(&self) -> usize {
        self.ids.len() + self.params.max_new_tokens.max(1) - 1
    }
}

/// The sampling seed of request `id` of a run seeded with `seed`: a request's tokens then depend on the run's seed
/// and its own id only, not on the order or company it is generated in, so a resumed or re-sharded run draws the
/// same ones.
pub fn request_seed(seed: u64, id: &str) -> u64 {
    stable_hash(&["request", &seed.to_string(), id])
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The id it was added with.
    pub id: usize,
    pub completion: Completion,
    /// From [`super::Engine::add`] to its first token.
    pub first_token: Duration,
}

/// What the engine has done so far.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Forward passes.
    pub steps: usize,
    /// Forward passes with at least one decoding sequence.
    pub decode_steps: usize,
    /// Sequences computed in decoding steps, summed over the steps (the row-steps).
    pub decode_rows: usize,
    /// Of those, sequences that had already finished (static batching's waste; 0 when continuous).
    pub wasted_rows: usize,
    /// Prompt tokens prefilled (a contrast request's prompt counts twice).
    pub prefill_tokens: usize,
    /// Tokens sampled (one per request and step).
    pub new_tokens: usize,
    /// Requests finished.
    pub finished: usize,
    /// Rows the KV cache grew to.
    pub cache_rows: usize,
}

/// Where [`super::Engine::run`] takes requests from and hands completions to.
pub trait Feed {
    /// The next request and the id its completion comes back with; `None` when there are no more. Called only when
    /// the engine has room for it, so a feed that loads images here holds only the running requests' in memory.
    fn next(&mut self) -> Result<Option<(usize, Request)>>;
    /// A request finished. An error stops the run.
    fn done(&mut self, finished: Finished) -> Result<()>;
}
