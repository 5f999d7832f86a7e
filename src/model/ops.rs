//! Tensor ops with a real backward pass.
//!
//! candle 0.11's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` have no backward: gradients through
//! them are silently dropped. Each op here uses the fused kernel when nothing needs a gradient (inference), and when
//! one does, the path chosen once at load ([`Kernels`]): the kernels of [`super::fused`] (f32 on the CPU: one graph
//! node with an analytic backward) or the device-generic ops of [`super::generic`] (any device, any float dtype:
//! one graph node each, keeping only inputs and output). [`FrozenMatmul`] is a linear layer whose backward returns
//! the input gradient only, on every device: candle's default matmul backward also builds a gradient for the frozen
//! weight, which costs a full extra matmul and a weight-sized buffer per layer; [`lora_linear`] is the same with a
//! LoRA adapter, as one op.
//!
//! Weights are cast to the activations' dtype where they are used: trainable weights are f32 master copies, frozen
//! ones are in the compute dtype (the cast is then free).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

pub use super::runtime::Kernels;
use super::{fused, generic};

/// True when a gradient must flow through an op touching any of `ts`.
fn tracks(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension.
pub fn softmax(k: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
    if !tracks(&[x]) {
        return candle_nn::ops::softmax_last_dim(x);
    }
    match k {
        Kernels::Fused => x.contiguous()?.apply_op1(fused::Softmax),
        Kernels::Generic => x.apply_op1(generic::Softmax),
    }
}

/// Attention probabilities `softmax(scores * scale + mask)` in f32, as transformers computes them (the sum in the
/// scores' dtype, the softmax in f32). `scores`: (b, heads, t, k); `mask`: additive, (b, 1, t, k), the same for
/// every head.
pub fn attention_softmax(k: Kernels, scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if k == Kernels::Fused {
        return scores.contiguous()?.apply_op2(&mask.contiguous()?, fused::AttnSoftmax { scale: scale as f32 });
    }
    if tracks(&[scores]) {
        return scores.apply_op2(mask, generic::AttnSoftmax { scale });
    }
    softmax(k, &(scores * scale)?.broadcast_add(mask)?.to_dtype(DType::F32)?)
}

/// Llama RMSNorm, computed in f32 like transformers: `w * (x / sqrt(mean(x^2) + eps))`.
pub fn rms_norm(k: Kernels, x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let w = w.to_dtype(dtype)?;
    if !tracks(&[x, &w]) {
        return candle_nn::ops::rms_norm(x, &w, eps as f32);
    }
    match k {
        Kernels::Fused => x.contiguous()?.apply_op2(&w.contiguous()?, fused::RmsNorm { eps: eps as f32 }),
        Kernels::Generic => x.apply_op2(&w, generic::RmsNorm { eps }),
    }
}

/// LayerNorm over the last dimension (statistics in f32).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let (w, b) = (w.to_dtype(dtype)?, b.to_dtype(dtype)?);
    if !tracks(&[x, &w, &b]) {
        return candle_nn::ops::layer_norm(x, &w, &b, eps as f32);
    }
    let xf = x.to_dtype(DType::F32)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    centred.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(&w)?.broadcast_add(&b)
}

/// Rotary embedding in the Llama (rotate-half) convention. `x`: (b, heads, t, d); `cos`, `sin`: (b, t, d/2).
pub fn rope(k: Kernels, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !tracks(&[x]) {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    match k {
        Kernels::Fused => {
            x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, fused::Rope { inverse: false })
        }
        Kernels::Generic => x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, generic::Rope),
    }
}

/// Llama's MLP nonlinearity `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !tracks(&[gate, up]) {
        return gate.silu()? * up;
    }
    gate.apply_op2(up, generic::SwiGlu)
}

/// Benchmark switch: when set, frozen weights go through candle's plain matmul, whose backward also computes the
/// (discarded) weight gradient. Only `bpo bench train --compare-plain-backward` sets it, to measure what
/// [`FrozenMatmul`] saves.
pub static PLAIN_FROZEN_MATMUL: AtomicBool = AtomicBool::new(false);

/// Linear map by a frozen weight (see [`FrozenMatmul`]), on any device: one (rows, in) x (in, out) product.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if plain_frozen(w) {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

/// Whether a frozen weight goes through candle's plain matmul (the benchmark switch, or a weight stored
/// transposed) instead of [`FrozenMatmul`].
pub fn plain_frozen(w: &Tensor) -> bool {
    !w.is_contiguous() || PLAIN_FROZEN_MATMUL.load(Ordering::Relaxed)
}

/// `x W^T (+ b) + scale * (dropout(x) A^T) B^T` for a frozen `w` (out, in) with a LoRA adapter `a` (r, in), `b`
/// (out, r) (f32 masters, cast to `x`'s dtype), as one op ([`generic::LoraLinear`]): the backward returns the input's
/// and the adapter's gradients and keeps nothing but `x`. `dropout`: (probability, seed) in training.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (a, b, scale): (&Tensor, &Tensor, f64),
    dropout: Option<(f32, u64)>,
) -> candle_core::Result<Tensor> {
    let bias = bias.map(|b| b.to_dtype(x.dtype())).transpose()?;
    x.contiguous()?.apply_op3(a, b, generic::LoraLinear { w: w.clone(), bias, scale, dropout })
}

/// Inverted dropout with a mask drawn from `seed` on `x`'s device: each element is zeroed with probability `p`, the
/// rest scaled by `1 / (1 - p)`. Deterministic in `seed` on every device ([`generic::keep`]), unlike
/// `candle_nn::ops::dropout`; its backward draws the same mask again rather than keeping it.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is not in [0, 1)");
    }
    x.contiguous()?.apply_op1(generic::Dropout { p, seed })
}

/// `x @ w^T` for a weight that never trains: the backward pass yields `grad @ w` for `x` and nothing for `w`.
/// `w`: (out, in), contiguous; `x`: (..., in).
pub struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // The generation engine's batch-invariant kernels, inside its steps only.
        if let Some(out) = super::cpu_decode::frozen_matmul(x, x_layout, &self.w)? {
            return Ok(out);
        }
        generic::frozen_product((x, x_layout), &self.w, |s| if let Storage::Cpu(w) = s { Some(w) } else { None })
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        generic::frozen_product((x, x_layout), &self.w, |s| if let Storage::Cuda(w) = s { Some(w) } else { None })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// The activations config.json may name for the CLIP MLP and the projector (`hidden_act`,
/// `projector_hidden_act`), as transformers' `ACT2FN` computes them.
pub const ACTIVATIONS: [&str; 4] = ["gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu"];

/// One of [`ACTIVATIONS`], read from its config.json name once when the model is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_pytorch_tanh` and `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    /// The activation config.json calls `name`; any other name is an error, never a substitute.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            "quick_gelu" => Ok(Activation::QuickGelu),
            other => Err(format!("unsupported activation {other:?} (bpo has {})", ACTIVATIONS.join(", "))),
        }
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Central finite difference of `f(x).sum()` w.r.t. `x` compared with the autograd gradient.
    fn check_grad(x: &[f32], shape: &[usize], f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::from_slice(x, shape, &dev).unwrap()).unwrap();
        // A fixed random projection makes the objective sensitive to every output element.
        let out = f(var.as_tensor()).unwrap();
        let n = out.elem_count();
        let proj: Vec<f32> = (0..n).map(|i| ((i * 7919 % 13) as f32 - 6.0) / 6.0).collect();
        let proj = Tensor::from_slice(&proj, out.shape(), &dev).unwrap();
        let loss = |t: &Tensor| {
            f(t).unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .mul(&proj.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (f(var.as_tensor()).unwrap() * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> =
            grads.get(var.as_tensor()).expect("gradient reaches the input").flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        for i in 0..x.len() {
            let mut xp = x.to_vec();
            xp[i] += eps;
            let mut xm = x.to_vec();
            xm[i] -= eps;
            let fd = (loss(&Tensor::from_slice(&xp, shape, &dev).unwrap())
                - loss(&Tensor::from_slice(&xm, shape, &dev).unwrap()))
                / (2.0 * eps as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "element {i}: finite difference {fd}, autograd {}",
                g[i]
            );
        }
    }

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0).collect()
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_grad(&data(12), &[2, 6], |x| softmax(Kernels::Fused, x));
        check_grad(&data(12), &[2, 6], |x| softmax(Kernels::Generic, x));
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let w = Tensor::new(&[0.5f32, 1.5, 0.8, 1.2], &Device::Cpu).unwrap();
        for k in [Kernels::Fused, Kernels::Generic] {
            check_grad(&data(8), &[2, 4], |x| rms_norm(k, x, &w, 1e-5));
        }
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let w = Tensor::new(&[0.5f32, 1.5, 0.8, 1.2], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &Device::Cpu).unwrap();
        check_grad(&data(8), &[2, 4], |x| layer_norm(x, &w, &b, 1e-5));
    }

    #[test]
    fn rope_gradient_matches_finite_differences() {
        let cos = Tensor::from_slice(&[0.9f32, 0.3, -0.5, 0.7, 0.1, 1.0], (1, 3, 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_slice(&[0.4f32, -0.9, 0.8, 0.7, -1.0, 0.0], (1, 3, 2), &Device::Cpu).unwrap();
        for k in [Kernels::Fused, Kernels::Generic] {
            check_grad(&data(24), &[1, 2, 3, 4], |x| rope(k, x, &cos, &sin));
        }
    }

    #[test]
    fn attention_softmax_gradient_matches_finite_differences() {
        // Row 1 of the mask hides key 2, as a causal mask would.
        let mask = Tensor::from_slice(&[0f32, 0.0, 0.0, 0.0, 0.0, f32::MIN], (1, 1, 2, 3), &Device::Cpu).unwrap();
        for k in [Kernels::Fused, Kernels::Generic] {
            check_grad(&data(12), &[1, 2, 2, 3], |x| attention_softmax(k, x, &mask, 0.7));
        }
        let x = Tensor::from_slice(&data(12), (1, 2, 2, 3), &Device::Cpu).unwrap();
        let composed = softmax(Kernels::Generic, &(&x * 0.7).unwrap().broadcast_add(&mask).unwrap()).unwrap();
        let d = (attention_softmax(Kernels::Fused, &x, &mask, 0.7).unwrap() - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn rms_norm_weight_gradient_matches_finite_differences() {
        let x = Tensor::from_slice(&data(8), (2, 4), &Device::Cpu).unwrap();
        for k in [Kernels::Fused, Kernels::Generic] {
            check_grad(&[0.5, 1.5, 0.8, 1.2], &[4], |w| rms_norm(k, &x, w, 1e-5));
        }
    }

    #[test]
    fn frozen_matmul_gradient_matches_finite_differences() {
        let w = Tensor::from_slice(&data(15), (5, 3), &Device::Cpu).unwrap();
        check_grad(&data(12), &[2, 2, 3], |x| frozen_linear(x, &w));
    }

    /// CLIP's patch embedding (a convolution with stride = kernel) trains with `bpo sft --train-vision`: candle's
    /// convolution backward must give the kernel its true gradient.
    #[test]
    fn patch_convolution_kernel_gradient_matches_finite_differences() {
        let pixels = Tensor::from_slice(&data(48), (1, 3, 4, 4), &Device::Cpu).unwrap();
        check_grad(&data(24), &[2, 3, 2, 2], |k| pixels.conv2d(k, 0, 2, 1, 1));
    }

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
        let a: Vec<f32> = dropout(&x, 0.25, 7).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = dropout(&x, 0.25, 7).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let c: Vec<f32> = dropout(&x, 0.25, 8).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f32 / a.len() as f32;
        assert!((zeros - 0.25).abs() < 0.05, "dropped fraction {zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn fused_and_composed_forms_agree() {
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&data(24), (1, 2, 3, 4), &dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let w = Tensor::new(&[0.5f32, 1.5, 0.8, 1.2], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap();
        let cos = Tensor::from_slice(&data(6), (1, 3, 2), &dev).unwrap();
        let sin = Tensor::from_slice(&data(6), (1, 3, 2), &dev).unwrap().affine(0.5, 0.1).unwrap();
        let diff =
            |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Inference (fused candle kernels) against the training path of each kind.
        for k in [Kernels::Fused, Kernels::Generic] {
            assert!(diff(softmax(k, &x).unwrap(), softmax(k, xv.as_tensor()).unwrap()) < 1e-6);
            assert!(diff(rms_norm(k, &x, &w, 1e-5).unwrap(), rms_norm(k, xv.as_tensor(), &w, 1e-5).unwrap()) < 1e-5);
            assert!(
                diff(layer_norm(&x, &w, &b, 1e-5).unwrap(), layer_norm(xv.as_tensor(), &w, &b, 1e-5).unwrap()) < 1e-5
            );
            assert!(diff(rope(k, &x, &cos, &sin).unwrap(), rope(k, xv.as_tensor(), &cos, &sin).unwrap()) < 1e-5);
        }
        let wm = Tensor::from_slice(&data(20), (5, 4), &dev).unwrap();
        assert!(diff(frozen_linear(&x, &wm).unwrap(), x.broadcast_matmul(&wm.t().unwrap()).unwrap()) < 1e-5);
    }
}
