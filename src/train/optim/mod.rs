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
use candle_core::{DType, Tensor, Var};

use crate::model::Kernels;

mod flat;
mod host;

use crate::{bail, Error, Result};
use flat::Flat;
use host::{with_f32, HostMoments, Update};

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

/// The optimizer state: per parameter on the host, or flat over all parameters on their device.
enum State {
    Host(Vec<Mutex<HostMoments>>),
    Flat(Flat),
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
                State::Flat(Flat {
                    m: zeros()?,
                    v: zeros()?,
                    acc: zeros()?,
                    decay: Tensor::from_vec(decay, n, &device)?,
                    offsets,
                })
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
            State::Flat(Flat { acc, offsets, .. }) => {
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
            State::Flat(Flat { acc, .. }) => Ok(f64::from(acc.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)),
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
        let u = Update {
            lr: lr as f32,
            decay: c.weight_decay as f32,
            grad_scale: 1.0,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            corr1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
            corr2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
        };
        let host_norm = match self.state {
            State::Host(_) => Some(self.grad_norm()?),
            State::Flat(_) => None,
        };
        match &mut self.state {
            State::Host(moments) => {
                let norm = host_norm.unwrap_or(f64::NAN);
                if host::step(&self.params, moments, u, norm, clip, guards)? {
                    self.steps += 1;
                }
                Ok(GradNorm::Host(norm))
            }
            State::Flat(flat) => {
                let norm = flat.step(&self.params, u, clip, guards)?;
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
                State::Flat(Flat { m, v, offsets, .. }) => {
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
                State::Flat(_) => {
                    flat_m.push(m_saved.flatten_all()?.to_device(p.var.device())?);
                    flat_v.push(v_saved.flatten_all()?.to_device(p.var.device())?);
                }
            }
        }
        if let State::Flat(Flat { m, v, .. }) = &mut self.state {
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
