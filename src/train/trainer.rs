//! The training loop shared by DPO and supervised training: epochs of seeded example order, micro-batches with
//! gradient accumulation, clipping, AdamW, the learning-rate schedule, `metrics.jsonl`, checkpoints and resuming.
//!
//! Everything that decides a step (example order, dropout masks) derives from (seed, step), and a checkpoint holds
//! the weights, the optimizer moments and the step; so a run resumed from `checkpoint-N` continues exactly as
//! the uninterrupted run would have. A step whose loss or gradient norm is not finite stops the run before its
//! update: the last checkpoint stays the run's result ([`Error::NonFinite`]).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::checkpoint::{checkpoints, latest_checkpoint, logged_steps, truncate_metrics, write_dir_atomically};
use super::checkpoint::{OPTIMIZER, TRAINER_STATE};
use super::data::epoch_order;
use super::optim::{AdamW, AdamWConfig, GradNorm};
use super::schedule::{Schedule, ScheduleKind};
use super::trainable::{Trainable, MASTER_WEIGHTS};
use crate::hash::splitmix64;
use crate::jsonl::read_json;
use crate::output::write_json;
use crate::progress::Events;
use crate::{bail, Error, Result};

/// Optimisation settings (`bpo train` / `bpo sft` flags). [`LoopConfig::validate`] holds the accepted ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopConfig {
    /// Peak learning rate, > 0.
    pub lr: f64,
    pub schedule: ScheduleKind,
    /// Fraction of the steps spent warming up, in [0, 1].
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay, >= 0.
    pub weight_decay: f64,
    /// At least 1.
    pub epochs: usize,
    /// Examples per micro-batch, at least 1.
    pub batch_size: usize,
    /// Micro-batches per optimizer step, at least 1.
    pub grad_accum: usize,
    /// Clip gradients to this global L2 norm, >= 0; None or 0 = no clipping (as TRL's and transformers'
    /// `max_grad_norm=0`).
    pub max_grad_norm: Option<f64>,
    /// Write `checkpoint-N` every this many steps.
    pub save_steps: Option<usize>,
    pub seed: u64,
}

impl Default for LoopConfig {
    /// BPO's released recipe (per device).
    fn default() -> Self {
        LoopConfig {
            lr: 2e-6,
            schedule: ScheduleKind::Cosine,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            epochs: 2,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: None,
            save_steps: None,
            seed: 0,
        }
    }
}

impl LoopConfig {
    /// Refuses values outside the ranges documented on the fields (NaN included), naming the option.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let counts = format!("{}, {}, {}", c.epochs, c.batch_size, c.grad_accum);
        let checks = [
            (c.lr > 0.0 && c.lr.is_finite(), "the learning rate must be a finite number > 0", c.lr.to_string()),
            ((0.0..=1.0).contains(&c.warmup_ratio), "the warm-up ratio must lie in [0, 1]", c.warmup_ratio.to_string()),
            (
                c.weight_decay >= 0.0 && c.weight_decay.is_finite(),
                "the weight decay must be a finite number >= 0",
                c.weight_decay.to_string(),
            ),
            (
                c.max_grad_norm.is_none_or(|m| m >= 0.0 && m.is_finite()),
                "the gradient-clipping norm must be a finite number >= 0 (0 = no clipping)",
                format!("{:?}", c.max_grad_norm),
            ),
            (
                c.epochs >= 1 && c.batch_size >= 1 && c.grad_accum >= 1,
                "epochs, batch size and gradient accumulation must be at least 1",
                counts,
            ),
        ];
        match checks.into_iter().find(|(ok, ..)| !ok) {
            Some((_, rule, got)) => bail!("{rule}, got {got}"),
            None => Ok(()),
        }
    }
}

/// Metrics of one micro-batch: named means over its examples, computed where the model runs and read back once
/// per step with the other micro-batches' and the gradient norm ([`train_loop`]); plus counts.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub names: Vec<&'static str>,
    /// (names.len(),) f32, without graph; `names[0]` is `"loss"`, which must be finite for the step to apply.
    pub values: Tensor,
    pub examples: usize,
    /// Non-padding token positions run through the policy.
    pub tokens: usize,
}

impl Metrics {
    /// Named values from scalar tensors (any shape of one element, any float dtype), the loss first.
    pub fn new(named: &[(&'static str, &Tensor)], examples: usize, tokens: usize) -> Result<Self> {
        let values = named
            .iter()
            .map(|(_, t)| t.detach().to_dtype(candle_core::DType::F32)?.reshape(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Metrics { names: named.iter().map(|n| n.0).collect(), values: Tensor::cat(&values, 0)?, examples, tokens })
    }

    /// The loss, as a tensor (for the optimizer's finiteness guard).
    fn loss(&self) -> Result<Tensor> {
        Ok(self.values.narrow(0, 0, 1)?)
    }
}

/// A micro-batch's metrics once read back: (name, value) pairs and counts.
#[derive(Debug, Clone, Default)]
pub struct ReadMetrics {
    pub values: Vec<(&'static str, f64)>,
    pub examples: usize,
    pub tokens: usize,
}

/// A training objective: forward and backward of a micro-batch.
pub trait Objective {
    /// Number of training examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forward pass on examples `batch` (indices), backward of the loss times `weight` into `opt`'s buffers.
    /// `seed` seeds this micro-batch's dropout.
    fn micro_step(&mut self, batch: &[usize], weight: f64, seed: u64, opt: &mut AdamW) -> Result<Metrics>;
}

/// One optimizer step's record: a line of `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct StepLog {
    /// 1-based, as transformers' `global_step`.
    pub step: usize,
    pub total: usize,
    pub values: Map<String, Value>,
}

impl StepLog {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }
}

/// The caller's hand on a run: sees every step's record and may stop the run after it (a checkpoint is saved, as on
/// SIGINT), which the run's [`Events`] sink cannot. What a user is shown goes to the sink.
pub trait Hooks {
    /// `false` stops the run after this step.
    fn on_step(&mut self, _log: &StepLog) -> bool {
        true
    }
}

pub use crate::progress::Silent;

/// Runs to the end.
impl Hooks for Silent {}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct LoopSummary {
    pub start_step: usize,
    pub steps_done: usize,
    pub total_steps: usize,
    /// Stopped early (SIGINT or a hook) after saving `checkpoint-N`.
    pub interrupted: bool,
    pub last: Option<StepLog>,
}

/// Optimizer steps of one epoch: micro-batches of `batch_size`, `grad_accum` of them per step.
pub fn steps_per_epoch(n: usize, batch_size: usize, grad_accum: usize) -> usize {
    n.div_ceil(batch_size.max(1)).div_ceil(grad_accum.max(1))
}

/// Keeps freed activation buffers in the heap for reuse. glibc hands allocations above a (at most 32 MiB) threshold
/// back to the kernel on free, so every step would fault in and zero its activations afresh: about a tenth of a
/// step's time. Process-wide; set once.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes allocator tuning parameters.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

/// Runs the loop in `run` (a folder). With `resume`, starts from the newest `checkpoint-N` there. Reports the stage
/// `training` (one unit a step) and every step's metrics to `events`.
#[allow(clippy::too_many_arguments)] // the run, its folder, how it starts and stops, who watches it
pub fn train_loop(
    obj: &mut dyn Objective,
    trainable: &Trainable,
    cfg: &LoopConfig,
    run: &Path,
    resume: bool,
    stop: Option<&AtomicBool>,
    hooks: &mut dyn Hooks,
    events: &dyn Events,
) -> Result<LoopSummary> {
    cfg.validate()?;
    let n = obj.len();
    if n == 0 {
        bail!("no training examples left");
    }
    keep_freed_memory();
    let per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.grad_accum);
    let total = per_epoch * cfg.epochs;
    let schedule = Schedule::new(cfg.schedule, cfg.lr, cfg.warmup_ratio, total);
    let vars = trainable.vars();
    let mut opt =
        AdamW::new(&vars, AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() }, trainable.kernels)?;
    let start = if resume { restore(run, trainable, &mut opt, cfg.seed, events)? } else { 0 };
    let metrics_path = run.join("metrics.jsonl");
    truncate_metrics(&metrics_path, start)?;
    let mut metrics_file = crate::output::open_append(&metrics_path)?;
    events.stage("training", Some(total as u64));
    events.advance(start as u64);
    let mut summary =
        LoopSummary { start_step: start, steps_done: 0, total_steps: total, interrupted: false, last: None };
    let mut order = (usize::MAX, Vec::new());
    for step in start..total {
        let epoch = step / per_epoch;
        if order.0 != epoch {
            order = (epoch, epoch_order(n, cfg.seed, epoch));
        }
        let micro = micro_batches(&order.1, step % per_epoch, cfg);
        let in_step: usize = micro.iter().map(|m| m.len()).sum();
        let started = Instant::now();
        let mut parts = Vec::with_capacity(micro.len());
        for (i, batch) in micro.iter().enumerate() {
            let seed = splitmix64(cfg.seed ^ splitmix64((step * 1024 + i) as u64 + 1));
            parts.push(obj.micro_step(batch, batch.len() as f64 / in_step as f64, seed, &mut opt)?);
        }
        let lr = schedule.lr(step);
        // The update applies only if the losses and the gradient norm are finite (decided where the model runs);
        // then one read brings every metric and the norm back, and a non-finite one stops the run.
        let losses = parts.iter().map(Metrics::loss).collect::<Result<Vec<_>>>()?;
        let norm = opt.step(lr, cfg.max_grad_norm, &losses)?;
        let (parts, grad_norm) = read_step(&parts, norm)?;
        let loss = parts.iter().flat_map(|p| &p.values).find(|(name, v)| *name == "loss" && !v.is_finite());
        if let Some((_, v)) = loss {
            return Err(non_finite(run, step + 1, &format!("the loss is {v}")));
        }
        if !grad_norm.is_finite() {
            return Err(non_finite(run, step + 1, &format!("the gradient norm is {grad_norm}")));
        }
        let log = step_log(step + 1, total, per_epoch, &parts, lr, grad_norm, started.elapsed().as_secs_f64());
        writeln!(metrics_file, "{}", Value::Object(log.values.clone()))
            .and_then(|_| metrics_file.flush())
            .map_err(|e| Error::io(&metrics_path, e))?;
        summary.steps_done += 1;
        events.step(&log.values);
        let go_on = hooks.on_step(&log);
        summary.last = Some(log);
        let stopping = !go_on || stop.is_some_and(|s| s.load(Ordering::SeqCst));
        if stopping || cfg.save_steps.is_some_and(|k| k > 0 && (step + 1) % k == 0) {
            save_checkpoint(run, step + 1, total, per_epoch, cfg.seed, trainable, &opt)?;
        }
        if stopping && step + 1 < total {
            summary.interrupted = true;
            events.end_stage();
            return Ok(summary);
        }
    }
    events.end_stage();
    check_weights(run, total, trainable)?;
    trainable.save(run)?;
    Ok(summary)
}

/// The micro-batches of an epoch's step `step` (0-based within the epoch): `grad_accum` slices of `batch_size`
/// examples of the epoch's `order`, the last ones shorter at the epoch's end.
fn micro_batches<'a>(order: &'a [usize], step: usize, cfg: &LoopConfig) -> Vec<&'a [usize]> {
    let (n, first) = (order.len(), step * cfg.grad_accum);
    (first..(first + cfg.grad_accum).min(n.div_ceil(cfg.batch_size)))
        .map(|m| &order[m * cfg.batch_size..((m + 1) * cfg.batch_size).min(n)])
        .collect()
}

/// The step's metrics and gradient norm on the host: one read back for all of them.
fn read_step(parts: &[Metrics], norm: GradNorm) -> Result<(Vec<ReadMetrics>, f64)> {
    let mut all: Vec<Tensor> = parts.iter().map(|p| p.values.clone()).collect();
    if let GradNorm::Device(t) = &norm {
        all.push(t.to_dtype(candle_core::DType::F32)?.reshape(1)?);
    }
    let read = crate::model::runtime::read_back::<f32>(&Tensor::cat(&all, 0)?)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let values = p.names.iter().zip(&read[at..at + p.names.len()]).map(|(n, &v)| (*n, f64::from(v))).collect();
        at += p.names.len();
        out.push(ReadMetrics { values, examples: p.examples, tokens: p.tokens });
    }
    let grad_norm = match norm {
        GradNorm::Host(v) => v,
        GradNorm::Device(_) => read.get(at).map_or(f64::NAN, |&v| f64::from(v)),
    };
    Ok((out, grad_norm))
}

/// The error that stops a run at `step` (1-based) on a non-finite `what`, naming the run's result: its last checkpoint.
fn non_finite(run: &Path, step: usize, what: &str) -> Error {
    let result = match latest_checkpoint(run) {
        Ok(Some((_, dir))) => format!("the last good checkpoint, {}, is the run's result", dir.display()),
        _ => "no checkpoint was saved before it (--save-steps N keeps one every N steps)".into(),
    };
    Error::NonFinite(format!("training diverged at step {step}: {what}; stopped without applying the step or writing a final model; {result}"))
}

/// Refuses to save weights that are not finite (an update that overflowed), naming the first such tensor.
fn check_weights(run: &Path, step: usize, trainable: &Trainable) -> Result<()> {
    match trainable.first_non_finite()? {
        Some(name) => Err(non_finite(run, step, &format!("after its update {name} holds a NaN or infinity"))),
        None => Ok(()),
    }
}

/// Merges micro-batch metrics (means weighted by examples) into a `metrics.jsonl` record with transformers'
/// and TRL's names.
fn step_log(
    step: usize,
    total: usize,
    per_epoch: usize,
    parts: &[ReadMetrics],
    lr: f64,
    grad_norm: f64,
    seconds: f64,
) -> StepLog {
    let examples: usize = parts.iter().map(|p| p.examples).sum();
    let tokens: usize = parts.iter().map(|p| p.tokens).sum();
    let mut values = Map::new();
    values.insert("step".into(), json!(step));
    values.insert("epoch".into(), json!(step as f64 / per_epoch as f64));
    if let Some(first) = parts.first() {
        for (i, (name, _)) in first.values.iter().enumerate() {
            let sum: f64 = parts.iter().map(|p| p.values.get(i).map_or(0.0, |v| v.1) * p.examples as f64).sum();
            values.insert((*name).into(), json!(sum / examples.max(1) as f64));
        }
    }
    values.insert("learning_rate".into(), json!(lr));
    values.insert("grad_norm".into(), json!(grad_norm));
    values.insert("num_tokens".into(), json!(tokens));
    values.insert("step_seconds".into(), json!(seconds));
    values.insert("tokens_per_second".into(), json!(tokens as f64 / seconds.max(1e-9)));
    StepLog { step, total, values }
}

/// Writes `run/checkpoint-{step}`: weights, optimizer moments, trainer state.
fn save_checkpoint(
    run: &Path,
    step: usize,
    total: usize,
    per_epoch: usize,
    seed: u64,
    trainable: &Trainable,
    opt: &AdamW,
) -> Result<()> {
    check_weights(run, step, trainable)?;
    write_dir_atomically(&run.join(format!("checkpoint-{step}")), |dir| {
        trainable.save(dir)?;
        if !trainable.full.is_empty() {
            let masters: Vec<(String, candle_core::Tensor)> =
                trainable.full.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            crate::model::load::save_safetensors(&dir.join(MASTER_WEIGHTS), &masters)?;
        }
        crate::model::load::save_safetensors(&dir.join(OPTIMIZER), &opt.state_tensors()?)?;
        let state = json!({
            "global_step": step, "total_steps": total, "steps_per_epoch": per_epoch, "epoch": step as f64 / per_epoch as f64,
            "optimizer_steps": opt.steps(), "seed": seed,
            "data_order": "permutation of the examples seeded by (seed, epoch); dropout seeded by (seed, step)",
        });
        write_json(&dir.join(TRAINER_STATE), &state)
    })
}

/// Loads the newest readable checkpoint of `run` into the weights and the optimizer; returns its step. One that cannot
/// be read (torn, truncated, non-finite, another seed) is skipped, with a warning, for the one before it. A run that
/// never finished a step (it failed before, or was killed during, step 1) starts at step 0.
fn restore(run: &Path, trainable: &Trainable, opt: &mut AdamW, seed: u64, events: &dyn Events) -> Result<usize> {
    let found = checkpoints(run)?;
    if found.is_empty() && logged_steps(run) == 0 {
        return Ok(0);
    }
    for (step, dir) in found {
        match restore_from(&dir, step, trainable, opt, seed) {
            Ok(()) => return Ok(step),
            Err(e) => {
                events.message(&format!("warning: --resume: skipping {}, which cannot be used: {e}", dir.display()))
            }
        }
    }
    bail!(
        "--resume: {} has no usable checkpoint-N folder (--save-steps N writes one every N steps); delete it or choose another --out to start again",
        run.display()
    )
}

fn restore_from(dir: &Path, step: usize, trainable: &Trainable, opt: &mut AdamW, seed: u64) -> Result<()> {
    let state: Value = read_json(&dir.join(TRAINER_STATE))?;
    if state.get("seed").and_then(Value::as_u64) != Some(seed) {
        bail!("it was made with seed {}, not {seed}", state["seed"]);
    }
    trainable.restore(dir)?;
    if let Some(name) = trainable.first_non_finite()? {
        bail!("{name} holds a NaN or infinity");
    }
    let path = dir.join(OPTIMIZER);
    crate::model::load::check_finite_file(&path)?;
    let moments = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.clone(), msg: e.to_string() })?;
    // `{name}.exp_avg` and `{name}.exp_avg_sq`, the name in today's spelling (older checkpoints used another).
    let moments = moments
        .into_iter()
        .map(|(key, t)| match key.rsplit_once('.') {
            Some((name, moment)) => {
                (format!("{}.{moment}", crate::model::peft::current_name(name, trainable.is_llava)), t)
            }
            None => (key, t),
        })
        .collect();
    let steps = state.get("optimizer_steps").and_then(Value::as_u64).unwrap_or(step as u64);
    opt.load_state(&moments, steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_count_partial_batches() {
        assert_eq!(steps_per_epoch(16, 4, 1), 4);
        assert_eq!(steps_per_epoch(17, 4, 1), 5);
        assert_eq!(steps_per_epoch(17, 4, 2), 3);
        assert_eq!(steps_per_epoch(3, 4, 4), 1);
    }

    #[test]
    fn loop_config_ranges_are_checked() {
        assert!(LoopConfig::default().validate().is_ok());
        assert!(LoopConfig { max_grad_norm: Some(0.0), warmup_ratio: 1.0, ..Default::default() }.validate().is_ok());
        let bad = [
            LoopConfig { lr: f64::NAN, ..Default::default() },
            LoopConfig { lr: -1.0, ..Default::default() },
            LoopConfig { warmup_ratio: 2.0, ..Default::default() },
            LoopConfig { weight_decay: -0.1, ..Default::default() },
            LoopConfig { max_grad_norm: Some(-1.0), ..Default::default() },
            LoopConfig { grad_accum: 0, ..Default::default() },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn micro_batch_metrics_merge_by_examples() {
        let a = ReadMetrics { values: vec![("loss", 1.0)], examples: 3, tokens: 30 };
        let b = ReadMetrics { values: vec![("loss", 3.0)], examples: 1, tokens: 10 };
        let log = step_log(2, 4, 2, &[a, b], 0.5, 2.0, 1.0);
        assert_eq!(log.get("loss"), Some(1.5));
        assert_eq!(log.get("epoch"), Some(1.0));
        assert_eq!(log.get("num_tokens"), Some(40.0));
        assert_eq!(log.get("tokens_per_second"), Some(40.0));
    }
}
