//! Where and in which precision a model runs, decided once (at the CLI edge, or by a library caller) and carried by
//! loading, generation, scoring, bootstrapping, training and evaluation.
//!
//! The ops path follows from it, also once: f32 on the CPU uses the fused kernels of [`super::fused`] for the
//! training graph; every other combination (CUDA, bf16/f16 anywhere) uses candle's device-generic differentiable
//! ops. Tests force the generic path on the CPU ([`Runtime::generic`]) so that what CUDA runs is pinned down
//! without a GPU.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, WithDType};

use crate::{Error, Result};

thread_local! {
    static HOST_READS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The values of `t`, flattened, on the host: the way the training and decoding loops read a tensor back. Off the
/// CPU it is a device-to-host copy that waits for the device to finish, so the loops do it as rarely as they can;
/// every call is counted with its bytes ([`host_reads`], [`host_read_bytes`]), and tests bound them per step.
pub fn read_back<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    HOST_READS.with(|n| n.set((n.get().0 + 1, n.get().1 + bytes)));
    Ok(t.flatten_all()?.to_vec1()?)
}

/// Calls of [`read_back`] so far on this thread (a model runs on the thread that calls it).
pub fn host_reads() -> u64 {
    HOST_READS.with(Cell::get).0
}

/// Bytes read back by [`read_back`] so far on this thread.
pub fn host_read_bytes() -> u64 {
    HOST_READS.with(Cell::get).1
}

/// Which implementation the differentiable ops (attention softmax, norms, rotary embedding) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The fused f32 CPU kernels with analytic backward passes ([`super::fused`]).
    Fused,
    /// Compositions of candle's ops: any device, any float dtype.
    Generic,
}

/// Device, compute dtype and the ops path that follows from them.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    /// Dtype of the frozen weights and the activations. Trainable weights stay f32 (master copies) whatever this is.
    pub dtype: DType,
    pub kernels: Kernels,
}

/// Fixes the number of CPU threads candle's matmuls and the fused kernels use: `threads`, or (None) what candle
/// would pick itself (`RAYON_NUM_THREADS` when set, else one per physical core). Call it first thing in `main`, and
/// again only while no other thread runs (it sets an environment variable); the `bpo` binary does (`--threads`,
/// and `bpo demo` to share the threads among its `--jobs`).
///
/// Why: candle reads `RAYON_NUM_THREADS` at every matmul and, when it is unset, counts the physical cores by parsing
/// `/proc/cpuinfo` again each time. For a small model that parse is most of the step: `bpo bench train --size tiny`
/// took 0.041-0.046 s per step without the variable and 0.020-0.021 s with it set to the same two threads
/// (2026-12-02, this project's 2-core VM, idle).
pub fn set_cpu_threads(threads: Option<usize>) -> usize {
    let n = threads.filter(|&n| n > 0).unwrap_or_else(candle_core::utils::get_num_threads);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle's elementwise ops run on a pool whose workers spin for about a millisecond after each op before they
    // sleep, holding a core the next op's threads need: on 2 cores, 14% of a generation run's samples were that spin
    // (perf), and batch-1 decoding of the small model went from 275 to 328 tokens/s without it (2026-12-06, this
    // VM). A value the user set is kept.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    n
}

/// The CPU threads candle's matmuls use now.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

impl PartialEq for Runtime {
    fn eq(&self, other: &Self) -> bool {
        self.device.same_device(&other.device) && self.dtype == other.dtype && self.kernels == other.kernels
    }
}

impl Default for Runtime {
    /// f32 on the CPU.
    fn default() -> Self {
        Runtime::new(Device::Cpu, DType::F32)
    }
}

impl Runtime {
    /// `dtype` on `device`, with the fused kernels where they apply (f32 on the CPU).
    pub fn new(device: Device, dtype: DType) -> Self {
        let kernels = if device.is_cpu() && dtype == DType::F32 { Kernels::Fused } else { Kernels::Generic };
        Runtime { device, dtype, kernels }
    }

    /// The device-generic ops path on any device: what CUDA runs, for tests on the CPU.
    pub fn generic(device: Device, dtype: DType) -> Self {
        Runtime { device, dtype, kernels: Kernels::Generic }
    }

    /// From command-line spellings: `device` is `cpu`, `cuda` or `cuda:N` (default: CUDA device 0 when this build
    /// has CUDA and a GPU answers, else the CPU); `dtype` defaults to bf16 on a GPU and f32 on the CPU.
    pub fn resolve(device: Option<&str>, dtype: Option<DType>) -> Result<Self> {
        let device = match device {
            Some(spec) => parse_device(spec)?,
            None => default_device(),
        };
        let dtype = dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::BF16 });
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::invalid(format!("--dtype {dtype:?}: use f32, bf16 or f16")));
        }
        Ok(Runtime::new(device, dtype))
    }

    /// `cpu`, `cuda:N`, plus the dtype: how logs and reports name the runtime.
    pub fn describe(&self) -> String {
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => format!("cpu {dtype}"),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id} {dtype}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id} {dtype}"),
        }
    }
}

/// `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec.trim().to_ascii_lowercase().as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(Error::invalid(format!("--device {spec:?}: use cpu, cuda or cuda:N"))),
        },
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal).map_err(|e| {
        Error::invalid(format!("--device cuda:{ordinal}: no usable GPU ({})", first_line(&e.to_string())))
    })?;
    without_event_tracking(&device);
    Ok(device)
}

/// Environment variable that keeps cudarc's event tracking on (`1`), for A/B benchmarks.
pub const EVENT_TRACKING_ENV: &str = "BPO_CUDA_EVENT_TRACKING";

/// Turns off cudarc's event tracking on a new CUDA device (unless [`EVENT_TRACKING_ENV`] is `1`): with it on, every
/// allocation records two CUDA events so that tensors can be shared across streams. bpo runs all of a device's work
/// on one thread and so one stream (candle's per-thread stream): the events buy nothing and cost on every
/// allocation, most at batch-1 decoding. Must run before any tensor is made on the device.
#[cfg(feature = "cuda")]
fn without_event_tracking(device: &Device) {
    if std::env::var(EVENT_TRACKING_ENV).as_deref() == Ok("1") {
        return;
    }
    if let Device::Cuda(d) = device {
        // SAFETY: bpo uses each CUDA device from one thread (one stream), so no tensor crosses streams.
        unsafe { d.disable_event_tracking() };
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::invalid(format!(
        "--device cuda:{ordinal}: this bpo was built without CUDA; build it with scripts/build-cuda.sh (docs/gpu.md)"
    )))
}

#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// CUDA device 0 when this build has CUDA and a GPU answers, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        without_event_tracking(&d);
        return d;
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_follow_device_and_dtype() {
        assert_eq!(Runtime::new(Device::Cpu, DType::F32).kernels, Kernels::Fused);
        assert_eq!(Runtime::new(Device::Cpu, DType::BF16).kernels, Kernels::Generic);
        assert_eq!(Runtime::generic(Device::Cpu, DType::F32).kernels, Kernels::Generic);
        let rt = Runtime::resolve(Some("cpu"), None).unwrap();
        assert!(rt.device.is_cpu() && rt.dtype == DType::F32);
        assert_eq!(Runtime::resolve(Some("CPU"), Some(DType::BF16)).unwrap().describe(), "cpu bf16");
    }

    #[test]
    fn bad_devices_are_one_clear_line() {
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("built without CUDA") && !err.contains('\n'), "{err}");
        }
    }
}
