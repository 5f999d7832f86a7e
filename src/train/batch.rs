//! A micro-batch of preference pairs laid out for shared-prefix forward passes.
//!
//! The chosen and the rejected row of a pair start with the same prompt (BOS, image positions, question), and
//! under causal attention the prompt's hidden states do not depend on what follows. So each prompt runs through
//! the model once, and both answers continue from its keys and values ([`crate::model::Model::pair_hidden`]);
//! gradients from both answers add up in the shared prompt. With
//! LLaVA's 576 image positions per prompt this nearly halves the work of a DPO step, forward and backward.

use candle_core::{Device, Tensor};

use super::data::PairExample;
use super::features::{distinct_images, FeatureCache};
use crate::model::llava::Projector;
use crate::model::Vlm;
use crate::model::{Inputs, Model, Pass};
use crate::score::{left_pad, response_logprobs, IGNORE};
use crate::{bail, Result};

pub struct PairBatch {
    /// Pairs in the batch.
    pub pairs: usize,
    /// Prompts, left-padded so they all end in the last column: (B, P) u32, and the same ids on the host.
    prompt_ids: Tensor,
    host_prompt_ids: Vec<u32>,
    prompt_mask: Tensor,
    /// Answers `[chosen..., rejected...]`, right-padded: (2B, A).
    answer_ids: Tensor,
    /// Per answer row: its prompt's key mask, then its own (2B, P + A).
    answer_mask: Tensor,
    /// Prompt row of each answer row: `[0..B, 0..B]`.
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

    /// Summed answer log-probs `[chosen..., rejected...]` (2B,) and answer lengths, with image features projected by
    /// `projector` (None: the model's own; `detach`: no gradient into it). With `tape`, the decoder layers are
    /// checkpointed.
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
