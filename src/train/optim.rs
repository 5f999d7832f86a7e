//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW`, updating the parameters in place.
//!
//! Two kinds of state, chosen once with the run's [`Kernels`]. On the CPU in f32 ([`Kernels::Fused`]) the moments and
//! a gradient-accumulation buffer are plain `Vec<f32>`s allocated once and the parameter is rewritten through an
//! in-place op, so a step allocates nothing. Elsewhere ([`Kernels::Generic`]: CUDA, or bf16 compute) they are f32
//! tensors on the parameters' device and the update is a handful of tensor ops, with one value read back per
//! step (the global gradient norm). Parameters are f32 master copies in both. Gradient clipping (by global norm,
//! as `clip_grad_norm_`) is folded into the update.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};

use crate::model::Kernels;
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

/// Moments and the gradient accumulation buffer of one parameter.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32>, acc: Vec<f32> },
    Device { m: Tensor, v: Tensor, acc: Tensor },
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
        bail!("the optimizer's CPU path needs contiguous f32 gradients on the CPU");
    };
    Ok(f(&data[start..end]))
}

/// Per-step constants of the update.
struct Update {
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

/// One parameter's host-state update, applied in place to its storage.
struct HostUpdate<'a> {
    state: &'a Mutex<Moments>,
    u: Update,
}

impl InplaceOp1 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: parameter is not a contiguous f32 tensor");
        };
        let mut st = self.state.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        let Moments::Host { m, v, acc } = &mut *st else { candle_core::bail!("adamw: parameter has device state") };
        let u = &self.u;
        let step = u.lr * u.corr1;
        for i in 0..end - start {
            let p = &mut data[start + i];
            let g = acc[i] * u.grad_scale;
            *p *= 1.0 - u.lr * u.decay;
            m[i] = u.beta1 * m[i] + (1.0 - u.beta1) * g;
            v[i] = u.beta2 * v[i] + (1.0 - u.beta2) * g * g;
            *p -= step * m[i] / (v[i].sqrt() * u.corr2_sqrt + u.eps);
            acc[i] = 0.0;
        }
        Ok(())
    }
}

/// The same update with the state as tensors on the parameter's device, in the same order of f32 operations.
fn device_update(var: &Var, m: &mut Tensor, v: &mut Tensor, acc: &mut Tensor, u: &Update) -> Result<()> {
    let g = (&*acc * u.grad_scale as f64)?;
    let p = (var.as_tensor() * (1.0 - u.lr * u.decay) as f64)?;
    *m = ((&*m * u.beta1 as f64)? + (&g * (1.0 - u.beta1) as f64)?)?;
    *v = ((&*v * u.beta2 as f64)? + ((&g * (1.0 - u.beta2) as f64)? * &g)?)?;
    let denom = ((v.sqrt()? * u.corr2_sqrt as f64)? + u.eps as f64)?;
    let p = (p - ((&*m * (u.lr * u.corr1) as f64)? / denom)?)?;
    var.set(&p)?;
    *acc = acc.zeros_like()?;
    Ok(())
}

impl AdamW {
    /// Takes (name, variable) pairs, each an f32 tensor (a master copy). `kernels` chooses the state:
    /// [`Kernels::Fused`] host buffers (CPU only), [`Kernels::Generic`] tensors on the parameters' device.
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig, kernels: Kernels) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != DType::F32 {
                bail!("{name}: trainable weights must be f32 master copies, found {:?}", var.dtype());
            }
            let state = match kernels {
                Kernels::Fused => {
                    if !var.device().is_cpu() {
                        bail!("{name}: the fused optimizer runs on the CPU only");
                    }
                    let n = var.elem_count();
                    Moments::Host { m: vec![0.0; n], v: vec![0.0; n], acc: vec![0.0; n] }
                }
                Kernels::Generic => {
                    let zeros = var.as_tensor().zeros_like()?;
                    Moments::Device { m: zeros.clone(), v: zeros.clone(), acc: zeros }
                }
            };
            let decay = !(name.ends_with("bias") || name.contains("norm"));
            params.push(Param { name: name.clone(), var: var.clone(), decay, state: Mutex::new(state) });
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
            let mut st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            match &mut *st {
                Moments::Host { acc, .. } => {
                    let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
                    with_f32(&g, |g| {
                        for (a, &x) in acc.iter_mut().zip(g) {
                            *a += scale as f32 * x;
                        }
                    })?;
                }
                Moments::Device { acc, .. } => *acc = (&*acc + (g.to_dtype(DType::F32)? * scale)?)?,
            }
        }
        Ok(())
    }

    /// L2 norm of the accumulated gradients of all parameters together.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        let mut device_sums = Vec::new();
        for p in &self.params {
            let st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            match &*st {
                Moments::Host { acc, .. } => sq += acc.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>(),
                Moments::Device { acc, .. } => device_sums.push(acc.sqr()?.sum_all()?.unsqueeze(0)?),
            }
        }
        if !device_sums.is_empty() {
            // One read-back for all parameters.
            let sums: Vec<f32> = Tensor::cat(&device_sums, 0)?.to_vec1()?;
            sq += sums.iter().map(|&s| s as f64).sum::<f64>();
        }
        Ok(sq.sqrt())
    }

    /// One AdamW step at learning rate `lr` with the accumulated gradients, clipped to global norm `max_norm`
    /// (as `clip_grad_norm_`: scaled by `max_norm / (norm + 1e-6)` when that is below 1; `max_norm` 0 means no
    /// clipping, as transformers' `max_grad_norm=0`). Clears the buffers and returns the norm before clipping. A norm
    /// that is not finite is returned without any update (parameters, moments and step count stay as they were).
    pub fn step(&mut self, lr: f64, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            return Ok(norm);
        }
        let grad_scale = match max_norm {
            Some(max) if max > 0.0 => (max / (norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let c = &self.cfg;
        for p in &self.params {
            let u = Update {
                lr: lr as f32,
                decay: if p.decay { c.weight_decay as f32 } else { 0.0 },
                grad_scale: grad_scale as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                corr1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
                corr2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            };
            let mut st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            match &mut *st {
                Moments::Host { .. } => {
                    drop(st);
                    p.var.as_tensor().inplace_op1(&HostUpdate { state: &p.state, u })?;
                }
                Moments::Device { m, v, acc } => device_update(&p.var, m, v, acc, &u)?,
            }
        }
        Ok(norm)
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            let st = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            let shape = p.var.shape();
            let (m, v) = match &*st {
                Moments::Host { m, v, .. } => {
                    (Tensor::from_slice(m, shape, p.var.device())?, Tensor::from_slice(v, shape, p.var.device())?)
                }
                Moments::Device { m, v, .. } => (m.clone(), v.clone()),
            };
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
        }
        Ok(out)
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &self.params {
            let mut guard = p.state.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.get(&key).ok_or_else(|| Error::invalid(format!("optimizer state has no {key}")))?;
                if t.elem_count() != p.var.elem_count() {
                    bail!("optimizer state {key} has {} values, the parameter {}", t.elem_count(), p.var.elem_count());
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (m_saved, v_saved) = (get("exp_avg")?, get("exp_avg_sq")?);
            match &mut *guard {
                Moments::Host { m, v, .. } => {
                    m.copy_from_slice(&m_saved.flatten_all()?.to_vec1::<f32>()?);
                    v.copy_from_slice(&v_saved.flatten_all()?.to_vec1::<f32>()?);
                }
                Moments::Device { m, v, .. } => {
                    *m = m_saved.reshape(p.var.shape())?.to_device(p.var.device())?;
                    *v = v_saved.reshape(p.var.shape())?.to_device(p.var.device())?;
                }
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
        for kernels in [Kernels::Fused, Kernels::Generic] {
            two_steps_match_torch_with(kernels);
        }
    }

    #[allow(clippy::excessive_precision)]
    fn two_steps_match_torch_with(kernels: Kernels) {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        let vars = vec![("w.weight".to_string(), p.clone()), ("w.bias".to_string(), b.clone())];
        let mut opt = AdamW::new(&vars, AdamWConfig { weight_decay: 0.1, ..Default::default() }, kernels).unwrap();
        for (g, gb) in [([0.5f32, -1.0, 2.0], [1.0f32]), ([0.1, 0.2, -0.3], [-2.0])] {
            // Gradients of sum(p * g) + sum(b * gb).
            let loss = ((p.as_tensor() * Tensor::new(&g, &dev).unwrap()).unwrap().sum_all().unwrap()
                + (b.as_tensor() * Tensor::new(&gb, &dev).unwrap()).unwrap().sum_all().unwrap())
            .unwrap();
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
        for kernels in [Kernels::Fused, Kernels::Generic] {
            clipping_with(kernels);
        }
    }

    fn clipping_with(kernels: Kernels) {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &dev).unwrap()).unwrap();
        let vars = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(&vars, AdamWConfig::default(), kernels).unwrap();
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
        let mut fresh = AdamW::new(&vars, AdamWConfig::default(), kernels).unwrap();
        fresh.load_state(&saved, opt.steps()).unwrap();
        assert_eq!(
            fresh.state_tensors().unwrap()[1].1.to_vec1::<f32>().unwrap(),
            saved["p.exp_avg_sq"].to_vec1::<f32>().unwrap()
        );
    }

    /// The tensor state (what CUDA runs) against the host state: ten steps with weight decay, clipping that
    /// applies in some steps, accumulation over two micro-batches, and a save/restore in the middle.
    #[test]
    fn device_state_equals_host_state() {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..24).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let run = |kernels: Kernels| -> Vec<f32> {
            let w = Var::from_tensor(&Tensor::from_slice(&init, (4, 6), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::from_slice(&init[..6], 6, &dev).unwrap()).unwrap();
            let vars = vec![("l.weight".to_string(), w.clone()), ("l.bias".to_string(), b.clone())];
            let cfg = AdamWConfig { weight_decay: 0.05, ..Default::default() };
            let mut opt = AdamW::new(&vars, cfg, kernels).unwrap();
            for step in 0..10 {
                for micro in 0..2 {
                    let g: Vec<f32> = (0..24)
                        .map(|i| (((i + 3 * step + micro) * 7919 % 23) as f32 - 11.0) / (3.0 + step as f32))
                        .collect();
                    let gw = Tensor::from_slice(&g, (4, 6), &dev).unwrap();
                    let gb = Tensor::from_slice(&g[..6], 6, &dev).unwrap();
                    let loss = ((w.as_tensor() * gw).unwrap().sum_all().unwrap()
                        + (b.as_tensor().sqr().unwrap() * gb).unwrap().sum_all().unwrap())
                    .unwrap();
                    opt.accumulate(&loss.backward().unwrap(), 0.5).unwrap();
                }
                opt.step(1e-2, Some(4.0)).unwrap();
                if step == 4 {
                    let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
                    let mut fresh = AdamW::new(&vars, cfg, kernels).unwrap();
                    fresh.load_state(&saved, opt.steps()).unwrap();
                    opt = fresh;
                }
            }
            let mut out: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            out.extend(b.as_tensor().to_vec1::<f32>().unwrap());
            out
        };
        let (host, device) = (run(Kernels::Fused), run(Kernels::Generic));
        let worst = host.iter().zip(&device).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-7, "largest difference {worst}");
        assert_ne!(host, init, "the weights moved");
    }

    /// `max_grad_norm` 0 is "no clipping" (TRL, transformers), not "scale every update to zero"; a non-finite gradient
    /// norm changes nothing.
    #[test]
    fn zero_max_norm_does_not_clip_and_a_non_finite_norm_does_not_step() {
        let dev = Device::Cpu;
        let step_with = |max_norm: Option<f64>, g: f32| -> (Vec<f32>, f64, u64) {
            let p = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev).unwrap()).unwrap();
            let mut opt = AdamW::new(&[("p".to_string(), p.clone())], AdamWConfig::default(), Kernels::Fused).unwrap();
            let loss = (p.as_tensor() * Tensor::new(&[3.0f32, g], &dev).unwrap()).unwrap().sum_all().unwrap();
            opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
            let norm = opt.step(0.1, max_norm).unwrap();
            (p.as_tensor().to_vec1().unwrap(), norm, opt.steps())
        };
        let (unclipped, zero) = (step_with(None, 4.0), step_with(Some(0.0), 4.0));
        assert_eq!(unclipped, zero);
        assert!((unclipped.0[0] - 0.9).abs() < 1e-5, "{unclipped:?}");
        let (weights, norm, steps) = step_with(Some(1.0), f32::NAN);
        assert!(norm.is_nan());
        assert_eq!((weights, steps), (vec![1.0, 2.0], 0), "no update");
    }
}
