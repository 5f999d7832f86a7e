//! LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): CLIP features of one layer,
//! a 2-layer GELU MLP projector, and a Llama decoder whose `<image>` positions carry the projected features.
//! A model without a vision tower is a plain Llama; both share every code path below.

use candle_core::{DType, Tensor};

use super::checkpoint::Tape;
use super::clip::{self, ClipVision};
use super::config::{FeatureStrategy, LlavaConfig};
use super::linear::{Linear, Pass};
use super::llama::{causal_mask, mask_min, Cache, Llama, Segment};
use super::runtime::{Kernels, Runtime};
use crate::{bail, Result};

/// `multi_modal_projector`: linear_1, GELU, linear_2.
pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub act: super::ops::Activation,
}

impl Projector {
    pub fn forward(&self, x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let h = self.linear_1.forward(x, pass)?;
        self.linear_2.forward(&self.act.apply(&h)?, pass)
    }
}

/// The vision side of LLaVA.
pub struct VisionTower {
    pub clip: ClipVision,
    pub projector: Projector,
    pub cfg: LlavaConfig,
}

/// A loaded model: LLaVA (vision + Llama) or a text-only Llama.
pub struct Model {
    pub llm: Llama,
    pub vision: Option<VisionTower>,
    /// Where it runs, in which precision, by which ops path.
    pub rt: Runtime,
}

/// One batch of token rows. `ids` and `mask` are (b, t) u32; `images` (n, 3, H, W) belongs, in order, to the
/// `<image>` runs found in `ids` row by row.
pub struct Inputs<'a> {
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
    pub images: Option<&'a Tensor>,
}

impl Model {
    /// The token id whose positions carry image features, if the model has a vision tower.
    pub fn image_token(&self) -> Option<u32> {
        self.vision.as_ref().map(|v| v.cfg.image_token_index)
    }

    /// Positions one image occupies in the token sequence.
    pub fn image_tokens(&self) -> usize {
        self.vision.as_ref().map_or(0, |v| v.cfg.image_tokens())
    }

    /// Frozen-tower features of the selected CLIP layer, class token dropped per the strategy: (n, tokens, clip hidden).
    /// Cacheable: nothing in it trains in BPO.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.encode_images_checkpointed(pixels, None)
    }

    /// [`Model::encode_images`]; with `tape`, the tower's layers are checkpointed (when it trains).
    pub fn encode_images_checkpointed<'a>(&'a self, pixels: &Tensor, tape: Option<&mut Tape<'a>>) -> Result<Tensor> {
        let Some(v) = &self.vision else { bail!("this model has no vision tower, but an image was given") };
        let h = v.clip.forward_checkpointed(&pixels.to_device(&self.rt.device)?, tape)?;
        Ok(match v.cfg.feature_strategy {
            FeatureStrategy::Default => clip::drop_class(&h)?,
            FeatureStrategy::Full => h,
        })
    }

    /// Projector output for CLIP features: (n, tokens, text hidden).
    pub fn project(&self, features: &Tensor, pass: Pass) -> Result<Tensor> {
        let Some(v) = &self.vision else { bail!("this model has no vision tower, but an image was given") };
        Ok(v.projector.forward(features, pass)?)
    }

    /// Input embeddings with the image positions replaced by `image_embeds` (n, tokens, hidden), in order. Finding
    /// the image positions needs the ids on the host: `host_ids` (`ids` flattened) where the caller has them, else
    /// they are read back.
    pub fn embed(&self, ids: &Tensor, host_ids: Option<&[u32]>, image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (Some(image_token), Some(images)) = (self.image_token(), image_embeds) else {
            // No images: every id is text (a sampled `<image>` id included); ids outside the table read row 0. This
            // runs for every decoded token: on the device off the CPU.
            let ids = ids.to_dtype(DType::U32)?;
            let vocab = self.llm.cfg.vocab_size as u32;
            if self.rt.kernels == Kernels::Fused && ids.flatten_all()?.to_vec1::<u32>()?.iter().all(|&id| id < vocab) {
                return Ok(self.llm.embed(&ids)?);
            }
            return Ok(self.llm.embed(&ids.lt(vocab)?.where_cond(&ids, &ids.zeros_like()?)?)?);
        };
        let read;
        let flat: &[u32] = match host_ids {
            Some(h) if h.len() == b * t => h,
            Some(h) => bail!("{} host ids for a batch of {b} x {t}", h.len()),
            None => {
                read = super::runtime::read_back::<u32>(&ids.to_dtype(DType::U32)?)?;
                &read
            }
        };
        let n_slots = flat.iter().filter(|&&id| id == image_token).count();
        let n_feat = images.dims3().map(|(n, k, _)| n * k)?;
        if n_slots != n_feat {
            let per = self.image_tokens().max(1);
            bail!(
                "the prompt has {n_slots} image positions ({} images of {per}) but {} images were given",
                n_slots / per,
                n_feat / per
            );
        }
        // The image token may lie outside the embedding table (original LLaVA); look up id 0 there instead.
        let text_ids: Vec<u32> = flat.iter().map(|&id| if id == image_token { 0 } else { id }).collect();
        let text = self.llm.embed(&Tensor::from_vec(text_ids, (b, t), &self.rt.device)?)?;
        // One gather over [text rows; image rows] keeps the merge differentiable for both sources.
        let hidden = self.llm.cfg.hidden_size;
        let table = Tensor::cat(
            &[text.reshape((b * t, hidden))?, images.reshape((n_feat, hidden))?.to_dtype(text.dtype())?],
            0,
        )?;
        let mut next_image = 0u32;
        let index: Vec<u32> = flat
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if id == image_token {
                    next_image += 1;
                    (b * t) as u32 + next_image - 1
                } else {
                    i as u32
                }
            })
            .collect();
        Ok(table.index_select(&Tensor::from_vec(index, b * t, &self.rt.device)?, 0)?.reshape((b, t, hidden))?)
    }

    /// Final hidden states (b, t, hidden) for a batch, with positions and the causal/padding mask derived from
    /// `inputs.mask`. With a `cache`, `inputs` are the new tokens only and `inputs.mask` covers cached + new keys.
    pub fn forward_hidden(
        &self,
        inputs: &Inputs,
        image_embeds: Option<&Tensor>,
        cache: Option<&mut Cache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (embeds, positions, mask) = self.prepare(inputs, None, image_embeds, past)?;
        Ok(self.llm.forward(&embeds, &positions, &mask, cache, pass)?)
    }

    /// [`Model::forward_hidden`] for training: no cache, the ids also on the host (`host_ids`, `inputs.ids`
    /// flattened), and with `tape` every decoder layer is checkpointed (see [`super::checkpoint`]).
    pub fn train_hidden<'a>(
        &'a self,
        inputs: &Inputs,
        host_ids: &[u32],
        image_embeds: Option<&Tensor>,
        pass: Pass,
        tape: Option<&mut Tape<'a>>,
    ) -> Result<Tensor> {
        let (embeds, positions, mask) = self.prepare(inputs, Some(host_ids), image_embeds, 0)?;
        let seg = Segment { embeds, positions, mask, after: None };
        Ok(self.llm.forward_segments(&[seg], pass, tape)?.remove(0))
    }

    /// Hidden states of a batch of prompts (left-padded so that they all end in the last column) and of text
    /// answers that continue them, the answers attending to their prompt's keys and values: a chosen and a rejected
    /// answer follow one prompt computed once, and their gradients add up in it. `answer_ids` (2B, t); `rows` (u32,
    /// 2B): the prompt row of each answer; `answer_mask` (2B, P + t): the prompt row's key mask, then the answer's.
    /// `prompt_ids` holds the prompts' ids on the host, row by row. Returns (prompt hidden (B, P, hidden), answer
    /// hidden (2B, t, hidden)). With `tape`, layers are checkpointed.
    pub fn pair_hidden<'a>(
        &'a self,
        (prompts, prompt_ids): (&Inputs, &[u32]),
        image_embeds: Option<&Tensor>,
        (answer_ids, answer_mask, rows): (&Tensor, &Tensor, &Tensor),
        pass: Pass,
        tape: Option<&mut Tape<'a>>,
    ) -> Result<(Tensor, Tensor)> {
        let (embeds, positions, mask) = self.prepare(prompts, Some(prompt_ids), image_embeds, 0)?;
        let prompt = Segment { embeds, positions, mask, after: None };
        let t = answer_ids.dim(1)?;
        let past = answer_mask
            .dim(1)?
            .checked_sub(t)
            .ok_or_else(|| crate::Error::invalid("continuation mask shorter than the continuation"))?;
        let answers = Inputs { ids: answer_ids, mask: answer_mask, images: None };
        let (embeds, positions, mask) = self.prepare(&answers, None, None, past)?;
        let answer = Segment { embeds, positions, mask, after: Some((0, rows.clone())) };
        let mut out = self.llm.forward_segments(&[prompt, answer], pass, tape)?;
        let answer = out.pop().ok_or_else(|| crate::Error::invalid("no answer hidden states"))?;
        Ok((out.remove(0), answer))
    }

    /// Input embeddings, positions and the additive attention mask for `inputs` after `past` earlier positions.
    fn prepare(
        &self,
        inputs: &Inputs,
        host_ids: Option<&[u32]>,
        image_embeds: Option<&Tensor>,
        past: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = inputs.ids.dims2()?;
        let total = inputs.mask.dim(1)?;
        if total != past + t {
            bail!("attention mask covers {total} positions, expected {} cached + {t} new", past);
        }
        if total > self.llm.cfg.max_position_embeddings {
            bail!(
                "sequence of {total} tokens is longer than the model's context ({})",
                self.llm.cfg.max_position_embeddings
            );
        }
        let key_mask = inputs.mask.to_device(&self.rt.device)?;
        // On the CPU's fused runtime plain loops are cheaper than the tensor ops (a decoded token of a tiny model
        // costs tens of microseconds); everywhere else the tensors are built on the device. Tested equal.
        let (positions, mask) = match self.rt.kernels {
            Kernels::Fused => host_positions_and_mask(&key_mask, t, self.rt.dtype)?,
            Kernels::Generic => (positions_from_mask(&key_mask, t)?, causal_mask(&key_mask, t, self.rt.dtype)?),
        };
        let embeds = self.embed(inputs.ids, host_ids, image_embeds)?;
        debug_assert_eq!(embeds.dims3()?.0, b);
        Ok((embeds, positions, mask))
    }

    /// Logits at every position (b, t, vocab), images encoded on the fly.
    pub fn forward(&self, inputs: &Inputs, cache: Option<&mut Cache>, pass: Pass) -> Result<Tensor> {
        let hidden = self.hidden_with_images(inputs, cache, pass)?;
        Ok(self.llm.logits(&hidden, pass)?)
    }

    /// Logits of the last position only (b, 1, vocab): what generation needs. Skipping the vocabulary projection of
    /// the other prompt positions saves a large share of the prefill.
    pub fn forward_last(&self, inputs: &Inputs, cache: Option<&mut Cache>, pass: Pass) -> Result<Tensor> {
        let hidden = self.hidden_with_images(inputs, cache, pass)?;
        let t = hidden.dim(1)?;
        Ok(self.llm.logits(&hidden.narrow(1, t - 1, 1)?, pass)?)
    }

    /// Final hidden states (b, t, hidden) of a batch without a cache, images encoded on the fly: what scoring
    /// projects to the vocabulary at the positions it needs.
    pub fn hidden(&self, inputs: &Inputs, pass: Pass) -> Result<Tensor> {
        self.hidden_with_images(inputs, None, pass)
    }

    fn hidden_with_images(&self, inputs: &Inputs, cache: Option<&mut Cache>, pass: Pass) -> Result<Tensor> {
        let embeds = match inputs.images {
            Some(px) => Some(self.project(&self.encode_images(px)?, pass)?),
            None => None,
        };
        // A fresh prompt with image positions needs images (later decode steps may sample the id as text).
        if let (None, Some(id), true) = (inputs.images, self.image_token(), cache.as_ref().is_none_or(|c| c.is_empty()))
        {
            if inputs.ids.flatten_all()?.to_vec1::<u32>()?.contains(&id) {
                bail!("the prompt has image positions but no image was given");
            }
        }
        self.forward_hidden(inputs, embeds.as_ref(), cache, pass)
    }

    /// Input embeddings (t, hidden) of one prompt, `image` (3, H, W)'s features at its image positions: what the
    /// generation engine prefills. The image is encoded on its own, so its features never depend on other prompts.
    pub fn prompt_embeds(&self, ids: &[u32], image: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let features = match image {
            Some(px) => Some(self.project(&self.encode_images(&px.unsqueeze(0)?)?, pass)?),
            None if self.image_token().is_some_and(|id| ids.contains(&id)) => {
                bail!("the prompt has image positions but no image was given")
            }
            None => None,
        };
        let host = ids;
        let ids = Tensor::from_slice(ids, (1, ids.len()), &self.rt.device)?;
        Ok(self.embed(&ids, Some(host), features.as_ref())?.squeeze(0)?)
    }
}

/// [`positions_from_mask`] and [`causal_mask`] computed on the host, for the CPU's fused runtime.
fn host_positions_and_mask(key_mask: &Tensor, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (b, total) = key_mask.dims2()?;
    let past = total - t;
    let keys: Vec<u32> = key_mask.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let mut pos = Vec::with_capacity(b * t);
    let mut mask = vec![0f32; b * t * total];
    let neg = mask_min(dtype);
    for (r, row) in keys.chunks(total).enumerate() {
        let mut seen = 0i64;
        for (j, &k) in row.iter().enumerate() {
            seen += i64::from(k != 0);
            if j >= past {
                pos.push((seen - 1).max(0) as u32);
            }
        }
        for i in 0..t {
            for (j, &k) in row.iter().enumerate() {
                if j > past + i || k == 0 {
                    mask[(r * t + i) * total + j] = neg;
                }
            }
        }
    }
    let device = key_mask.device();
    Ok((Tensor::from_vec(pos, (b, t), device)?, Tensor::from_vec(mask, (b, 1, t, total), device)?.to_dtype(dtype)?))
}

/// Position ids as `generate()` computes them: `cumsum(mask) - 1`, clamped at 0, for the last `t` columns; (b, t)
/// u32, on the mask's device. A single new column (a decoding step) needs only the row sums.
pub fn positions_from_mask(mask: &Tensor, t: usize) -> Result<Tensor> {
    let total = mask.dim(1)?;
    let m = mask.to_dtype(DType::F32)?;
    let counts = if t == 1 { m.sum_keepdim(1)? } else { m.cumsum(1)?.narrow(1, total - t, t)? };
    Ok((counts - 1.0)?.clamp(0f32, f32::MAX)?.to_dtype(DType::U32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn host_and_device_masks_and_positions_agree() {
        // Left padding (row 0), right padding (row 1), a hole (row 2); a prefill (t = total) and a decode step.
        let rows = [[0u32, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]];
        let key_mask =
            Tensor::from_iter(rows.iter().flatten().copied(), &Device::Cpu).unwrap().reshape((3, 6)).unwrap();
        for t in [6, 1, 3] {
            for dtype in [DType::F32, DType::BF16] {
                let (hp, hm) = host_positions_and_mask(&key_mask, t, dtype).unwrap();
                let (dp, dm) = (positions_from_mask(&key_mask, t).unwrap(), causal_mask(&key_mask, t, dtype).unwrap());
                assert_eq!(hp.to_vec2::<u32>().unwrap(), dp.to_vec2::<u32>().unwrap(), "positions, t = {t}");
                let (hm, dm) = (
                    hm.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    dm.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(hm, dm, "mask, t = {t}, {dtype:?}");
            }
        }
        let (p, _) = host_positions_and_mask(&key_mask, 6, DType::F32).unwrap();
        assert_eq!(p.to_vec2::<u32>().unwrap()[0], [0, 0, 0, 1, 2, 3], "left padding starts at 0, as generate() does");
    }
}
