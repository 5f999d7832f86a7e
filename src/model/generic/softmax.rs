//! Softmax over the last dimension: attention's (scaled, masked, in f32) and the plain one.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::*;

/// Softmax input gradient `scale * p * (g - sum(g * p))` in f32, from the output `p` and its gradient `g`.
fn softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> R<Tensor> {
    let (p, g) = (p.detach().to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
    let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
    let d = (g.broadcast_sub(&dot)? * p)?;
    if scale == 1.0 {
        Ok(d)
    } else {
        d * scale
    }
}

/// `softmax(x * scale + mask)` over the last dimension, computed in f32 and returned in f32 (transformers' eager
/// attention). `x`: (b, heads, t, k); `mask`: additive, (b, 1, t, k), shared by the heads. Keeps `x` and the
/// probabilities; the mask gets no gradient.
pub struct AttnSoftmax {
    pub scale: f64,
}

impl AttnSoftmax {
    fn fwd<S: BackendStorage>(&self, x: In<S>, mask: In<S>) -> R<(S, Shape)> {
        let scaled = affine(x, self.scale, 0.0)?;
        let masked = binary::<S, candle_core::op::Add>(r(&scaled), mask)?;
        let p = if masked.s.dtype() == DType::F32 {
            softmax_last(r(&masked))?
        } else {
            softmax_last(r(&cast(r(&masked), DType::F32)?))?
        };
        Ok((p.s, x.1.shape().clone()))
    }
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "attn-softmax-generic"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, m: &CpuStorage, ml: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd((x, xl), (m, ml))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, m: &CudaStorage, ml: &Layout) -> R<(CudaStorage, Shape)> {
        self.fwd((x, xl), (m, ml))
    }

    fn bwd(&self, x: &Tensor, _m: &Tensor, p: &Tensor, g: &Tensor) -> R<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_grad(p, g, self.scale)?.to_dtype(x.dtype())?), None))
    }
}

/// Softmax over the last dimension in the input's dtype (the vision tower's attention). Keeps its output only.
pub struct Softmax;

impl Softmax {
    fn fwd<S: BackendStorage>(&self, x: In<S>) -> R<(S, Shape)> {
        Ok((softmax_last(x)?.s, x.1.shape().clone()))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-generic"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd((x, xl))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> R<(CudaStorage, Shape)> {
        self.fwd((x, xl))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, g: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(softmax_grad(p, g, 1.0)?.to_dtype(x.dtype())?))
    }
}
