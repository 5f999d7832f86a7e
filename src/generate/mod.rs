//! Text generation: batched prefill, then KV-cache decoding one token per step (the cache is preallocated and
//! appended in place), with greedy, temperature, top-k and top-p sampling, EOS and stop strings.
//!
//! Rows of different lengths are left-padded. A second, "contrast" set of rows can run in the same batch (same
//! tokens, another image): their logits are combined per row before sampling, which is how the contrastive decoding
//! modes of image weakening are built (see `bootstrap`).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod vqa;

use crate::model::{Cache, Inputs, Model, Pass};
use crate::text::Tokenizer;
use crate::{bail, Result};

use crate::model::Vlm;

/// Decoding settings. `temperature == 0` is greedy.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
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

/// One prompt: token ids (with image positions already expanded) and the preprocessed image (3, H, W), if any.
#[derive(Clone)]
pub struct Request {
    pub ids: Vec<u32>,
    pub image: Option<Tensor>,
}

/// What came out for one request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub ids: Vec<u32>,
    pub text: String,
    /// True when EOS or a stop string ended it (false: `max_new_tokens` reached).
    pub stopped: bool,
}

impl Vlm {
    pub fn request(&self, question: &str, image: Option<Tensor>) -> Result<Request> {
        Ok(Request { ids: self.prompt_ids(question, image.is_some())?, image })
    }

    /// Answers a batch of requests.
    pub fn answer(&self, requests: &[Request], params: &SamplingParams, pass: Pass) -> Result<Vec<Completion>> {
        generate(&self.model, &self.tok, requests, params, pass)
    }
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

/// Generates a completion for each request, in one batch.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    requests: &[Request],
    params: &SamplingParams,
    pass: Pass,
) -> Result<Vec<Completion>> {
    generate_contrast(model, tok, requests, None, params, pass)
}

/// Like [`generate`], with optional contrast rows (`contrast[i]` pairs with `requests[i]`, same ids) whose logits are
/// merged with `combine(request_logits, contrast_logits)`.
pub fn generate_contrast(
    model: &Model,
    tok: &Tokenizer,
    requests: &[Request],
    contrast: Option<(&[Request], Combine)>,
    params: &SamplingParams,
    pass: Pass,
) -> Result<Vec<Completion>> {
    let seeds: Vec<u64> =
        (0..requests.len()).map(|i| params.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64)).collect();
    generate_seeded(model, tok, requests, contrast, params, pass, &seeds)
}

/// Like [`generate_contrast`] with one sampling seed per request (`params.seed` is ignored). A row's sampling then
/// does not depend on its position in the batch, so a resumed or re-batched run draws the same tokens.
pub fn generate_seeded(
    model: &Model,
    tok: &Tokenizer,
    requests: &[Request],
    contrast: Option<(&[Request], Combine)>,
    params: &SamplingParams,
    pass: Pass,
    seeds: &[u64],
) -> Result<Vec<Completion>> {
    params.validate()?;
    let n = requests.len();
    if seeds.len() != n {
        bail!("{} seeds for {n} requests", seeds.len());
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut rows: Vec<&Request> = requests.iter().collect();
    if let Some((c, _)) = contrast {
        if c.len() != n {
            bail!("{} contrast rows for {n} requests", c.len());
        }
        rows.extend(c.iter());
    }
    let b = rows.len();
    let longest = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    if longest == 0 {
        bail!("empty prompt");
    }
    fits_context(longest, params.max_new_tokens, model.llm.cfg.max_position_embeddings)?;
    // Left padding keeps every row's last prompt token in the last column.
    let (ids, mask, _) = crate::score::left_pad(&rows.iter().map(|r| &r.ids[..]).collect::<Vec<_>>(), tok.pad);
    let images: Vec<Tensor> = rows.iter().filter_map(|r| r.image.clone()).collect();
    let images = if images.is_empty() { None } else { Some(Tensor::stack(&images, 0)?) };
    let dev = model.rt.device.clone();
    let mut cache = Cache::new(&model.llm.cfg, longest + params.max_new_tokens);
    let ids_t = Tensor::from_vec(ids, (b, longest), &dev)?;
    let mut mask_t = Tensor::from_slice(&mask, (b, longest), &dev)?;
    let one_more = Tensor::ones((b, 1), DType::U32, &dev)?;
    let picker = Picker::new(model, params, contrast.is_some())?;
    let logits =
        model.forward_last(&Inputs { ids: &ids_t, mask: &mask_t, images: images.as_ref() }, Some(&mut cache), pass)?;
    let mut last = picker.prepare(&logits)?;

    let mut rngs: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let mut out: Vec<Completion> =
        (0..n).map(|_| Completion { ids: Vec::new(), text: String::new(), stopped: false }).collect();
    let mut done = vec![false; n];
    for step in 0..params.max_new_tokens {
        let mut next = vec![tok.pad; b];
        for i in 0..n {
            if done[i] {
                continue;
            }
            let id = next_token(&mut last, i, n, contrast.map(|(_, c)| c), model.image_token(), params, &mut rngs[i]);
            next[i] = id;
            if contrast.is_some() {
                next[n + i] = id;
            }
            done[i] = out[i].push(id, tok, &params.stop)?;
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        mask_t = Tensor::cat(&[&mask_t, &one_more], 1)?;
        let step_ids = Tensor::from_vec(next, (b, 1), &dev)?;
        let logits =
            model.forward_last(&Inputs { ids: &step_ids, mask: &mask_t, images: None }, Some(&mut cache), pass)?;
        last = picker.prepare(&logits)?;
    }
    for c in &mut out {
        if !c.stopped || params.stop.is_empty() {
            c.text = tok.decode(&c.ids)?;
        }
    }
    Ok(out)
}

/// Row `i`'s next token: the one chosen on the device, or one sampled from its logits (combined with those of its
/// contrast row `n + i`). The image placeholder is never a valid output: fed back, it would ask for an image that
/// is not there.
fn next_token(
    last: &mut Next,
    i: usize,
    n: usize,
    combine: Option<Combine>,
    image_token: Option<u32>,
    params: &SamplingParams,
    rng: &mut StdRng,
) -> u32 {
    match last {
        Next::Chosen(ids) => ids[i],
        Next::Logits(rows) => {
            let mut row = match combine {
                Some(combine) => combine(&rows[i], &rows[n + i]),
                None => std::mem::take(&mut rows[i]),
            };
            if let Some(slot) = image_token.and_then(|t| row.get_mut(t as usize)) {
                *slot = f32::NEG_INFINITY;
            }
            sample(&row, params, rng)
        }
    }
}

impl Completion {
    /// Takes the next token `id`: EOS ends the completion; any other token is kept, and the text is cut at the
    /// first stop string that appears. Whether the completion has ended.
    fn push(&mut self, id: u32, tok: &Tokenizer, stop: &[String]) -> Result<bool> {
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

/// What a decoding step brings back from the device.
enum Next {
    /// Greedy: the chosen token id of each row, picked on the device.
    Chosen(Vec<u32>),
    /// Sampling or contrastive decoding: each row's last logits as f32, for [`sample`] on the host (so every device
    /// draws the same tokens from the same seeds).
    Logits(Vec<Vec<f32>>),
}

/// Turns a step's logits (b, 1, vocab) into a [`Next`].
enum Picker {
    /// Greedy without contrast rows: argmax on the device, with the image placeholder masked by `image_mask`
    /// ((1, vocab), 0 or -inf) when the model has one.
    Device { image_mask: Option<Tensor> },
    /// Everything else: logits to the host.
    Host,
}

impl Picker {
    fn new(model: &Model, params: &SamplingParams, contrast: bool) -> Result<Self> {
        if params.temperature > 0.0 || contrast {
            return Ok(Picker::Host);
        }
        let vocab = model.llm.cfg.vocab_size;
        let image_mask = match model.image_token().map(|t| t as usize).filter(|&t| t < vocab) {
            Some(t) => {
                let mut m = vec![0f32; vocab];
                m[t] = f32::NEG_INFINITY;
                Some(Tensor::from_vec(m, (1, vocab), &model.rt.device)?)
            }
            None => None,
        };
        Ok(Picker::Device { image_mask })
    }

    fn prepare(&self, logits: &Tensor) -> Result<Next> {
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
        Ok(match self {
            Picker::Device { image_mask: Some(m) } => {
                Next::Chosen(last.broadcast_add(m)?.argmax(candle_core::D::Minus1)?.to_vec1()?)
            }
            Picker::Device { image_mask: None } => Next::Chosen(last.argmax(candle_core::D::Minus1)?.to_vec1()?),
            Picker::Host => Next::Logits(last.to_vec2()?),
        })
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
