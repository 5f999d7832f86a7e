//! Text generation: the continuous-batching [`Engine`] (prefill and KV-cache decoding over a slot cache), greedy,
//! temperature, top-k and top-p sampling, EOS and stop strings, contrast rows for contrastive decoding (see
//! `bootstrap`), and LLaVA question/answer files ([`vqa`]).

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

pub mod engine;
mod request;
mod step;
pub mod vqa;

pub use engine::Engine;
pub use request::{request_seed, EngineOptions, EngineStats, Feed, Finished, Policy, Request};

use crate::model::{Model, Pass, Vlm};
use crate::text::Tokenizer;
use crate::{bail, Result};

/// Decoding settings. `temperature == 0` is greedy.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// The run's seed. Each request samples from its own seed ([`Request::seed`]), made from this one and the
    /// request's id by [`request_seed`].
    pub seed: u64,
    /// Generation stops when the decoded text contains one of these; the stop string is cut off.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { max_new_tokens: 128, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, stop: Vec::new() }
    }
}

impl SamplingParams {
    /// Refuses a temperature that is negative or not finite, a top-p outside (0, 1], no new tokens at all and
    /// an empty stop string (which would end every answer before it starts).
    pub fn validate(&self) -> Result<()> {
        crate::range::check("max_new_tokens", self.max_new_tokens, crate::range::at_least_one)?;
        if let Some(why) = self.stop.iter().find_map(|s| crate::range::not_empty(s).err()) {
            return Err(crate::Error::Range(format!("stop string = \"\": {why}")));
        }
        check_sampling(self.temperature, self.top_p)
    }
}

/// The sampling ranges, for every option set that carries a temperature and a top-p.
pub fn check_sampling(temperature: f32, top_p: f32) -> Result<()> {
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("the sampling temperature must be a finite number >= 0 (0 = greedy), got {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("top-p must lie in (0, 1] (1 = off), got {top_p}");
    }
    Ok(())
}

/// What came out for one request.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub ids: Vec<u32>,
    pub text: String,
    /// True when EOS or a stop string ended it (false: `max_new_tokens` reached).
    pub stopped: bool,
}

impl Vlm {
    /// A request for `question` (with `image`, preprocessed) under `params`, its sampling seeded by `seed`.
    pub fn request(
        &self,
        question: &str,
        image: Option<Tensor>,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Request> {
        let ids = self.prompt_ids(question, image.is_some())?;
        Ok(Request { ids, image, params: params.clone(), seed, contrast: None })
    }

    /// Completes `requests`, in order, on an engine with the default options.
    pub fn answer(&self, requests: Vec<Request>, pass: Pass) -> Result<Vec<Completion>> {
        generate(&self.model, &self.tok, requests, &EngineOptions::default(), pass)
    }
}

/// Completes `requests`, in order, on one [`Engine`] with `opts`.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    requests: Vec<Request>,
    opts: &EngineOptions,
    pass: Pass,
) -> Result<Vec<Completion>> {
    Engine::new(model, tok, opts.clone(), pass)?.generate_all(requests)
}

/// Combines the logits of a row and of its contrast row into the logits to sample from.
pub type Combine<'a> = &'a dyn Fn(&[f32], &[f32]) -> Vec<f32>;

/// Refuses a prompt of `prompt` tokens when `new` more tokens do not fit in `context` positions; `new` alone at or
/// above the context is a setting out of range ([`crate::Error::Range`]), whatever the prompt.
pub fn fits_context(prompt: usize, new: usize, context: usize) -> Result<()> {
    if new >= context {
        return Err(crate::Error::Range(format!(
            "max_new_tokens = {new}: must be below the model's context of {context} tokens"
        )));
    }
    if prompt.saturating_add(new) > context {
        bail!("prompt of {prompt} tokens + {new} new tokens exceeds the model's context of {context}");
    }
    Ok(())
}

impl Completion {
    /// Takes the next token `id`: EOS ends the completion; any other token is kept, and the text is cut at the
    /// first stop string that appears. Whether the completion has ended.
    pub(crate) fn push(&mut self, id: u32, tok: &Tokenizer, stop: &[String]) -> Result<bool> {
        if tok.eos.contains(&id) {
            self.stopped = true;
            return Ok(true);
        }
        self.ids.push(id);
        if !stop.is_empty() {
            self.text = tok.decode(&self.ids)?;
            if let Some(at) = stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
                self.text.truncate(at);
                self.stopped = true;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Picks the next token from `logits` per `params`. Sorting is limited to what top-k / top-p need: a full sort
/// of a 32k vocabulary per token would cost more than the decode step of a small model.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature;
    // Unnormalised probabilities; -inf logits (masked tokens) get 0.
    let mut cand: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())).collect();
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, desc);
        cand.truncate(params.top_k);
    }
    if params.top_p < 1.0 {
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let need = params.top_p * total;
        // Most nuclei are small: sort the top 256 first and fall back to a full sort only if they fall short.
        let head = 256.min(cand.len());
        if head < cand.len() {
            cand.select_nth_unstable_by(head - 1, desc);
        }
        let head_mass: f32 = cand[..head].iter().map(|c| c.1).sum();
        if head_mass >= need {
            cand.truncate(head);
        }
        cand.sort_unstable_by(desc);
        // Keep tokens while the mass before them is below top_p (the first token always stays).
        let mut mass = 0.0;
        let keep = cand.iter().take_while(|c| {
            let k = mass < need;
            mass += c.1;
            k
        });
        let k = keep.count().max(1);
        cand.truncate(k);
    }
    let total: f32 = cand.iter().map(|c| c.1).sum();
    let mut u = rng.random::<f32>() * total;
    for c in &cand {
        if u < c.1 {
            return c.0;
        }
        u -= c.1;
    }
    cand.last().map_or(0, |c| c.0)
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0
        as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..Default::default() }
    }

    fn counts(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[sample(logits, p, &mut rng) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], &params(0.0, 0, 1.0), &mut rng), 1);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        // probabilities ~ 0.64, 0.24, 0.09, 0.03
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let c = counts(&logits, &params(1.0, 2, 1.0), 2000);
        assert!(c[2] == 0 && c[3] == 0 && c[0] > c[1] && c[1] > 0, "top-k 2: {c:?}");
        let c = counts(&logits, &params(1.0, 0, 0.7), 2000);
        assert!(c[2] == 0 && c[3] == 0 && c[1] > 0, "top-p 0.7 keeps two tokens: {c:?}");
        let c = counts(&logits, &params(1.0, 0, 0.5), 500);
        assert_eq!(c[0], 500, "top-p 0.5 keeps only the first token");
    }

    #[test]
    fn sampling_follows_the_softmax_and_skips_masked_tokens() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let c = counts(&logits, &params(1.0, 0, 1.0), 4000);
        assert_eq!(c[2], 0);
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((ratio - 3.0).abs() < 0.4, "p1/p0 should be 3, got {ratio}");
    }
}
