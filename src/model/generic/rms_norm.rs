//! Llama's RMSNorm as one op.

use candle_core::backend::BackendStorage;
use candle_core::op::ReduceOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::*;

/// Llama RMSNorm `w * (x / sqrt(mean(x^2) + eps))` with the statistics in f32, as transformers computes it. `w` is
/// in `x`'s dtype. Keeps `x` and `w`; the backward recomputes the inverse RMS.
pub struct RmsNorm {
    pub eps: f64,
}

impl RmsNorm {
    fn fwd<S: BackendStorage>(&self, x: In<S>, w: In<S>) -> R<(S, Shape)> {
        let dtype = x.0.dtype();
        let h = *x.1.dims().last().unwrap_or(&1);
        let xf = if dtype == DType::F32 { None } else { Some(cast(x, DType::F32)?) };
        let xf = xf.as_ref().map_or(x, r);
        let sum = reduce_last(r(&unary::<S, candle_core::op::Sqr>(xf)?), ReduceOp::Sum)?;
        // mean, then + eps, as two roundings, like `mean_keepdim(..) + eps`.
        let ms = affine(r(&affine(r(&sum), 1.0 / h as f64, 0.0)?), 1.0, self.eps)?;
        let inv = unary::<S, candle_core::op::Recip>(r(&unary::<S, candle_core::op::Sqrt>(r(&ms))?))?;
        let n = binary::<S, candle_core::op::Mul>(xf, r(&inv))?;
        let n = if dtype == DType::F32 { n } else { cast(r(&n), dtype)? };
        let out = binary::<S, candle_core::op::Mul>(r(&n), w)?;
        Ok((out.s, x.1.shape().clone()))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-generic"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd((x, xl), (w, wl))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> R<(CudaStorage, Shape)> {
        self.fwd((x, xl), (w, wl))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> R<(Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let h = x.dim(D::Minus1)?;
        let xf = x.detach().to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let gw = g.broadcast_mul(&w.detach())?.to_dtype(DType::F32)?;
        // d/dx of x * inv: inv * gw - x * inv^3 * sum(gw * x) / h.
        let dot = (&gw * &xf)?.sum_keepdim(D::Minus1)?;
        let c = ((inv.powf(3.0)? * dot)? / h as f64)?;
        let dx = (gw.broadcast_mul(&inv)? - xf.broadcast_mul(&c)?)?.to_dtype(dtype)?;
        let dw = if w.track_op() {
            let n = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
            Some((g * n)?.reshape(((), h))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}
