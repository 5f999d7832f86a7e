//! A LoRA linear layer (frozen weight, dropout, both adapter products) as one op, and the frozen product.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::*;

/// `(rows, in) x (in, out)` product of `x` by the frozen weight `w` (out, in), read transposed without a copy (gemm
/// and cuBLAS both take the column-major view). `same` picks `w`'s storage on `x`'s backend.
pub fn frozen_product<S: BackendStorage>(
    x: In<S>,
    w: &Tensor,
    same: impl FnOnce(&Storage) -> Option<&S>,
) -> R<(S, Shape)> {
    let (x, x_layout) = x;
    let dims = x_layout.dims();
    let (out_f, in_f) = w.dims2()?;
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen-matmul: scalar input".into()))?;
    if k != in_f {
        candle_core::bail!("frozen-matmul: input has {k} features, weight expects {in_f}");
    }
    if !x_layout.is_contiguous() {
        candle_core::bail!("frozen-matmul: input must be contiguous");
    }
    let m = dims[..dims.len() - 1].iter().product::<usize>();
    let (w_storage, w_layout) = w.storage_and_layout();
    let ws = storage_of(&w_storage, same, "frozen-matmul")?;
    let wt_layout = Layout::new(Shape::from((in_f, out_f)), vec![1, in_f], w_layout.start_offset());
    let x2 = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
    let out = x.matmul(ws, (1, m, out_f, k), &x2, &wt_layout)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap_or(&mut 0) = out_f;
    Ok((out, Shape::from(out_dims)))
}

/// A linear layer with a frozen weight and a LoRA adapter, as one op: `x W^T (+ b) + scale * (drop(x) A^T) B^T`.
/// Inputs `x` (..., in) in the compute dtype, `A` (r, in) and `B` (out, r) as f32 masters (cast where used). Keeps
/// `x`, `A` and `B`: the backward recomputes the dropout mask and the rank-r intermediate.
pub struct LoraLinear {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
    /// (probability, seed) when dropout is on.
    pub dropout: Option<(f32, u64)>,
}

impl LoraLinear {
    fn fwd<S: DropoutStorage>(
        &self,
        x: In<S>,
        a: In<S>,
        b: In<S>,
        same: impl Fn(&Storage) -> Option<&S> + Copy,
    ) -> R<(S, Shape)> {
        let dtype = x.0.dtype();
        let (y, shape) = frozen_product(x, &self.w, same)?;
        let m = shape.elem_count() / shape.dims().last().copied().unwrap_or(1).max(1);
        let (out_f, in_f) = self.w.dims2()?;
        let mut y = Val::new(y, &Shape::from((m, out_f)));
        if let Some(bias) = &self.bias {
            let (bs, bl) = bias.storage_and_layout();
            y = binary::<S, candle_core::op::Add>(r(&y), (storage_of(&bs, same, "lora")?, bl))?;
        }
        let x2 = Layout::contiguous_with_offset((m, in_f), x.1.start_offset());
        let dropped = match self.dropout {
            Some((p, seed)) => Some(Val::new(x.0.dropout(&x2, p, seed)?, &Shape::from((m, in_f)))),
            None => None,
        };
        let xd = dropped.as_ref().map_or((x.0, &x2), r);
        let rank = a.1.dims()[0];
        let ac = cast(a, dtype)?;
        let at = Layout::new(Shape::from((in_f, rank)), vec![1, in_f], 0);
        let down = xd.0.matmul(&ac.s, (1, m, rank, in_f), xd.1, &at)?;
        let bc = cast(b, dtype)?;
        let bt = Layout::new(Shape::from((rank, out_f)), vec![1, rank], 0);
        let up = down.matmul(&bc.s, (1, m, out_f, rank), &Layout::contiguous((m, rank)), &bt)?;
        let up = affine((&up, &Layout::contiguous((m, out_f))), self.scale, 0.0)?;
        Ok((binary::<S, candle_core::op::Add>(r(&y), r(&up))?.s, shape))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        self.fwd((x, xl), (a, al), (b, bl), |s| if let Storage::Cpu(w) = s { Some(w) } else { None })
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> R<(CudaStorage, Shape)> {
        self.fwd((x, xl), (a, al), (b, bl), |s| if let Storage::Cuda(w) = s { Some(w) } else { None })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (out_f, in_f) = self.w.dims2()?;
        let m = x.elem_count() / in_f;
        let x2 = x.detach().reshape((m, in_f))?;
        let g2 = g.reshape((m, out_f))?;
        let xd = match self.dropout {
            Some((p, seed)) => x2.apply_op1_no_bwd(&Dropout { p, seed })?,
            None => x2,
        };
        let (ac, bc) = (a.detach().to_dtype(dtype)?, b.detach().to_dtype(dtype)?);
        let down = xd.matmul(&ac.t()?)?; // (m, r)
        let gu = (g2.clone() * self.scale)?; // gradient of the adapter's (unscaled) output
        let gb = gu.t()?.matmul(&down)?; // (out, r)
        let gdown = gu.matmul(&bc)?; // (m, r)
        let ga = gdown.t()?.matmul(&xd)?; // (r, in)
        let gx = if x.track_op() {
            let gxd = gdown.matmul(&ac)?;
            let gxd = match self.dropout {
                Some((p, seed)) => gxd.apply_op1_no_bwd(&Dropout { p, seed })?,
                None => gxd,
            };
            Some((g2.matmul(&self.w)? + gxd)?.reshape(dims)?)
        } else {
            None
        };
        Ok((gx, Some(ga.to_dtype(DType::F32)?), Some(gb.to_dtype(DType::F32)?)))
    }
}
