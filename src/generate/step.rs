//! One engine step's device side: the packed batch's plan, its forward pass, and the cache's free rows.

use std::ops::Range;

use candle_core::{DType, Tensor, D};

use crate::model::cpu_decode::SeqSpan;
use crate::model::{Model, Pass, SlotCache, StepLayout};
use crate::Result;

/// One step's work (see `Engine::plan`).
#[derive(Default)]
pub(super) struct Plan {
    pub(super) spans: Vec<SeqSpan>,
    pub(super) positions: Vec<u32>,
    /// The tokens fed to the decoding sequences, which come first.
    pub(super) decode_ids: Vec<u32>,
    /// Prompt embeddings of the prefill chunks, in order after them.
    pub(super) prefill: Vec<Tensor>,
    /// (running request, positions it gains).
    pub(super) advance: Vec<(usize, usize)>,
    /// Requests that sample a token from this step: (running request, step tokens whose logits it reads: main, then
    /// contrast).
    pub(super) samplers: Vec<(usize, Vec<usize>)>,
}

impl Plan {
    pub(super) fn tokens(&self) -> usize {
        self.positions.len()
    }
}

/// What `Engine::forward` brings back.
pub(super) enum Picked {
    /// The logits of every sampling row, one after the other, and their width (the vocabulary).
    Logits(Vec<f32>, usize),
    /// Per sampling request, the greedy choice made on the device.
    Ids(Vec<u32>),
}

/// The device side of `Engine::forward`: the samplers' logits (f32), or with `pick` (`Some(image mask)`) their
/// argmax after adding the mask, if any; `None` when no request samples in this step.
pub(super) fn forward(
    model: &Model,
    cache: &mut SlotCache,
    plan: &Plan,
    pass: Pass,
    pick: Option<Option<&Tensor>>,
) -> Result<Option<Tensor>> {
    let dev = &model.rt.device;
    let mut pieces = Vec::with_capacity(plan.prefill.len() + 1);
    if !plan.decode_ids.is_empty() {
        let ids = Tensor::from_slice(&plan.decode_ids, (1, plan.decode_ids.len()), dev)?;
        pieces.push(model.llm.embed(&ids)?.squeeze(0)?);
    }
    pieces.extend(plan.prefill.iter().cloned());
    let n = plan.tokens();
    let embeds = Tensor::cat(&pieces, 0)?.unsqueeze(0)?;
    let positions = Tensor::from_slice(&plan.positions, (1, n), dev)?;
    let layout = StepLayout::new(plan.spans.clone(), model.rt.kernels, model.rt.dtype, dev)?;
    let hidden = model.llm.forward_slots(&embeds, &positions, cache, &layout, pass)?;
    let rows: Vec<u32> = plan.samplers.iter().flat_map(|(_, t)| t.iter().map(|&t| t as u32)).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let count = rows.len();
    let last = hidden.squeeze(0)?.index_select(&Tensor::from_vec(rows, count, dev)?, 0)?;
    let logits = model.llm.logits(&last, pass)?.to_dtype(DType::F32)?;
    if let Some(mask) = pick {
        let logits = match mask {
            Some(mask) => logits.broadcast_add(mask)?,
            None => logits,
        };
        return Ok(Some(logits.argmax(D::Minus1)?));
    }
    Ok(Some(logits))
}

/// Free cache rows: ranges sorted by start, merged when adjacent; first fit.
pub(super) struct FreeRows {
    free: Vec<Range<usize>>,
}

impl FreeRows {
    pub(super) fn new(rows: usize) -> Self {
        FreeRows { free: std::iter::once(0..rows).collect() }
    }

    /// The start of `len` free rows, now taken.
    pub(super) fn take(&mut self, len: usize) -> Option<usize> {
        let i = self.free.iter().position(|r| r.len() >= len)?;
        let start = self.free[i].start;
        self.free[i].start += len;
        if self.free[i].is_empty() {
            self.free.remove(i);
        }
        Some(start)
    }

    /// Returns `len` rows from `start`.
    pub(super) fn give(&mut self, start: usize, len: usize) {
        let i = self.free.partition_point(|r| r.start < start);
        self.free.insert(i, start..start + len);
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            self.free[i].end = self.free.remove(i + 1).end;
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            self.free[i - 1].end = self.free.remove(i).end;
        }
    }
}
