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

use candle_core::backend::BackendStorage;
use candle_core::op::{BinaryOpT, ReduceOp, UnaryOpT};
use candle_core::{DType, Layout, Shape, Storage};

mod dropout;
mod lora;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use dropout::{keep, Dropout, DropoutStorage};
pub use lora::{frozen_product, LoraLinear};
pub use rms_norm::RmsNorm;
pub use rope::Rope;
pub use softmax::{AttnSoftmax, Softmax};
pub use swiglu::SwiGlu;

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};

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
