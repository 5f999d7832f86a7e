//! Linear layers with optional LoRA adapters (Hu et al. 2021): `y = W x + b + (alpha / r) * B A x`.
//!
//! The base weight is frozen unless it is itself a trainable variable (full fine-tuning); the adapter can be switched
//! off per call ([`Pass::adapters`]), so one copy of the weights serves as both policy and DPO reference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use super::ops;
use crate::hash::splitmix64;

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
    /// Where dropout masks come from (shared by all adapters of a model).
    pub seed: Arc<DropoutSeed>,
}

/// Seeds of LoRA dropout masks. candle's own dropout draws from an unseeded thread RNG; here every mask is drawn
/// from `(base, call number)`, and a trainer resets `base` each step, so a resumed run replays the same masks.
#[derive(Debug, Default)]
pub struct DropoutSeed {
    base: AtomicU64,
    calls: AtomicU64,
}

impl DropoutSeed {
    pub fn new(seed: u64) -> Self {
        DropoutSeed { base: AtomicU64::new(seed), calls: AtomicU64::new(0) }
    }

    /// Restarts the mask sequence from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.base.store(seed, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// Masks drawn since the last [`DropoutSeed::reseed`]: where a recomputation must restart
    /// ([`DropoutSeed::rewind`]) to draw the same masks again.
    pub fn position(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Continues the sequence from `position` (a value of [`DropoutSeed::position`]).
    pub fn rewind(&self, position: u64) {
        self.calls.store(position, Ordering::SeqCst);
    }

    /// The seed of the next mask.
    pub fn next(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        splitmix64(self.base.load(Ordering::SeqCst) ^ splitmix64(n))
    }
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

    /// `x W^T + b` (+ the adapter's update when `pass.adapters`), in `x`'s dtype: trainable weights (f32 master
    /// copies) are cast to it here, frozen ones are stored in it. A frozen weight with an adapter is one op
    /// ([`ops::lora_linear`]).
    pub fn forward(&self, x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let lora = self.lora.as_ref().filter(|_| pass.adapters);
        match lora {
            Some(l) if !self.weight.track_op() && !ops::plain_frozen(&self.weight) => ops::lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                (l.a.as_tensor(), l.b.as_tensor(), l.scale),
                l.dropout_seed(pass),
            ),
            _ => self.forward_composed(x, lora, pass),
        }
    }

    /// [`Linear::forward`] as a composition of tensor ops: a trainable base weight (full fine-tuning), the plain
    /// matmul benchmark switch, and the reference the LoRA op is tested against.
    pub fn forward_composed(&self, x: &Tensor, lora: Option<&Lora>, pass: Pass) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let mut y = if self.weight.track_op() {
            x.broadcast_matmul(&self.weight.to_dtype(dtype)?.t()?)?
        } else {
            ops::frozen_linear(x, &self.weight)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(dtype)?)?;
        }
        if let Some(lora) = lora {
            let x = match lora.dropout_seed(pass) {
                Some((p, seed)) => ops::dropout(x, p, seed)?,
                None => x.clone(),
            };
            let down = x.broadcast_matmul(&lora.a.as_tensor().to_dtype(dtype)?.t()?)?;
            let up = down.broadcast_matmul(&lora.b.as_tensor().to_dtype(dtype)?.t()?)?;
            y = (y + (up * lora.scale)?)?;
        }
        Ok(y)
    }
}

impl Lora {
    /// (probability, seed) of this call's dropout mask, when dropout is on (training with p > 0): each call draws
    /// the next seed of the model's [`DropoutSeed`].
    pub fn dropout_seed(&self, pass: Pass) -> Option<(f32, u64)> {
        (pass.train && self.dropout > 0.0).then(|| (self.dropout, self.seed.next()))
    }
}
