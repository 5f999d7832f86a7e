//! The optimizer's state on the parameters' device (CUDA, or bf16 compute): the moments and the gradient
//! accumulation buffer of every parameter as flat f32 tensors, so a step is a dozen whole-buffer kernels whatever
//! the number of parameters, with the norm, clipping and finiteness check on the device.

use candle_core::{DType, Tensor};

use super::host::Update;
use super::Param;
use crate::Result;

pub(super) struct Flat {
    pub m: Tensor,
    pub v: Tensor,
    pub acc: Tensor,
    /// Weight decay of each element: the configured decay for decayed parameters, 0 elsewhere.
    pub decay: Tensor,
    /// Where each parameter starts in the flat buffers.
    pub offsets: Vec<usize>,
}

impl Flat {
    /// One step; returns the global gradient norm before clipping (a scalar on the device, not read back). The
    /// update is applied only where the norm and every guard are finite. `u.decay` and `u.grad_scale` are unused
    /// (the per-element decay and the clipping factor live on the device).
    pub(super) fn step(&mut self, params: &[Param], u: Update, clip: Option<f64>, guards: &[Tensor]) -> Result<Tensor> {
        let Flat { m, v, acc, decay, offsets } = self;
        let norm = acc.sqr()?.sum_all()?.sqrt()?;
        // |x| <= f32::MAX is false for NaN and infinities; a sum is finite when every term is (the losses are
        // far from overflowing).
        let mut probe = norm.clone();
        for g in guards {
            probe = (probe + g.to_dtype(DType::F32)?.sum_all()?)?;
        }
        let ok = probe.abs()?.le(f64::from(f32::MAX))?;
        let g = match clip {
            Some(max) => {
                let scale = Tensor::new(max as f32, norm.device())?.div(&(&norm + 1e-6)?)?.minimum(1f64)?;
                acc.broadcast_mul(&scale)?
            }
            None => acc.clone(),
        };
        let old_p = Tensor::cat(
            &params.iter().map(|p| p.var.as_tensor().flatten_all()).collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        // The host path's arithmetic, element for element.
        let factor = decay.affine(-u.lr as f64, 1.0)?;
        let new_m = ((&*m * u.beta1 as f64)? + (&g * (1.0 - u.beta1) as f64)?)?;
        let new_v = ((&*v * u.beta2 as f64)? + ((&g * (1.0 - u.beta2) as f64)? * &g)?)?;
        let denom = ((new_v.sqrt()? * u.corr2_sqrt as f64)? + u.eps as f64)?;
        let step = ((&new_m * (u.lr * u.corr1) as f64)? / denom)?;
        let new_p = ((&old_p * factor)? - step)?;
        let keep = |new: &Tensor, old: &Tensor| ok.broadcast_as(new.shape())?.where_cond(new, old);
        let new_p = keep(&new_p, &old_p)?;
        *m = keep(&new_m, m)?;
        *v = keep(&new_v, v)?;
        for (p, &at) in params.iter().zip(offsets.iter()) {
            let n = p.var.elem_count();
            p.var.set(&new_p.narrow(0, at, n)?.reshape(p.var.shape())?)?;
        }
        *acc = acc.zeros_like()?;
        Ok(norm)
    }
}
