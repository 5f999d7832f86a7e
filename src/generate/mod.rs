//! Text generation: batched prefill, then KV-cache decoding one token per step (the cache is preallocated and
//! appended in place), with greedy, temperature, top-k and top-p sampling, EOS and stop strings.
//!
//! Rows of different lengths are left-padded. A second, "contrast" set of rows can run in the same batch (same
//! tokens, another image): their logits are combined per row before sampling, which is how the contrastive decoding
//! modes of image weakening are built (see `bootstrap`).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod vlm;
pub mod vqa;

use crate::model::{Cache, Inputs, Model, Pass};
use crate::text::Tokenizer;
use crate::{bail, Result};

pub use vlm::Vlm;

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

/// Combines the logits of a row and of its contrast row into the logits to sample from.
pub type Combine<'a> = &'a dyn Fn(&[f32], &[f32]) -> Vec<f32>;

/// Generates a completion for each request, in one batch.
pub fn generate(model: &Model, tok: &Tokenizer, requests: &[Request], params: &SamplingParams, pass: Pass) -> Result<Vec<Completion>> {
    generate_contrast(model, tok, requests, None, params, pass)
}

/// Like [`generate`], with optional contrast rows (`contrast[i]` pairs with `requests[i]`, same ids) whose logits are
/// merged with `combine(request_logits, contrast_logits)`.
pub fn generate_contrast(model: &Model, tok: &Tokenizer, requests: &[Request], contrast: Option<(&[Request], Combine)>, params: &SamplingParams, pass: Pass) -> Result<Vec<Completion>> {
    let seeds: Vec<u64> = (0..requests.len()).map(|i| params.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64)).collect();
    generate_seeded(model, tok, requests, contrast, params, pass, &seeds)
}

/// Like [`generate_contrast`] with one sampling seed per request (`params.seed` is ignored). A row's sampling then
/// does not depend on its position in the batch, so a resumed or re-batched run draws the same tokens.
pub fn generate_seeded(model: &Model, tok: &Tokenizer, requests: &[Request], contrast: Option<(&[Request], Combine)>, params: &SamplingParams, pass: Pass, seeds: &[u64]) -> Result<Vec<Completion>> {
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
    let context = model.llm.cfg.max_position_embeddings;
    if longest + params.max_new_tokens > context {
        bail!("prompt of {longest} tokens + {} new tokens exceeds the model's context of {context}", params.max_new_tokens);
    }
    // Left padding keeps every row's last prompt token in the last column.
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask = Vec::with_capacity(b * longest);
    for r in &rows {
        let pad = longest - r.ids.len();
        ids.extend(std::iter::repeat_n(tok.pad, pad).chain(r.ids.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, r.ids.len())));
    }
    let images: Vec<Tensor> = rows.iter().filter_map(|r| r.image.clone()).collect();
    let images = if images.is_empty() { None } else { Some(Tensor::stack(&images, 0)?) };
    let dev = model.device.clone();
    let mut cache = Cache::new(&model.llm.cfg, longest + params.max_new_tokens);
    let ids_t = Tensor::from_vec(ids, (b, longest), &dev)?;
    let mask_t = Tensor::from_slice(&mask, (b, longest), &dev)?;
    let mut last = prefill(model, &Inputs { ids: &ids_t, mask: &mask_t, images: images.as_ref() }, &mut cache, pass)?;

    let mut rngs: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let mut out: Vec<Completion> = (0..n).map(|_| Completion { ids: Vec::new(), text: String::new(), stopped: false }).collect();
    let mut done = vec![false; n];
    for step in 0..params.max_new_tokens {
        let mut next = vec![tok.pad; b];
        for i in 0..n {
            if done[i] {
                continue;
            }
            let mut row = match contrast {
                Some((_, combine)) => combine(&last[i], &last[n + i]),
                None => std::mem::take(&mut last[i]),
            };
            // The image placeholder is never a valid output: fed back, it would ask for an image that is not there.
            if let Some(slot) = model.image_token().and_then(|t| row.get_mut(t as usize)) {
                *slot = f32::NEG_INFINITY;
            }
            let id = sample(&row, params, &mut rngs[i]);
            next[i] = id;
            if contrast.is_some() {
                next[n + i] = id;
            }
            let c = &mut out[i];
            if tok.eos.contains(&id) {
                c.stopped = true;
                done[i] = true;
                continue;
            }
            c.ids.push(id);
            if !params.stop.is_empty() {
                c.text = tok.decode(&c.ids)?;
                if let Some(at) = params.stop.iter().filter_map(|s| c.text.find(s.as_str())).min() {
                    c.text.truncate(at);
                    c.stopped = true;
                    done[i] = true;
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        let mask_t = extended_mask(&mask, b, step + 1, &dev)?;
        let step_ids = Tensor::from_vec(next, (b, 1), &dev)?;
        let logits = model.forward(&Inputs { ids: &step_ids, mask: &mask_t, images: None }, Some(&mut cache), pass)?;
        last = last_logits(&logits)?;
    }
    for c in &mut out {
        if !c.stopped || params.stop.is_empty() {
            c.text = tok.decode(&c.ids)?;
        }
    }
    Ok(out)
}

/// Runs the prompt through the model into `cache` and returns the last position's logits per row. Only that
/// position goes through `lm_head`: projecting every prompt position onto the vocabulary would cost as much as
/// several layers (a 32k vocabulary against a 512-wide model), for logits nobody reads.
fn prefill(model: &Model, inputs: &Inputs, cache: &mut Cache, pass: Pass) -> Result<Vec<Vec<f32>>> {
    let embeds = match inputs.images {
        Some(px) => Some(model.project(&model.encode_images(px)?, pass)?),
        None => None,
    };
    let hidden = model.forward_hidden(inputs, embeds.as_ref(), Some(cache), pass)?;
    let t = hidden.dim(1)?;
    last_logits(&model.llm.logits(&hidden.narrow(1, t - 1, 1)?, pass)?)
}

/// The attention mask (b, prompt_len + extra): each row's prompt mask followed by `extra` ones (decoded tokens).
fn extended_mask(prompt_mask: &[u32], b: usize, extra: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let p = prompt_mask.len() / b;
    let mut m = Vec::with_capacity(b * (p + extra));
    for row in prompt_mask.chunks(p) {
        m.extend_from_slice(row);
        m.extend(std::iter::repeat_n(1u32, extra));
    }
    Ok(Tensor::from_vec(m, (b, p + extra), dev)?)
}

/// Logits of the last position of each row, as f32 vectors.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = logits.dim(1)?;
    Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?)
}

/// Picks the next token from `logits` per `params`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / params.temperature)).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    if params.top_k > 0 {
        cand.truncate(params.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        // Keep tokens while the mass before them is below top_p (the first token always stays).
        let mut mass = 0.0;
        let keep = probs.iter().take_while(|&&p| {
            let k = mass < params.top_p;
            mass += p;
            k
        });
        let k = keep.count().max(1);
        probs.truncate(k);
    }
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return cand[i].0;
        }
        u -= p;
    }
    cand[probs.len() - 1].0
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0 as u32
}
