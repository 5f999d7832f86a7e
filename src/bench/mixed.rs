//! Bootstrapping's mix of short and long answers through the engine, continuous or static batching.

use std::time::Instant;

use candle_core::Tensor;
use rand::Rng;

use crate::generate::{Engine, EngineOptions, Feed, Finished, Policy, Request, SamplingParams};
use crate::model::{Model, Pass};
use crate::text::Tokenizer;
use crate::Result;

/// One policy's run of the mixed workload ([`mixed_workload`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedFigures {
    /// `continuous` (the engine) or `static` (static batching replayed on it).
    pub policy: String,
    pub batch: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// New tokens per second, end to end (image encoding and prefill included).
    pub new_tok_s: f64,
    pub requests_per_s: f64,
    /// Time to first token from the start of the run (every request arrives at once, as in an offline bootstrap).
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    /// Row-steps spent on sequences that had already finished, of all decoding row-steps.
    pub wasted_share: f64,
    /// Sequences per decoding step, on average, over the batch size.
    pub occupancy: f64,
    pub engine: crate::generate::EngineStats,
    /// Peak memory of the run (resident set on the CPU, device memory on CUDA).
    pub memory: crate::memory::MemoryFigures,
}

/// Lengths of the mixed workload: one third yes/no answers of 1-3 new tokens after questions of 8-24 tokens, one
/// third short answers of 4-24 after questions of 8-24, one third descriptions of 32-`longest` after instructions
/// of 6-12; every prompt is BOS + the image positions + the question.
fn mixed_lengths(rng: &mut rand::rngs::StdRng, longest: usize) -> (usize, usize) {
    match rng.random_range(0..3) {
        0 => (rng.random_range(8..=24), rng.random_range(1..=3)),
        1 => (rng.random_range(8..=24), rng.random_range(4..=24)),
        _ => (rng.random_range(6..=12), rng.random_range(32.min(longest)..=longest)),
    }
}

/// The mixed workload as the engine's feed: requests drawn as it has room, their first-token times collected.
struct Mixed {
    rng: rand::rngs::StdRng,
    left: usize,
    next_id: usize,
    longest: usize,
    image: Option<Tensor>,
    head: Vec<u32>,
    vocab: u32,
    start: Instant,
    /// When each running request was handed to the engine (seconds since `start`).
    handed: std::collections::HashMap<usize, f64>,
    ttft: Vec<f64>,
    prompt_tokens: usize,
    new_tokens: usize,
}
impl Feed for Mixed {
    fn next(&mut self) -> Result<Option<(usize, Request)>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let (question, new) = mixed_lengths(&mut self.rng, self.longest);
        let mut ids = self.head.clone();
        ids.extend((0..question).map(|_| self.rng.random_range(10..self.vocab)));
        self.prompt_tokens += ids.len();
        let id = self.next_id;
        self.next_id += 1;
        self.handed.insert(id, self.start.elapsed().as_secs_f64());
        let params = SamplingParams { max_new_tokens: new, ..Default::default() };
        Ok(Some((id, Request { ids, image: self.image.clone(), params, seed: id as u64, contrast: None })))
    }
    fn done(&mut self, f: Finished) -> Result<()> {
        let handed = self.handed.remove(&f.id).unwrap_or_default();
        self.ttft.push(handed + f.first_token.as_secs_f64());
        self.new_tokens += f.completion.ids.len();
        Ok(())
    }
}

/// Runs `requests` requests of the mixed workload drawn from `seed` (see `mixed_lengths`; descriptions up to
/// `longest` new tokens) through an engine of `batch` rows with `policy`, greedy, one random image shared by all.
/// Requests are made when the engine has room for them, as the commands do. `tok` must have EOS disabled, so that
/// every request generates exactly its length.
pub fn mixed_workload(
    model: &Model,
    tok: &Tokenizer,
    batch: usize,
    requests: usize,
    longest: usize,
    seed: u64,
    policy: Policy,
) -> Result<MixedFigures> {
    use rand::SeedableRng;

    let image = match model.vision.as_ref().map(|v| v.cfg.vision.image_size) {
        Some(px) => Some(Tensor::randn(0f32, 1.0, (3, px, px), &model.rt.device)?),
        None => None,
    };
    let mut head = vec![1u32];
    head.extend(std::iter::repeat_n(model.image_token().unwrap_or(0), model.image_tokens()));
    let mut feed = Mixed {
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        left: requests,
        next_id: 0,
        longest,
        image,
        head,
        vocab: (model.llm.cfg.vocab_size as u32).clamp(11, 1000),
        start: Instant::now(),
        handed: Default::default(),
        ttft: Vec::with_capacity(requests),
        prompt_tokens: 0,
        new_tokens: 0,
    };
    let opts = EngineOptions { policy, ..EngineOptions::rows(batch, None) };
    let probe = crate::memory::Probe::start(&model.rt.device);
    let mut engine = Engine::new(model, tok, opts, Pass::INFER)?;
    feed.start = Instant::now();
    engine.run(&mut feed)?;
    let seconds = feed.start.elapsed().as_secs_f64();
    let memory = probe.finish();
    let stats = engine.stats().clone();
    let mut ttft = feed.ttft;
    ttft.sort_by(f64::total_cmp);
    let at = |q: f64| ttft.get(((ttft.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    Ok(MixedFigures {
        policy: if policy == Policy::Static { "static" } else { "continuous" }.to_string(),
        batch,
        requests,
        prompt_tokens: feed.prompt_tokens,
        new_tokens: feed.new_tokens,
        seconds,
        new_tok_s: feed.new_tokens as f64 / seconds,
        requests_per_s: requests as f64 / seconds,
        ttft_mean_s: ttft.iter().sum::<f64>() / ttft.len().max(1) as f64,
        ttft_p50_s: at(0.5),
        ttft_p90_s: at(0.9),
        wasted_share: stats.wasted_rows as f64 / stats.decode_rows.max(1) as f64,
        occupancy: stats.decode_rows as f64 / (stats.decode_steps.max(1) * batch) as f64,
        engine: stats,
        memory,
    })
}
