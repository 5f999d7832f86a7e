//! Sequence log-probabilities: the summed log-probability of response tokens given image and prompt.
//! This is `bpo score`, and exactly what DPO needs for its policy and reference terms.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// Label value of positions that carry no target (prompt, image, padding), as in transformers.
pub const IGNORE: i64 = -100;

/// `log_softmax(logits)[target]` along the last axis: `logits` (..., vocab) f32, `targets` (..., 1) u32, result
/// (..., 1). Differentiable in `logits`.
fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    Ok((logits.gather(targets, D::Minus1)? - lse)?)
}

/// Per-row sum of `log_softmax(logits[t-1])[labels[t]]` over positions whose label is not [`IGNORE`], and the
/// number of such positions. `logits`: (b, t, vocab); `labels`: (b, t) i64. Differentiable in `logits`.
pub fn sequence_logprobs(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    // Shift: position t-1 predicts token t.
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.contiguous()?;
    let labels = labels.narrow(1, 1, t - 1)?;
    let valid = labels.ge(0i64)?.to_dtype(DType::F32)?; // (b, t-1)
    let targets = labels.clamp(0i64, i64::MAX)?.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?.contiguous()?;
    let lp = target_logprobs(&logits, &targets)?.squeeze(D::Minus1)?; // (b, t-1)
    let sums = (lp * &valid)?.sum(1)?;
    let counts = valid.sum(1)?;
    debug_assert_eq!(sums.dims1()?, b);
    Ok((sums, counts))
}

/// [`sequence_logprobs`] from final hidden states (b, t, hidden) and the labels (b, t) on the host, row-major: only
/// the positions that predict a label go through `lm_head`, so a response of a few tokens after a long prompt costs
/// a few rows of the vocabulary projection instead of all `t`. Same shift, masking and results; differentiable in
/// `hidden` and the adapters.
pub fn response_logprobs(
    llm: &crate::model::Llama,
    hidden: &Tensor,
    labels: &[i64],
    pass: crate::model::Pass,
) -> Result<(Tensor, Tensor)> {
    let (b, t, h) = hidden.dims3()?;
    if labels.len() != b * t {
        crate::bail!("{} labels for hidden states of {b} x {t} positions", labels.len());
    }
    let (mut at, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (r, row) in labels.chunks(t).enumerate() {
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
    let lp = target_logprobs(&logits, &Tensor::from_vec(targets, (n, 1), device)?)?; // (n, 1)

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

/// A right-padded batch of token rows: ids and mask (b, t) u32, labels (b, t) i64 ([`IGNORE`] off target), on the
/// device, and the ids and labels also on the host (row-major), where they were made.
pub struct Rows {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
    pub host_ids: Vec<u32>,
    pub host_labels: Vec<i64>,
    /// Non-padding positions.
    pub tokens: usize,
}

impl Rows {
    /// Per row, the label positions that an earlier position predicts (every target but a row's first
    /// position): the counts [`response_logprobs`] returns.
    pub fn targets_per_row(&self) -> Vec<usize> {
        let width = self.ids.dim(1).unwrap_or(1).max(1);
        self.host_labels.chunks(width).map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE).count()).collect()
    }

    /// [`Rows::targets_per_row`] summed.
    pub fn targets(&self) -> usize {
        self.targets_per_row().iter().sum()
    }
}

/// Pads `rows` (each: ids and target flags) on the right to the longest; labels are the target ids.
pub fn collate(rows: &[(&[u32], &[bool])], pad: u32, device: &candle_core::Device) -> Result<Rows> {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut mask, mut labels) =
        (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for (row, target) in rows {
        let n = row.len();
        ids.extend(row.iter().copied().chain(std::iter::repeat_n(pad, t - n)));
        mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, t - n)));
        labels.extend(
            row.iter()
                .zip(target.iter())
                .map(|(&id, &y)| if y { id as i64 } else { IGNORE })
                .chain(std::iter::repeat_n(IGNORE, t - n)),
        );
    }
    let tokens = rows.iter().map(|r| r.0.len()).sum();
    Ok(Rows {
        ids: Tensor::from_slice(&ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        labels: Tensor::from_slice(&labels, (b, t), device)?,
        host_ids: ids,
        host_labels: labels,
        tokens,
    })
}

/// Left padding to the longest row: ids, mask (1 on real tokens) and the padded length, row-major. Generation and
/// DPO prompts use it, so that every row's last token is in the last column.
pub fn left_pad(rows: &[&[u32]], pad: u32) -> (Vec<u32>, Vec<u32>, usize) {
    let p = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * p), Vec::with_capacity(rows.len() * p));
    for r in rows {
        ids.extend(std::iter::repeat_n(pad, p - r.len()).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, p - r.len()).chain(std::iter::repeat_n(1, r.len())));
    }
    (ids, mask, p)
}

/// A right-padded batch of (prompt, response) rows ([`collate`]: labels on the response), and the images of the rows
/// that have one, stacked in row order.
pub struct Batch {
    pub rows: Rows,
    pub images: Option<Tensor>,
}

impl Batch {
    pub fn new(examples: &[Example], pad: u32, device: &candle_core::Device) -> Result<Self> {
        let seqs: Vec<(Vec<u32>, Vec<bool>)> = examples
            .iter()
            .map(|e| {
                (
                    e.prompt.iter().chain(&e.response).copied().collect(),
                    std::iter::repeat_n(false, e.prompt.len())
                        .chain(std::iter::repeat_n(true, e.response.len()))
                        .collect(),
                )
            })
            .collect();
        let refs: Vec<(&[u32], &[bool])> = seqs.iter().map(|(ids, t)| (&ids[..], &t[..])).collect();
        let images: Vec<Tensor> = examples.iter().filter_map(|e| e.image.clone()).collect();
        Ok(Batch {
            rows: collate(&refs, pad, device)?,
            images: if images.is_empty() { None } else { Some(Tensor::stack(&images, 0)?) },
        })
    }
}

/// Summed response log-probabilities and token counts for `examples`, `batch_size` rows per forward pass; reports
/// the stage `scoring` (one unit an example).
pub fn score(
    model: &crate::model::Model,
    pad: u32,
    examples: &[Example],
    batch_size: usize,
    pass: crate::model::Pass,
    events: &dyn crate::progress::Events,
) -> Result<Vec<(f32, usize)>> {
    let mut out = Vec::with_capacity(examples.len());
    events.stage("scoring", Some(examples.len() as u64));
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad, &model.rt.device)?;
        let inputs =
            crate::model::Inputs { ids: &batch.rows.ids, mask: &batch.rows.mask, images: batch.images.as_ref() };
        // Vocabulary logits only where a response token is predicted (not a (b, t, vocab) f32 tensor).
        let hidden = model.hidden(&inputs, pass)?;
        let (sums, _) = response_logprobs(&model.llm, &hidden, &batch.rows.host_labels, pass)?;
        let sums: Vec<f32> = crate::model::runtime::read_back(&sums)?;
        out.extend(sums.into_iter().zip(batch.rows.targets_per_row()));
        events.advance(chunk.len() as u64);
    }
    events.end_stage();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn collate_pads_right_and_labels_targets() {
        let rows = collate(&[(&[5, 6, 7], &[false, true, true]), (&[8], &[true])], 0, &Device::Cpu).unwrap();
        assert_eq!(rows.ids.to_vec2::<u32>().unwrap(), [[5, 6, 7], [8, 0, 0]]);
        assert_eq!(rows.mask.to_vec2::<u32>().unwrap(), [[1, 1, 1], [1, 0, 0]]);
        assert_eq!(rows.labels.to_vec2::<i64>().unwrap(), [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]);
        assert_eq!(rows.tokens, 4);
    }

    #[test]
    fn left_pad_puts_every_last_token_in_the_last_column() {
        let (ids, mask, p) = left_pad(&[&[5, 6, 7], &[8]], 0);
        assert_eq!((ids, mask, p), (vec![5, 6, 7, 0, 0, 8], vec![1, 1, 1, 0, 0, 1], 3));
    }
}
