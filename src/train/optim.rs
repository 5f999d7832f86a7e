//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW`, updating the parameters in place.
//!
//! Two kinds of state, chosen once with the run's [`Kernels`]. On the CPU in f32 ([`Kernels::Fused`]) the moments and
//! a gradient-accumulation buffer are plain `Vec<f32>`s allocated once per parameter and the parameter is rewritten
//! through an in-place op, so a step allocates nothing. Elsewhere ([`Kernels::Generic`]: CUDA, or bf16 compute) the
//! moments and the accumulation buffer of all parameters are three flat f32 tensors on the parameters' device, so a
//! step is a dozen whole-buffer kernels whatever the number of parameters (448 LoRA tensors in a 7B model), plus
//! one gather of the gradients per micro-batch and a gather and scatter of the parameters per step. There the
//! gradient norm, the clipping factor and the finiteness check stay on the device: the step returns the norm as a
//! tensor, to be read back with the step's metrics, and applies the update only where the norm and the guards
//! (the losses) are finite. Parameters are f32 master copies in both. Gradient clipping (by global norm, as
//! `clip_grad_norm_`) is folded into the update.

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

/// Moments and the gradient accumulation buffer of one parameter, on the host.
struct HostMoments {
    m: Vec<f32>,
    v: Vec<f32>,
    acc: Vec<f32>,
}

/// The optimizer state: per parameter on the host, or flat over all parameters on their device.
enum State {
    Host(Vec<Mutex<HostMoments>>),
    Flat {
        m: Tensor,
        v: Tensor,
        acc: Tensor,
        /// Weight decay of each element: the configured decay for decayed parameters, 0 elsewhere.
        decay: Tensor,
        /// Where each parameter starts in the flat buffers.
        offsets: Vec<usize>,
    },
}

struct Param {
    name: String,
    var: Var,
    /// transformers decays every weight except biases and norm weights.
    decay: bool,
}

pub struct AdamW {
    params: Vec<Param>,
    state: State,
    cfg: AdamWConfig,
    /// Steps taken (bias correction uses it).
    steps: u64,
}

/// The global gradient norm of a step, before clipping: a host value, or a scalar f32 tensor on the parameters'
/// device (not yet read back).
pub enum GradNorm {
    Host(f64),
    Device(Tensor),
}

impl GradNorm {
    /// The norm on the host (reading a device norm back).
    pub fn value(&self) -> Result<f64> {
        match self {
            GradNorm::Host(v) => Ok(*v),
            GradNorm::Device(t) => {
                Ok(f64::from(crate::model::runtime::read_back::<f32>(t)?.first().copied().unwrap_or(f32::NAN)))
            }
        }
    }
}

/// `acc[start..] += scale * cat(run)`, emptying `run`.
fn add_run(acc: &mut Tensor, start: usize, run: &mut Vec<Tensor>, scale: f64) -> Result<()> {
    if run.is_empty() {
        return Ok(());
    }
    let g = if run.len() == 1 { run.remove(0) } else { Tensor::cat(run, 0)? };
    run.clear();
    let len = g.elem_count();
    if start == 0 && len == acc.elem_count() {
        *acc = (&*acc + (g * scale)?)?;
    } else {
        let sum = (acc.narrow(0, start, len)? + (g * scale)?)?;
        acc.slice_set(&sum, 0, start)?;
    }
    Ok(())
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
    state: &'a Mutex<HostMoments>,
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
        let HostMoments { m, v, acc } = &mut *st;
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

impl AdamW {
    /// Takes (name, variable) pairs, each an f32 tensor (a master copy), all on one device. `kernels` chooses the
    /// state: [`Kernels::Fused`] host buffers (CPU only), [`Kernels::Generic`] flat tensors on the parameters'
    /// device.
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig, kernels: Kernels) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != DType::F32 {
                bail!("{name}: trainable weights must be f32 master copies, found {:?}", var.dtype());
            }
            if kernels == Kernels::Fused && !var.device().is_cpu() {
                bail!("{name}: the fused optimizer runs on the CPU only");
            }
            if !var.device().same_device(vars[0].1.device()) {
                bail!("{name}: trainable weights must all be on one device");
            }
            let decay = !(name.ends_with("bias") || name.contains("norm"));
            params.push(Param { name: name.clone(), var: var.clone(), decay });
        }
        let state = match kernels {
            Kernels::Fused => State::Host(
                params
                    .iter()
                    .map(|p| {
                        let n = p.var.elem_count();
                        Mutex::new(HostMoments { m: vec![0.0; n], v: vec![0.0; n], acc: vec![0.0; n] })
                    })
                    .collect(),
            ),
            Kernels::Generic => {
                let device = vars.first().map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
                let mut offsets = Vec::with_capacity(params.len());
                let mut decay = Vec::new();
                for p in &params {
                    offsets.push(decay.len());
                    let d = if p.decay { cfg.weight_decay as f32 } else { 0.0 };
                    decay.extend(std::iter::repeat_n(d, p.var.elem_count()));
                }
                let n = decay.len();
                // Three buffers of their own: the accumulation buffer is written in place.
                let zeros = || Tensor::zeros(n, DType::F32, &device);
                State::Flat {
                    m: zeros()?,
                    v: zeros()?,
                    acc: zeros()?,
                    decay: Tensor::from_vec(decay, n, &device)?,
                    offsets,
                }
            }
        };
        Ok(AdamW { params, state, cfg, steps: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adds `scale * gradient` of every parameter to its accumulation buffer. A parameter with no gradient (unused
    /// by this batch) adds nothing.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        match &mut self.state {
            State::Host(moments) => {
                for (p, st) in self.params.iter().zip(moments.iter()) {
                    let Some(g) = grads.get(p.var.as_tensor()) else { continue };
                    let mut st = st.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
                    let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
                    with_f32(&g, |g| {
                        for (a, &x) in st.acc.iter_mut().zip(g) {
                            *a += scale as f32 * x;
                        }
                    })?;
                }
            }
            State::Flat { acc, offsets, .. } => {
                // Runs of consecutive parameters that have a gradient (all of them in a plain backward pass, one
                // layer's with gradient checkpointing): one gather and one addition into the buffer per run.
                let mut run: Vec<Tensor> = Vec::new();
                let mut start = 0;
                for (i, p) in self.params.iter().enumerate() {
                    match grads.get(p.var.as_tensor()) {
                        Some(g) => {
                            if run.is_empty() {
                                start = offsets[i];
                            }
                            run.push(g.to_dtype(DType::F32)?.flatten_all()?);
                        }
                        None => add_run(acc, start, &mut run, scale)?,
                    }
                }
                add_run(acc, start, &mut run, scale)?;
            }
        }
        Ok(())
    }

    /// L2 norm of the accumulated gradients of all parameters together (read back from the device on the flat
    /// state: for tests and callers outside the step).
    pub fn grad_norm(&self) -> Result<f64> {
        match &self.state {
            State::Host(moments) => {
                let mut sq = 0f64;
                for st in moments {
                    let st = st.lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
                    sq += st.acc.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
                }
                Ok(sq.sqrt())
            }
            State::Flat { acc, .. } => Ok(f64::from(acc.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)),
        }
    }

    /// One AdamW step at learning rate `lr` with the accumulated gradients, clipped to global norm `max_norm`
    /// (as `clip_grad_norm_`: scaled by `max_norm / (norm + 1e-6)` when that is below 1; `max_norm` 0 means no
    /// clipping, as transformers' `max_grad_norm=0`). Clears the buffers and returns the norm before clipping.
    ///
    /// The update is applied only when the norm and every value in `guards` (scalars: the step's losses) are
    /// finite; otherwise parameters and moments stay as they were. The host state knows at once (the step count
    /// stays too); the flat state decides on the device, counts the step, and its caller learns of a non-finite
    /// norm when it reads [`GradNorm::Device`] back (a training run then stops).
    pub fn step(&mut self, lr: f64, max_norm: Option<f64>, guards: &[Tensor]) -> Result<GradNorm> {
        let clip = max_norm.filter(|&m| m > 0.0);
        let c = self.cfg;
        let t = self.steps as i32 + 1;
        let corr1 = (1.0 / (1.0 - c.beta1.powi(t))) as f32;
        let corr2_sqrt = (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32;
        let host_norm = match self.state {
            State::Host(_) => Some(self.grad_norm()?),
            State::Flat { .. } => None,
        };
        match &mut self.state {
            State::Host(moments) => {
                let norm = host_norm.unwrap_or(f64::NAN);
                let mut finite = norm.is_finite();
                for g in guards {
                    finite &= g.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
                }
                if !finite {
                    return Ok(GradNorm::Host(norm));
                }
                let grad_scale = clip.map_or(1.0, |max| (max / (norm + 1e-6)).min(1.0));
                self.steps += 1;
                for (p, st) in self.params.iter().zip(moments.iter()) {
                    let u = Update {
                        lr: lr as f32,
                        decay: if p.decay { c.weight_decay as f32 } else { 0.0 },
                        grad_scale: grad_scale as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        eps: c.eps as f32,
                        corr1,
                        corr2_sqrt,
                    };
                    p.var.as_tensor().inplace_op1(&HostUpdate { state: st, u })?;
                }
                Ok(GradNorm::Host(norm))
            }
            State::Flat { m, v, acc, decay, offsets } => {
                let norm = acc.sqr()?.sum_all()?.sqrt()?;
                // |x| <= f32::MAX is false for NaN and infinities; a sum is finite when every term is (the losses are
                // far from overflowing).
                let mut probe = norm.clone();
                for g in guards {
                    probe = (probe + g.to_dtype(DType::F32)?.sum_all()?)?;
                }
                let ok = probe.abs()?.le(f64::from(f32::MAX))?;
                let g = match clip {
                    Some(max) => {
                        let scale = Tensor::new(max as f32, norm.device())?.div(&(&norm + 1e-6)?)?.minimum(1f64)?;
                        acc.broadcast_mul(&scale)?
                    }
                    None => acc.clone(),
                };
                let old_p = Tensor::cat(
                    &self
                        .params
                        .iter()
                        .map(|p| p.var.as_tensor().flatten_all())
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    0,
                )?;
                // The host path's arithmetic, element for element.
                let factor = decay.affine(-(lr as f32) as f64, 1.0)?;
                let new_m = ((&*m * c.beta1 as f32 as f64)? + (&g * (1.0 - c.beta1 as f32) as f64)?)?;
                let new_v = ((&*v * c.beta2 as f32 as f64)? + ((&g * (1.0 - c.beta2 as f32) as f64)? * &g)?)?;
                let denom = ((new_v.sqrt()? * corr2_sqrt as f64)? + c.eps as f32 as f64)?;
                let step = ((&new_m * (lr as f32 * corr1) as f64)? / denom)?;
                let new_p = ((&old_p * factor)? - step)?;
                let keep = |new: &Tensor, old: &Tensor| ok.broadcast_as(new.shape())?.where_cond(new, old);
                let new_p = keep(&new_p, &old_p)?;
                *m = keep(&new_m, m)?;
                *v = keep(&new_v, v)?;
                for (p, &at) in self.params.iter().zip(offsets.iter()) {
                    let n = p.var.elem_count();
                    p.var.set(&new_p.narrow(0, at, n)?.reshape(p.var.shape())?)?;
                }
                *acc = acc.zeros_like()?;
                self.steps += 1;
                Ok(GradNorm::Device(norm))
            }
        }
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let shape = p.var.shape();
            let (m, v) = match &self.state {
                State::Host(moments) => {
                    let st = moments[i].lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
                    (
                        Tensor::from_slice(&st.m, shape, p.var.device())?,
                        Tensor::from_slice(&st.v, shape, p.var.device())?,
                    )
                }
                State::Flat { m, v, offsets, .. } => {
                    let n = p.var.elem_count();
                    (m.narrow(0, offsets[i], n)?.reshape(shape)?, v.narrow(0, offsets[i], n)?.reshape(shape)?)
                }
            };
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
        }
        Ok(out)
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let mut flat_m = Vec::new();
        let mut flat_v = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.get(&key).ok_or_else(|| Error::invalid(format!("optimizer state has no {key}")))?;
                if t.elem_count() != p.var.elem_count() {
                    bail!("optimizer state {key} has {} values, the parameter {}", t.elem_count(), p.var.elem_count());
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (m_saved, v_saved) = (get("exp_avg")?, get("exp_avg_sq")?);
            match &self.state {
                State::Host(moments) => {
                    let mut st = moments[i].lock().map_err(|_| Error::invalid("optimizer state poisoned"))?;
                    st.m.copy_from_slice(&m_saved.flatten_all()?.to_vec1::<f32>()?);
                    st.v.copy_from_slice(&v_saved.flatten_all()?.to_vec1::<f32>()?);
                }
                State::Flat { .. } => {
                    flat_m.push(m_saved.flatten_all()?.to_device(p.var.device())?);
                    flat_v.push(v_saved.flatten_all()?.to_device(p.var.device())?);
                }
            }
        }
        if let State::Flat { m, v, .. } = &mut self.state {
            if !flat_m.is_empty() {
                *m = Tensor::cat(&flat_m, 0)?;
                *v = Tensor::cat(&flat_v, 0)?;
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
            opt.step(0.01, None, &[]).unwrap();
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
        assert!((opt.grad_norm().unwrap() - 5.0).abs() < 1e-6);
        let norm = opt.step(0.1, Some(1.0), &[]).unwrap().value().unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
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
                opt.step(1e-2, Some(4.0), &[]).unwrap();
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
    /// norm or guard (the loss) changes nothing, on either state.
    #[test]
    fn zero_max_norm_does_not_clip_and_a_non_finite_norm_or_loss_does_not_step() {
        let dev = Device::Cpu;
        for kernels in [Kernels::Fused, Kernels::Generic] {
            let step_with = |max_norm: Option<f64>, g: f32, loss: f32| -> (Vec<f32>, f64, Vec<f32>) {
                let p = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev).unwrap()).unwrap();
                let mut opt = AdamW::new(&[("p".to_string(), p.clone())], AdamWConfig::default(), kernels).unwrap();
                let loss_t = (p.as_tensor() * Tensor::new(&[3.0f32, g], &dev).unwrap()).unwrap().sum_all().unwrap();
                opt.accumulate(&loss_t.backward().unwrap(), 1.0).unwrap();
                let guard = Tensor::new(&[loss], &dev).unwrap();
                let norm = opt.step(0.1, max_norm, &[guard]).unwrap().value().unwrap();
                let m = opt.state_tensors().unwrap()[0].1.to_vec1().unwrap();
                (p.as_tensor().to_vec1().unwrap(), norm, m)
            };
            let (unclipped, zero) = (step_with(None, 4.0, 1.0), step_with(Some(0.0), 4.0, 1.0));
            assert_eq!(unclipped, zero);
            assert!((unclipped.0[0] - 0.9).abs() < 1e-5, "{unclipped:?}");
            let (weights, norm, m) = step_with(Some(1.0), f32::NAN, 1.0);
            assert!(norm.is_nan());
            assert_eq!((weights, m), (vec![1.0, 2.0], vec![0.0, 0.0]), "{kernels:?}: no update on a NaN norm");
            let (weights, norm, m) = step_with(Some(1.0), 4.0, f32::INFINITY);
            assert!(norm.is_finite());
            assert_eq!((weights, m), (vec![1.0, 2.0], vec![0.0, 0.0]), "{kernels:?}: no update on an infinite loss");
        }
    }
}
