//! SwiGLU, Llama's MLP nonlinearity, as one op.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use super::*;

/// SwiGLU `silu(gate) * up`, Llama's MLP nonlinearity. Keeps `gate` and `up`.
pub struct SwiGlu;

impl SwiGlu {
    fn fwd<S: BackendStorage>(&self, gate: In<S>, up: In<S>) -> R<(S, Shape)> {
        let act = unary::<S, candle_core::op::Silu>(gate)?;
        Ok((binary::<S, candle_core::op::Mul>(r(&act), up)?.s, gate.1.shape().clone()))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd((g, gl), (u, ul))
    }

    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> R<(CudaStorage, Shape)> {
        self.fwd((g, gl), (u, ul))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> R<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up) = (gate.detach(), up.detach());
        // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x): candle's own silu backward.
        let s = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let d_silu = (&s * (1.0 + (&gate * (1.0 - &s)?)?)?)?;
        let d_gate = (g * &up)?.mul(&d_silu)?;
        let d_up = (g * gate.silu()?)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}
