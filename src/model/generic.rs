//! The training ops of the device-generic path (CUDA, and bf16/f16 anywhere), each one graph node that keeps only
//! its inputs and its output for the backward pass.
//!
//! candle's backward pass keeps every input of every op alive until it has run, so an op composed of ten tensor ops
//! keeps ten intermediates per call: a softmax composed of scale, mask, cast, max, subtraction, exponential, sum and
//! division keeps about 24 bytes per attention score, a LoRA projection four tensors of its output's size. Here each
//! forward is the same composition of candle's backend primitives ([`BackendStorage`]: the same kernels, in the same
//! order, so the values are identical), run inside a custom op whose intermediates are freed when it returns; the
//! backward passes recompute what they need from the inputs with tensor ops. One code path serves the CPU and CUDA
//! (`cpu_fwd` and `cuda_fwd` call the same generic function), so the CPU tests pin what a GPU runs.
//!
//! LoRA dropout masks come from a counter-based hash of (seed, element index) ([`keep`]): drawn on the device in
//! the forward pass (a few integer operations per element, no host random numbers, no copy), and drawn again from
//! the same seed in the backward pass instead of being kept. The CPU and CUDA kernels draw the same masks.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{BinaryOpT, ReduceOp, UnaryOpT};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};

type R<T> = candle_core::Result<T>;

/// A value inside a generic forward: storage and its layout.
struct Val<S> {
    s: S,
    l: Layout,
}

impl<S: BackendStorage> Val<S> {
    fn new(s: S, shape: &Shape) -> Self {
        Val { s, l: Layout::contiguous(shape.clone()) }
    }
}

/// Borrowed storage and layout (an op's input, or a [`Val`]).
type In<'a, S> = (&'a S, &'a Layout);

fn r<S>(v: &Val<S>) -> In<'_, S> {
    (&v.s, &v.l)
}

fn unary<S: BackendStorage, U: UnaryOpT>(x: In<S>) -> R<Val<S>> {
    Ok(Val::new(x.0.unary_impl::<U>(x.1)?, x.1.shape()))
}

/// `a op b`, `b` broadcast to `a`'s shape.
fn binary<S: BackendStorage, B: BinaryOpT>(a: In<S>, b: In<S>) -> R<Val<S>> {
    let bl = b.1.broadcast_as(a.1.shape().clone())?;
    Ok(Val::new(a.0.binary_impl::<B>(b.0, a.1, &bl)?, a.1.shape()))
}

fn affine<S: BackendStorage>(x: In<S>, mul: f64, add: f64) -> R<Val<S>> {
    Ok(Val::new(x.0.affine(x.1, mul, add)?, x.1.shape()))
}

fn cast<S: BackendStorage>(x: In<S>, dtype: DType) -> R<Val<S>> {
    Ok(Val::new(x.0.to_dtype(x.1, dtype)?, x.1.shape()))
}

/// Reduction over the last dimension, kept as a dimension of 1.
fn reduce_last<S: BackendStorage>(x: In<S>, op: ReduceOp) -> R<Val<S>> {
    let last = x.1.dims().len() - 1;
    let mut dims = x.1.dims().to_vec();
    dims[last] = 1;
    Ok(Val::new(x.0.reduce_op(op, x.1, &[last])?, &Shape::from(dims)))
}

/// Softmax over the last dimension, in `x`'s dtype, as `exp(x - max) / sum(exp(x - max))`.
fn softmax_last<S: BackendStorage>(x: In<S>) -> R<Val<S>> {
    let max = reduce_last(x, ReduceOp::Max)?;
    let e = unary::<S, candle_core::op::Exp>(r(&binary::<S, candle_core::op::Sub>(x, r(&max))?))?;
    let sum = reduce_last(r(&e), ReduceOp::Sum)?;
    binary::<S, candle_core::op::Div>(r(&e), r(&sum))
}

/// The storage of `t` on the backend `S`, where `same` picks it out of a [`Storage`].
fn storage_of<'a, S>(
    t: &'a candle_core::StorageRef<'a>,
    same: impl FnOnce(&'a Storage) -> Option<&'a S>,
    what: &str,
) -> R<&'a S> {
    same(t).ok_or_else(|| candle_core::Error::Msg(format!("{what}: tensors on different devices")))
}

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

/// lowbias32 (C. Wellons' integer hash): every input bit affects every output bit.
#[inline]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The two 32-bit keys of a 64-bit mask seed, as the kernels take them.
fn keys(seed: u64) -> (u32, u32) {
    (mix32(seed as u32), mix32((seed >> 32) as u32 ^ 0x9e37_79b9))
}

/// Whether dropout keeps element `i` of the mask drawn from `keys` at drop probability `p`: a uniform draw in
/// [0, 1) from 24 bits of `mix32(mix32(i + k1) ^ k2)`, kept when it is at least `p`. The CUDA kernel
/// (`kernels/dropout.cu`) computes the same.
#[inline]
pub fn keep(i: u32, (k1, k2): (u32, u32), p: f32) -> bool {
    let u = (mix32(mix32(i.wrapping_add(k1)) ^ k2) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// Backends that draw dropout masks on the device.
pub trait DropoutStorage: BackendStorage {
    /// Inverted dropout of a contiguous tensor: element i zeroed unless [`keep`], the rest scaled by `1 / (1 - p)`
    /// (computed in f32, rounded once to the dtype).
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self>;
}

fn dropout_slice<T: candle_core::WithDType>(x: &[T], p: f32, seed: u64) -> Vec<T> {
    use rayon::prelude::*;
    let (k, scale) = (keys(seed), 1.0 / (1.0 - p));
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let first = c << 16;
        for (j, o) in chunk.iter_mut().enumerate() {
            let i = first + j;
            if keep(i as u32, k, p) {
                *o = T::from_f64((x[i].to_f64() as f32 * scale) as f64);
            }
        }
    });
    out
}

impl DropoutStorage for CpuStorage {
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("dropout: input must be contiguous") };
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(dropout_slice(&v[a..b], p, seed)),
            CpuStorage::BF16(v) => CpuStorage::BF16(dropout_slice(&v[a..b], p, seed)),
            CpuStorage::F16(v) => CpuStorage::F16(dropout_slice(&v[a..b], p, seed)),
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        })
    }
}

#[cfg(feature = "cuda")]
impl DropoutStorage for CudaStorage {
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self> {
        super::cuda_kernels::dropout(self, l, p, keys(seed))
    }
}

#[cfg(not(feature = "cuda"))]
impl DropoutStorage for CudaStorage {
    fn dropout(&self, _: &Layout, _: f32, _: u64) -> R<Self> {
        candle_core::bail!("this bpo was built without CUDA")
    }
}

/// Inverted dropout with the mask drawn from `seed` on `x`'s device ([`keep`]). The backward pass applies the
/// same mask to the gradient (dropout is its own adjoint), drawing it again rather than keeping it.
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> R<(CpuStorage, Shape)> {
        Ok((x.dropout(xl, self.p, self.seed)?, xl.shape().clone()))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> R<(CudaStorage, Shape)> {
        Ok((x.dropout(xl, self.p, self.seed)?, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + salt) * 37 % 23) as f32 - 11.0) / 7.0).collect()
    }

    fn tensor(shape: &[usize], salt: usize, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(data(n, salt), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel(got: &Tensor, want: &Tensor) -> f32 {
        let (g, w) = (values(got), values(want));
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
    }

    /// Output and the gradients of `sum(out * proj)` with respect to `inputs`, for `f` on variables of `inputs`.
    fn run(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let proj = tensor(out.dims(), 5, out.dtype());
        let grads = (&out * proj).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        (out, ts.iter().map(|t| grads.get(t).expect("a gradient reaches every input").clone()).collect())
    }

    /// The generic op `op` against the composition `reference` it replaces: the same values forward (bit for
    /// bit: the same kernels in the same order) and the same gradients within `tol`.
    fn same_as(inputs: &[Tensor], op: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let (out, grads) = run(inputs, op);
        let (want, want_grads) = run(inputs, reference);
        assert_eq!(values(&out), values(&want), "forward values");
        for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
            assert!(rel(g, w) <= tol, "gradient of input {i}: relative difference {}", rel(g, w));
        }
    }

    const DTYPES: [(DType, f32); 3] = [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 5e-3)];

    #[test]
    fn attention_softmax_equals_its_composition() {
        for (dt, tol) in DTYPES {
            let scores = tensor(&[2, 3, 4, 5], 0, dt);
            let neg = super::super::llama::mask_min(dt);
            let m: Vec<f32> = (0..40).map(|i| if i % 7 == 3 { neg } else { 0.0 }).collect();
            let mask = Tensor::from_vec(m, (2, 1, 4, 5), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let op = |t: &[Tensor]| t[0].apply_op2(&mask, AttnSoftmax { scale: 0.7 }).unwrap();
            let composed = |t: &[Tensor]| {
                let x = (&t[0] * 0.7).unwrap().broadcast_add(&mask).unwrap().to_dtype(DType::F32).unwrap();
                let x = x.broadcast_sub(&x.max_keepdim(D::Minus1).unwrap().detach()).unwrap();
                let e = x.exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            };
            same_as(&[scores], op, composed, tol);
        }
    }

    #[test]
    fn rms_norm_equals_its_composition() {
        for (dt, tol) in DTYPES {
            let (x, w) = (tensor(&[2, 3, 8], 1, dt), tensor(&[8], 2, dt));
            let op = |t: &[Tensor]| t[0].apply_op2(&t[1], RmsNorm { eps: 1e-5 }).unwrap();
            let composed = |t: &[Tensor]| {
                let xf = t[0].to_dtype(DType::F32).unwrap();
                let inv = (xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
                let n = xf.broadcast_mul(&inv.recip().unwrap()).unwrap().to_dtype(dt).unwrap();
                n.broadcast_mul(&t[1]).unwrap()
            };
            same_as(&[x, w], op, composed, tol);
        }
    }

    #[test]
    fn rope_equals_its_composition_on_strided_input() {
        for (dt, tol) in DTYPES {
            // (b, t, heads, d) seen as (b, heads, t, d), as attention does it: not contiguous.
            let (x, cos, sin) = (tensor(&[2, 3, 4, 6], 3, dt), tensor(&[2, 3, 3], 4, dt), tensor(&[2, 3, 3], 6, dt));
            let op = |t: &[Tensor]| t[0].transpose(1, 2).unwrap().apply_op3(&cos, &sin, Rope).unwrap();
            let composed = |t: &[Tensor]| {
                let x = t[0].transpose(1, 2).unwrap();
                let (x1, x2) = (x.narrow(3, 0, 3).unwrap(), x.narrow(3, 3, 3).unwrap());
                let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
                let r1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
                let r2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
                Tensor::cat(&[r1, r2], 3).unwrap()
            };
            same_as(&[x], op, composed, tol);
        }
    }

    #[test]
    fn swiglu_equals_its_composition() {
        for (dt, tol) in DTYPES {
            let (g, u) = (tensor(&[3, 10], 7, dt), tensor(&[3, 10], 8, dt));
            let op = |t: &[Tensor]| t[0].apply_op2(&t[1], SwiGlu).unwrap();
            let composed = |t: &[Tensor]| (t[0].silu().unwrap() * &t[1]).unwrap();
            same_as(&[g, u], op, composed, tol);
        }
    }

    #[test]
    fn lora_linear_equals_its_composition_with_and_without_dropout() {
        for (dt, tol) in DTYPES {
            for dropout in [None, Some((0.3f32, 11u64))] {
                let w = tensor(&[6, 5], 9, dt);
                let bias = tensor(&[6], 10, dt);
                let (x, a, b) =
                    (tensor(&[2, 3, 5], 11, dt), tensor(&[2, 5], 12, DType::F32), tensor(&[6, 2], 13, DType::F32));
                let op = |t: &[Tensor]| {
                    let lin = LoraLinear { w: w.clone(), bias: Some(bias.clone()), scale: 1.5, dropout };
                    t[0].apply_op3(&t[1], &t[2], lin).unwrap()
                };
                let composed = |t: &[Tensor]| {
                    let y = t[0].broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
                    let xd = match dropout {
                        Some((p, seed)) => t[0].apply_op1(Dropout { p, seed }).unwrap(),
                        None => t[0].clone(),
                    };
                    let down = xd.broadcast_matmul(&t[1].to_dtype(dt).unwrap().t().unwrap()).unwrap();
                    let up = down.broadcast_matmul(&t[2].to_dtype(dt).unwrap().t().unwrap()).unwrap();
                    (y + (up * 1.5).unwrap()).unwrap()
                };
                same_as(&[x, a, b], op, composed, tol);
            }
        }
    }

    #[test]
    fn dropout_masks_are_seeded_scaled_and_reused_by_the_backward_pass() {
        let x = Var::from_tensor(&Tensor::ones((300, 300), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let draw = |seed| x.as_tensor().apply_op1(Dropout { p: 0.25, seed }).unwrap();
        let (a, b, c) = (values(&draw(7)), values(&draw(7)), values(&draw(8)));
        assert_eq!(a, b, "the same seed draws the same mask");
        assert_ne!(a, c, "another seed draws another");
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        // 90,000 draws: the standard error of the rate is 0.0014.
        assert!((dropped - 0.25).abs() < 0.006, "dropped fraction {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        // Neighbouring elements and masks of neighbouring seeds are independent.
        let both = a.iter().zip(&c).filter(|(u, v)| **u == 0.0 && **v == 0.0).count() as f64 / a.len() as f64;
        assert!((both - 0.0625).abs() < 0.005, "joint drop rate of two seeds {both}");
        let pairs = a.windows(2).filter(|w| w[0] == 0.0 && w[1] == 0.0).count() as f64 / (a.len() - 1) as f64;
        assert!((pairs - 0.0625).abs() < 0.005, "joint drop rate of neighbours {pairs}");
        // The backward pass applies the same mask to the gradient.
        let grads = draw(7).sum_all().unwrap().backward().unwrap();
        assert_eq!(values(grads.get(x.as_tensor()).unwrap()), a);
        // Every float dtype gets the mask of the f32 draw.
        for dt in [DType::BF16, DType::F16] {
            let d = x.as_tensor().to_dtype(dt).unwrap().apply_op1(Dropout { p: 0.25, seed: 7 }).unwrap();
            let kept: Vec<bool> = values(&d).iter().map(|&v| v != 0.0).collect();
            assert_eq!(kept, a.iter().map(|&v| v != 0.0).collect::<Vec<_>>(), "{dt:?}");
        }
    }
}
