//! The optimizer's state on the host (the CPU in f32, [`crate::model::Kernels::Fused`]): per-parameter buffers
//! allocated once, each parameter rewritten in place, so a step allocates nothing.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use super::Param;
use crate::{bail, Result};

/// Moments and the gradient accumulation buffer of one parameter, on the host.
pub(super) struct HostMoments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub acc: Vec<f32>,
}

/// Reads a contiguous f32 CPU tensor's values without copying them out.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        bail!("the optimizer's CPU path needs contiguous f32 gradients on the CPU");
    };
    Ok(f(&data[start..end]))
}

/// Per-step constants of the update.
#[derive(Clone, Copy)]
pub(super) struct Update {
    pub lr: f32,
    pub decay: f32,
    pub grad_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 / (1 - beta1^t) and 1 / sqrt(1 - beta2^t).
    pub corr1: f32,
    pub corr2_sqrt: f32,
}

/// One parameter's host-state update, applied in place to its storage.
struct HostUpdate<'a> {
    state: &'a Mutex<HostMoments>,
    u: Update,
}

impl InplaceOp1 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: parameter is not a contiguous f32 tensor");
        };
        let mut st = self.state.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        let HostMoments { m, v, acc } = &mut *st;
        let u = &self.u;
        let step = u.lr * u.corr1;
        for i in 0..end - start {
            let p = &mut data[start + i];
            let g = acc[i] * u.grad_scale;
            *p *= 1.0 - u.lr * u.decay;
            m[i] = u.beta1 * m[i] + (1.0 - u.beta1) * g;
            v[i] = u.beta2 * v[i] + (1.0 - u.beta2) * g * g;
            *p -= step * m[i] / (v[i].sqrt() * u.corr2_sqrt + u.eps);
            acc[i] = 0.0;
        }
        Ok(())
    }
}

/// One step over every parameter: skipped (`false`) unless the norm and every guard are finite. `u` holds the
/// configured decay, applied to the parameters that decay; gradients are clipped to `clip` by the global `norm`.
pub(super) fn step(
    params: &[Param],
    moments: &[Mutex<HostMoments>],
    u: Update,
    norm: f64,
    clip: Option<f64>,
    guards: &[Tensor],
) -> Result<bool> {
    let mut finite = norm.is_finite();
    for g in guards {
        finite &= g.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
    }
    if !finite {
        return Ok(false);
    }
    let grad_scale = clip.map_or(1.0, |max| (max / (norm + 1e-6)).min(1.0)) as f32;
    for (p, st) in params.iter().zip(moments) {
        let u = Update { decay: if p.decay { u.decay } else { 0.0 }, grad_scale, ..u };
        p.var.as_tensor().inplace_op1(&HostUpdate { state: st, u })?;
    }
    Ok(true)
}
