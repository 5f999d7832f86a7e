//! Sequence log-probabilities: the summed log-probability of response tokens given image and prompt.
//! This is `bpo score`, and exactly what DPO needs for its policy and reference terms.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// Label value of positions that carry no target (prompt, image, padding), as in transformers.
pub const IGNORE: i64 = -100;

/// Per-row sum of `log_softmax(logits[t-1])[labels[t]]` over positions whose label is not [`IGNORE`], and the
/// number of such positions. `logits`: (b, t, vocab); `labels`: (b, t) i64. Differentiable in `logits`.
pub fn sequence_logprobs(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    // Shift: position t-1 predicts token t.
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.contiguous()?;
    let labels = labels.narrow(1, 1, t - 1)?;
    let valid = labels.ge(0i64)?.to_dtype(DType::F32)?; // (b, t-1)
    let targets = labels.clamp(0i64, i64::MAX)?.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?.contiguous()?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let picked = logits.gather(&targets, D::Minus1)?;
    let lp = (picked - lse)?.squeeze(D::Minus1)?; // (b, t-1)
    let sums = (lp * &valid)?.sum(1)?;
    let counts = valid.sum(1)?;
    debug_assert_eq!(sums.dims1()?, b);
    Ok((sums, counts))
}

/// [`sequence_logprobs`] from final hidden states (b, t, hidden): only the positions that predict a label go
/// through `lm_head`, so a response of a few tokens after a long prompt costs a few rows of the vocabulary
/// projection instead of all `t`. Same shift, masking and results; differentiable in `hidden` and the adapters.
pub fn response_logprobs(llm: &crate::model::Llama, hidden: &Tensor, labels: &Tensor, pass: crate::model::Pass) -> Result<(Tensor, Tensor)> {
    let (b, t, h) = hidden.dims3()?;
    let rows: Vec<Vec<i64>> = labels.to_vec2()?;
    let (mut at, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (r, row) in rows.iter().enumerate() {
        for (j, &label) in row.iter().enumerate().skip(1) {
            if label != IGNORE {
                at.push((r * t + j - 1) as u32);
                targets.push(label as u32);
                owner.push(r);
            }
        }
    }
    let device = hidden.device();
    let counts: Vec<f32> = (0..b).map(|r| owner.iter().filter(|&&o| o == r).count() as f32).collect();
    let counts = Tensor::from_vec(counts, b, device)?;
    if at.is_empty() {
        return Ok((Tensor::zeros(b, DType::F32, device)?, counts));
    }
    let n = at.len();
    let picked_hidden = hidden.reshape((b * t, h))?.index_select(&Tensor::from_vec(at, n, device)?, 0)?;
    let logits = llm.logits(&picked_hidden, pass)?.to_dtype(DType::F32)?; // (n, vocab)
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let picked = logits.gather(&Tensor::from_vec(targets, (n, 1), device)?, D::Minus1)?;
    let lp = (picked - lse)?; // (n, 1)
    // Per-row sums as a (b, n) 0/1 matrix times the token log-probs: one differentiable op.
    let mut assign = vec![0f32; b * n];
    for (i, &r) in owner.iter().enumerate() {
        assign[r * n + i] = 1.0;
    }
    let sums = Tensor::from_vec(assign, (b, n), device)?.matmul(&lp)?.squeeze(1)?;
    Ok((sums, counts))
}

/// One (prompt, response) sequence, already tokenised.
#[derive(Clone)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// Preprocessed image (3, H, W) for the prompt's `<image>` positions.
    pub image: Option<candle_core::Tensor>,
}

/// A right-padded batch: ids and mask (b, t) u32, labels (b, t) i64 with [`IGNORE`] outside responses, and the
/// images of the rows that have one, stacked in row order.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
    pub images: Option<Tensor>,
}

impl Batch {
    pub fn new(examples: &[Example], pad: u32, device: &candle_core::Device) -> Result<Self> {
        let t = examples.iter().map(|e| e.prompt.len() + e.response.len()).max().unwrap_or(0);
        let b = examples.len();
        let (mut ids, mut mask, mut labels) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for e in examples {
            let n = e.prompt.len() + e.response.len();
            ids.extend(e.prompt.iter().chain(&e.response).copied().chain(std::iter::repeat_n(pad, t - n)));
            mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, t - n)));
            labels.extend(std::iter::repeat_n(IGNORE, e.prompt.len()).chain(e.response.iter().map(|&id| id as i64)).chain(std::iter::repeat_n(IGNORE, t - n)));
        }
        let images: Vec<Tensor> = examples.iter().filter_map(|e| e.image.clone()).collect();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            labels: Tensor::from_vec(labels, (b, t), device)?,
            images: if images.is_empty() { None } else { Some(Tensor::stack(&images, 0)?) },
        })
    }
}

/// Summed response log-probabilities and token counts for `examples`, `batch_size` rows per forward pass.
pub fn score(model: &crate::model::Model, pad: u32, examples: &[Example], batch_size: usize, pass: crate::model::Pass, mut progress: impl FnMut(usize)) -> Result<Vec<(f32, usize)>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad, &model.rt.device)?;
        let inputs = crate::model::Inputs { ids: &batch.ids, mask: &batch.mask, images: batch.images.as_ref() };
        let logits = model.forward(&inputs, None, pass)?;
        let (sums, counts) = sequence_logprobs(&logits, &batch.labels)?;
        let sums: Vec<f32> = sums.to_vec1()?;
        let counts: Vec<f32> = counts.to_vec1()?;
        out.extend(sums.into_iter().zip(counts.into_iter().map(|c| c as usize)));
        progress(chunk.len());
    }
    Ok(out)
}
