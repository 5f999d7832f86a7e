//! Linear layers with optional LoRA adapters (Hu et al. 2021): `y = W x + b + (alpha / r) * B A x`.
//!
//! The base weight is frozen unless it is itself a trainable variable (full fine-tuning); the adapter can be switched
//! off per call ([`Pass::adapters`]), so one copy of the weights serves as both policy and DPO reference.

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use super::ops;

/// Per-call switches threaded through every forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Apply LoRA adapters (false = the base model, i.e. the DPO reference).
    pub adapters: bool,
    /// Training mode: LoRA dropout is active.
    pub train: bool,
}

impl Pass {
    /// Inference with adapters on.
    pub const INFER: Pass = Pass { adapters: true, train: false };
    /// The base model: adapters off.
    pub const BASE: Pass = Pass { adapters: false, train: false };
}

/// A LoRA adapter on one linear layer. `a`: (r, in), `b`: (out, r).
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// Loads `weight` (out, in) and, if `bias`, `bias` (out) under `vb`.
    pub fn load(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool) -> candle_core::Result<Self> {
        let weight = vb.get((out_f, in_f), "weight")?;
        let bias = if bias { Some(vb.get(out_f, "bias")?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let mut y = if self.weight.track_op() {
            x.broadcast_matmul(&self.weight.t()?)?
        } else {
            ops::frozen_linear(x, &self.weight)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let (Some(lora), true) = (&self.lora, pass.adapters) {
            let x = if pass.train && lora.dropout > 0.0 { candle_nn::ops::dropout(x, lora.dropout)? } else { x.clone() };
            let down = x.broadcast_matmul(&lora.a.as_tensor().t()?)?;
            let up = down.broadcast_matmul(&lora.b.as_tensor().t()?)?;
            y = (y + (up * lora.scale)?)?;
        }
        Ok(y)
    }
}
