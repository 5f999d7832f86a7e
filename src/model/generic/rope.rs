//! The rotary embedding as one op.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor};

use super::*;

/// Rotary embedding in the Llama (rotate-half) convention: `x` (b, heads, t, d), any strides; `cos`, `sin` (b, t,
/// d/2). Keeps nothing but its inputs: the backward pass is the rotation by the opposite angle.
pub struct Rope;

impl Rope {
    fn fwd<S>(&self, x: In<S>, cos: In<S>, sin: In<S>) -> R<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let [b, h, t, d] = x.1.dims()[..] else { candle_core::bail!("rope: x must be (b, heads, t, d)") };
        let half = d / 2;
        if cos.1.dims() != [b, t, half] || sin.1.dims() != [b, t, half] {
            candle_core::bail!("rope: cos/sin {:?} do not fit x {:?}", cos.1.dims(), x.1.dims());
        }
        // (b, t, half) seen as (b, heads, t, half): stride 0 over the heads.
        let per_head = |l: &Layout| {
            let s = l.stride();
            Layout::new(Shape::from((b, h, t, half)), vec![s[0], 0, s[1], s[2]], l.start_offset())
        };
        let (cl, sl) = (per_head(cos.1), per_head(sin.1));
        let (cos, sin) = ((cos.0, &cl), (sin.0, &sl));
        let (x1l, x2l) = (x.1.narrow(3, 0, half)?, x.1.narrow(3, half, half)?);
        let (x1, x2) = ((x.0, &x1l), (x.0, &x2l));
        use candle_core::op::{Add, Mul, Sub};
        let r1 = binary::<S, Sub>(r(&binary::<S, Mul>(x1, cos)?), r(&binary::<S, Mul>(x2, sin)?))?;
        let r2 = binary::<S, Add>(r(&binary::<S, Mul>(x2, cos)?), r(&binary::<S, Mul>(x1, sin)?))?;
        let shape = Shape::from((b, h, t, d));
        let mut out = x.0.device().zeros_impl(&shape, x.0.dtype())?;
        let rows = b * h * t;
        r1.s.copy2d(&mut out, rows, half, half, d, 0, 0)?;
        r2.s.copy2d(&mut out, rows, half, half, d, 0, half)?;
        Ok((out, shape))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-generic"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        self.fwd((x, xl), (c, cl), (s, sl))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> R<(CudaStorage, Shape)> {
        self.fwd((x, xl), (c, cl), (s, sl))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.apply_op3_no_bwd(&cos.detach(), &sin.detach().neg()?, &Rope)?), None, None))
    }
}
