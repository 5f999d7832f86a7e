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
