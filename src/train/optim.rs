//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW`, updating the parameters in place.
//!
//! candle_nn's `AdamW` builds new tensors for the moments and the parameter on every step (each tensor op
//! allocates). Here the moments and a gradient-accumulation buffer are plain `Vec<f32>`s allocated once, and the
//! parameter is rewritten through an in-place op, so a step allocates nothing. Gradient clipping (by global norm,
//! as `clip_grad_norm_`) is folded into the update.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};

use crate::{bail, Error, Result};

/// Hyper-parameters other than the learning rate (which comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults, with BPO's weight decay of 0.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Sum of the (scaled) gradients since the last step.
    acc: Vec<f32>,
}

struct Param {
    name: String,
    var: Var,
    /// transformers decays every weight except biases and norm weights.
    decay: bool,
    state: Mutex<Moments>,
}

pub struct AdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
    /// Steps taken (bias correction uses it).
    steps: u64,
}

/// Reads a contiguous f32 CPU tensor's values without copying them out.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        bail!("the optimizer needs contiguous f32 tensors on the CPU (train with --dtype f32)");
    };
    Ok(f(&data[start..end]))
}

/// One parameter's AdamW update, applied in place to its storage.
struct Update<'a> {
    state: &'a Mutex<Moments>,
    lr: f32,
    decay: f32,
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// 1 / (1 - beta1^t) and 1 / sqrt(1 - beta2^t).
    corr1: f32,
    corr2_sqrt: f32,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: parameter is not a contiguous f32 tensor");
        };
        let mut st = self.state.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        let Moments { m, v, acc } = &mut *st;
        let step = self.lr * self.corr1;
        for i in 0..end - start {
            let p = &mut data[start + i];
            let g = acc[i] * self.grad_scale;
            *p *= 1.0 - self.lr * self.decay;
            m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g;
            v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g * g;
            *p -= step * m[i] / (v[i].sqrt() * self.corr2_sqrt + self.eps);
            acc[i] = 0.0;
        }
        Ok(())
    }
}

impl AdamW {
    /// Takes (name, variable) pairs; each must be an f32 CPU tensor.
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != DType::F32 || !var.device().is_cpu() {
                bail!("{name}: training needs f32 weights on the CPU (use --dtype f32)");
            }
            let n = var.elem_count();
            let decay = !(name.ends_with("bias") || name.contains("norm"));
            params.push(Param { name: name.clone(), var: var.clone(), decay, state: Mutex::new(Moments { m: vec![0.0; n], v: vec![0.0; n], acc: vec![0.0; n] }) });
        }
        Ok(AdamW { params, cfg, steps: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adds `scale * gradient` of every parameter to its accumulation buffer. A parameter with no gradient (unused
    /// by this batch) adds nothing.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
            let mut st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            with_f32(&g, |g| {
                for (a, &x) in st.acc.iter_mut().zip(g) {
                    *a += scale as f32 * x;
                }
            })?;
        }
        Ok(())
    }

    /// L2 norm of the accumulated gradients of all parameters together.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for p in &self.params {
            let st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            sq += st.acc.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
        }
        Ok(sq.sqrt())
    }

    /// One AdamW step at learning rate `lr` with the accumulated gradients, clipped to global norm `max_norm`
    /// (as `clip_grad_norm_`: scaled by `max_norm / (norm + 1e-6)` when that is below 1). Clears the buffers and
    /// returns the norm before clipping.
    pub fn step(&mut self, lr: f64, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm()?;
        let grad_scale = match max_norm {
            Some(max) if norm.is_finite() => (max / (norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let c = &self.cfg;
        for p in &self.params {
            let update = Update {
                state: &p.state,
                lr: lr as f32,
                decay: if p.decay { c.weight_decay as f32 } else { 0.0 },
                grad_scale: grad_scale as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                corr1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
                corr2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            };
            p.var.as_tensor().inplace_op1(&update)?;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            let st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            let shape = p.var.shape();
            out.push((format!("{}.exp_avg", p.name), Tensor::from_slice(&st.m, shape, p.var.device())?));
            out.push((format!("{}.exp_avg_sq", p.name), Tensor::from_slice(&st.v, shape, p.var.device())?));
        }
        Ok(out)
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &self.params {
            let mut guard = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            let st = &mut *guard;
            for (suffix, buf) in [("exp_avg", &mut st.m), ("exp_avg_sq", &mut st.v)] {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.get(&key).ok_or_else(|| Error::invalid(format!("optimizer state has no {key}")))?;
                if t.elem_count() != buf.len() {
                    bail!("optimizer state {key} has {} values, the parameter {}", t.elem_count(), buf.len());
                }
                buf.copy_from_slice(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torch reference:
    /// p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0])); b = torch.nn.Parameter(torch.tensor([0.5]))
    /// opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.01)
    /// for g, gb in [([0.5, -1.0, 2.0], [1.0]), ([0.1, 0.2, -0.3], [-2.0])]:
    ///     p.grad = torch.tensor(g); b.grad = torch.tensor(gb); opt.step()
    #[test]
    #[allow(clippy::excessive_precision)] // torch's printed values, kept verbatim
    fn two_steps_match_torch() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        let vars = vec![("w.weight".to_string(), p.clone()), ("w.bias".to_string(), b.clone())];
        let mut opt = AdamW::new(&vars, AdamWConfig { weight_decay: 0.1, ..Default::default() }).unwrap();
        for (g, gb) in [([0.5f32, -1.0, 2.0], [1.0f32]), ([0.1, 0.2, -0.3], [-2.0])] {
            // Gradients of sum(p * g) + sum(b * gb).
            let loss = ((p.as_tensor() * Tensor::new(&g, &dev).unwrap()).unwrap().sum_all().unwrap() + (b.as_tensor() * Tensor::new(&gb, &dev).unwrap()).unwrap().sum_all().unwrap()).unwrap();
            opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
            opt.step(0.01, None).unwrap();
        }
        let want_p = [0.9799806475639343f32, -1.980901837348938, 2.9784910678863525];
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for (g, w) in got.iter().zip(want_p) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want_p:?}");
        }
        let gb: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        assert!((gb[0] - 0.4936610460281372).abs() < 1e-6, "{gb:?}");
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn clipping_scales_by_global_norm_and_state_round_trips() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &dev).unwrap()).unwrap();
        let vars = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        let loss = (p.as_tensor() * Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap().sum_all().unwrap();
        // Accumulating twice with weight 0.5 is one full gradient.
        let grads = loss.backward().unwrap();
        opt.accumulate(&grads, 0.5).unwrap();
        opt.accumulate(&grads, 0.5).unwrap();
        assert!((opt.grad_norm().unwrap() - 5.0).abs() < 1e-9);
        let norm = opt.step(0.1, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert_eq!(opt.grad_norm().unwrap(), 0.0, "buffers are cleared");
        // First Adam step moves each weight by lr against the gradient's sign, clipped or not.
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        assert!((got[0] + 0.1).abs() < 1e-5 && (got[1] + 0.1).abs() < 1e-5, "{got:?}");
        let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let m: Vec<f32> = saved["p.exp_avg"].to_vec1().unwrap();
        assert!((m[0] - 0.1 * 0.6).abs() < 1e-6, "m = (1 - beta1) * clipped gradient: {m:?}");
        let mut fresh = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        fresh.load_state(&saved, opt.steps()).unwrap();
        assert_eq!(fresh.state_tensors().unwrap()[1].1.to_vec1::<f32>().unwrap(), saved["p.exp_avg_sq"].to_vec1::<f32>().unwrap());
    }
}
