//! A micro-batch of preference pairs laid out for shared-prefix forward passes.
//!
//! The chosen and the rejected row of a pair start with the same prompt (BOS, image positions, question), and
//! under causal attention the prompt's hidden states do not depend on what follows. So each prompt runs through
//! the model once, and both answers continue from its keys and values ([`crate::model::Model::pair_hidden`]);
//! gradients from both answers add up in the shared prompt. With
//! LLaVA's 576 image positions per prompt this nearly halves the work of a DPO step, forward and backward.
//!
//! For mDPO, [`PairBatch::with_corrupted`] adds the image-side rows to the same forward: each prompt again with its
//! image corrupted, and the chosen answer continuing from it.

use candle_core::{Device, Tensor};

use super::data::PairExample;
use super::features::{distinct_images, FeatureCache, Noise};
use crate::model::llava::Projector;
use crate::model::Vlm;
use crate::model::{Inputs, Model, Pass};
use crate::score::{left_pad, response_logprobs, IGNORE};
use crate::{bail, Result};

pub struct PairBatch {
    /// Pairs in the batch.
    pub pairs: usize,
    /// Whether the image-side rows follow ([`PairBatch::with_corrupted`]).
    pub corrupted: bool,
    /// Prompts, left-padded so they all end in the last column: (B, P) u32 (2B with the image-side rows, the
    /// prompts again), and the same ids on the host.
    prompt_ids: Tensor,
    host_prompt_ids: Vec<u32>,
    prompt_mask: Tensor,
    /// Answers `[chosen..., rejected...]`, right-padded: (2B, A); with the image-side rows, `[chosen..., rejected...,
    /// chosen...]` (3B, A).
    answer_ids: Tensor,
    /// Per answer row: its prompt's key mask, then its own (2B or 3B, P + A).
    answer_mask: Tensor,
    /// Prompt row of each answer row: `[0..B, 0..B]`, then `B..2B` for the image-side rows.
    rows: Tensor,
    /// Targets of `[last prompt position, answer...]` (2B, 1 + A), row-major on the host: the answer ids,
    /// [`IGNORE`] elsewhere.
    labels: Vec<i64>,
    /// Distinct images' tower features, and for each prompt with an image (in order) its index there.
    features: Option<Tensor>,
    image_index: Option<Tensor>,
    /// Sequence positions of the 2B (prompt + answer) rows, as TRL counts `num_tokens` (each prompt runs once here,
    /// but is counted for both of its rows, so tokens/s compares with TRL's).
    pub tokens: usize,
}

impl PairBatch {
    /// Lays out `examples`, encoding their distinct images through `features` (the frozen tower, cached).
    pub fn new(vlm: &Vlm, examples: &[&PairExample], features: &mut FeatureCache) -> Result<Self> {
        let b = examples.len();
        let device: &Device = &vlm.model.rt.device;
        let pad = vlm.tok.pad;
        let prompts: Vec<&[u32]> = examples.iter().map(|e| &e.prompt[..]).collect();
        if prompts.iter().any(|p| p.is_empty()) {
            bail!("a pair has an empty prompt: nothing predicts its answer's first token");
        }
        let (prompt_ids, prompt_mask, p) = left_pad(&prompts, pad);
        let answers: Vec<&[u32]> =
            examples.iter().map(|e| &e.chosen[..]).chain(examples.iter().map(|e| &e.rejected[..])).collect();
        let a = answers.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let (mut answer_ids, mut answer_mask, mut labels) =
            (Vec::with_capacity(2 * b * a), Vec::with_capacity(2 * b * (p + a)), Vec::with_capacity(2 * b * (a + 1)));
        for (r, ans) in answers.iter().enumerate() {
            answer_ids.extend(ans.iter().copied().chain(std::iter::repeat_n(pad, a - ans.len())));
            answer_mask.extend_from_slice(&prompt_mask[(r % b) * p..(r % b + 1) * p]);
            answer_mask.extend(std::iter::repeat_n(1u32, ans.len()).chain(std::iter::repeat_n(0, a - ans.len())));
            labels.push(IGNORE);
            labels.extend(ans.iter().map(|&id| id as i64).chain(std::iter::repeat_n(IGNORE, a - ans.len())));
        }
        let (distinct, index) = distinct_images(examples.iter().filter_map(|e| e.image.as_deref()));
        let features = if distinct.is_empty() { None } else { Some(features.features(vlm, &distinct)?) };
        let n = index.len();
        let tokens =
            2 * prompts.iter().map(|r| r.len()).sum::<usize>() + answers.iter().map(|r| r.len()).sum::<usize>();
        let rows: Vec<u32> = (0..2 * b).map(|r| (r % b) as u32).collect();
        Ok(PairBatch {
            pairs: b,
            corrupted: false,
            prompt_ids: Tensor::from_slice(&prompt_ids, (b, p), device)?,
            host_prompt_ids: prompt_ids,
            prompt_mask: Tensor::from_vec(prompt_mask, (b, p), device)?,
            answer_ids: Tensor::from_vec(answer_ids, (2 * b, a), device)?,
            answer_mask: Tensor::from_vec(answer_mask, (2 * b, p + a), device)?,
            rows: Tensor::from_vec(rows, 2 * b, device)?,
            labels,
            features,
            image_index: if n == 0 { None } else { Some(Tensor::from_vec(index, n, device)?) },
            tokens,
        })
    }

    /// Adds mDPO's image-side rows: every prompt again, its image replaced by `noise[i]` applied to it (one per
    /// example, each with an image), and the chosen answer continuing from it.
    pub fn with_corrupted(
        mut self,
        vlm: &Vlm,
        examples: &[&PairExample],
        noise: &[Noise],
        features: &mut FeatureCache,
    ) -> Result<Self> {
        let b = self.pairs;
        let images: Vec<(&std::path::Path, Noise)> =
            examples.iter().zip(noise).filter_map(|(e, n)| e.image.as_deref().map(|p| (p, *n))).collect();
        if images.len() != b || noise.len() != b {
            bail!("the image-side pair needs an image in every pair of the batch");
        }
        let (Some(clean), Some(index)) = (self.features.clone(), self.image_index.clone()) else {
            bail!("the image-side pair needs an image in every pair of the batch");
        };
        // Examples that share an image and its noise share one encoding, as clean images do.
        let (distinct, at) = distinct_images(images);
        let offset = clean.dim(0)? as u32;
        let noised_index: Vec<u32> = at.into_iter().map(|i| offset + i).collect();
        let noised = features.noised_features(vlm, &distinct)?;
        let device = &vlm.model.rt.device;
        let noised_index = Tensor::from_vec(noised_index, b, device)?;
        let a = self.answer_ids.dim(1)?;
        let chosen_tokens: usize = examples.iter().map(|e| e.prompt.len() + e.chosen.len()).sum();
        self.features = Some(Tensor::cat(&[&clean, &noised], 0)?);
        self.image_index = Some(Tensor::cat(&[&index, &noised_index], 0)?);
        self.prompt_ids = Tensor::cat(&[&self.prompt_ids, &self.prompt_ids], 0)?;
        self.host_prompt_ids = self.host_prompt_ids.repeat(2);
        self.prompt_mask = Tensor::cat(&[&self.prompt_mask, &self.prompt_mask], 0)?;
        self.answer_ids = Tensor::cat(&[&self.answer_ids, &self.answer_ids.narrow(0, 0, b)?], 0)?;
        self.answer_mask = Tensor::cat(&[&self.answer_mask, &self.answer_mask.narrow(0, 0, b)?], 0)?;
        let rows: Vec<u32> = (0..3 * b).map(|r| if r < 2 * b { (r % b) as u32 } else { (r - b) as u32 }).collect();
        self.rows = Tensor::from_vec(rows, 3 * b, device)?;
        self.labels.extend_from_within(..b * (a + 1));
        self.tokens += chosen_tokens;
        self.corrupted = true;
        Ok(self)
    }

    /// Summed answer log-probs `[chosen..., rejected...]` (2B,), then the image-side rows' if any (3B in all), and
    /// answer lengths, with image features projected by `projector` (None: the model's own; `detach`: no gradient
    /// into it). With `tape`, the decoder layers are checkpointed.
    pub fn logps<'a>(
        &self,
        model: &'a Model,
        projector: Option<&Projector>,
        detach: bool,
        pass: Pass,
        tape: Option<&mut crate::model::checkpoint::Tape<'a>>,
    ) -> Result<(Tensor, Tensor)> {
        let embeds = match (&self.features, &self.image_index) {
            (Some(f), Some(idx)) => {
                let projected = match projector {
                    Some(p) => p.forward(f, pass)?,
                    None => model.project(f, pass)?,
                };
                let e = projected.index_select(idx, 0)?;
                Some(if detach { e.detach() } else { e })
            }
            _ => None,
        };
        let prompts = Inputs { ids: &self.prompt_ids, mask: &self.prompt_mask, images: None };
        let answers = (&self.answer_ids, &self.answer_mask, &self.rows);
        let prompts = (&prompts, &self.host_prompt_ids[..]);
        let (prompt_hidden, answer_hidden) = model.pair_hidden(prompts, embeds.as_ref(), answers, pass, tape)?;
        // The last prompt position predicts each answer's first token.
        let p = prompt_hidden.dim(1)?;
        let last = prompt_hidden.narrow(1, p - 1, 1)?.contiguous()?.index_select(&self.rows, 0)?;
        let hidden = Tensor::cat(&[last, answer_hidden], 1)?;
        response_logprobs(&model.llm, &hidden, &self.labels, pass)
    }
}
