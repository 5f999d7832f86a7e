//! Peak memory of a stretch of work, measured inside the process: what `bpo bench train` and `bench generate` report.
//!
//! - On the CPU: the process's resident set (`VmRSS`, and its high-water mark `VmHWM`, which Linux lets a process
//!   reset through `/proc/self/clear_refs`), and, where the binary installs [`CountingAlloc`] as its global
//!   allocator (the `bpo` binary does), the live heap bytes and their peak, exact whatever the allocator keeps for
//!   reuse.
//! - On CUDA: the device's used memory (`cuMemGetInfo`), sampled every millisecond by a thread while the work runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::Device;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live bytes and their peak. Install it in a binary with
/// `#[global_allocator] static A: bpo::memory::CountingAlloc = bpo::memory::CountingAlloc;`.
pub struct CountingAlloc;

impl CountingAlloc {
    fn grew(by: u64) {
        let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            Self::grew(layout.size() as u64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            Self::grew(layout.size() as u64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            Self::grew(new_size as u64);
        }
        p
    }
}

/// Live heap bytes now, when [`CountingAlloc`] is the global allocator.
pub fn heap_live() -> Option<u64> {
    INSTALLED.load(Ordering::Relaxed).then(|| LIVE.load(Ordering::Relaxed))
}

/// Memory in use on `device` now: live heap bytes on the CPU (where [`CountingAlloc`] is installed), used device
/// memory on CUDA. The difference of two readings is what was allocated in between and kept.
pub fn in_use(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_used(d),
        _ => heap_live(),
    }
}

/// The process's resident set now (`VmRSS`), where `/proc` has it.
pub fn resident() -> Option<u64> {
    status_bytes("VmRSS")
}

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Hands freed heap memory back to the system and restarts the resident set's high-water mark from the current
/// resident set, so that the next peak belongs to the next piece of work only.
fn reset_resident_peak() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    // "5" resets the peak RSS (VmHWM) to the current RSS (Linux 4.0 and later); without it the peak is the process's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What [`Probe::finish`] measured, in bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryFigures {
    /// `cpu` (resident set) or `cuda` (device memory in use).
    pub device: &'static str,
    /// In use when the probe started: on the CPU the process's resident set (weights, optimizer state, code), on
    /// CUDA the device's used memory.
    pub baseline_bytes: u64,
    /// The most in use while the probe ran (resident-set high-water mark, or the largest sampled device use).
    pub peak_bytes: u64,
    /// `peak_bytes - baseline_bytes`: what the work itself needed at its peak.
    pub peak_growth_bytes: u64,
    /// Live heap bytes at the start and the heap's peak growth over them, where the counting allocator is installed
    /// (CPU storage only): exact, unlike the resident set, which keeps what the allocator holds for reuse.
    pub heap_baseline_bytes: Option<u64>,
    pub heap_peak_growth_bytes: Option<u64>,
}

/// Measures the peak memory between [`Probe::start`] and [`Probe::finish`].
pub struct Probe {
    device: Device,
    baseline: u64,
    heap_baseline: Option<u64>,
    #[cfg(feature = "cuda")]
    sampler: Option<(std::sync::Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

impl Probe {
    /// Starts measuring the memory of `device` (the CPU's resident set for a CPU device).
    pub fn start(device: &Device) -> Probe {
        reset_resident_peak();
        let heap_baseline = heap_live();
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let baseline = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => cuda_used(d).unwrap_or(0),
            _ => status_bytes("VmRSS").unwrap_or(0),
        };
        Probe {
            device: device.clone(),
            baseline,
            heap_baseline,
            #[cfg(feature = "cuda")]
            sampler: match device {
                Device::Cuda(d) => Some(cuda_sampler(d.clone(), baseline)),
                _ => None,
            },
        }
    }

    /// The figures since [`Probe::start`].
    pub fn finish(self) -> MemoryFigures {
        let heap_peak_growth = self.heap_baseline.map(|b| PEAK.load(Ordering::Relaxed).saturating_sub(b));
        #[cfg(feature = "cuda")]
        if let Some((stop, handle)) = self.sampler {
            stop.store(true, Ordering::Relaxed);
            let peak = handle.join().unwrap_or(self.baseline);
            return MemoryFigures {
                device: "cuda",
                baseline_bytes: self.baseline,
                peak_bytes: peak,
                peak_growth_bytes: peak.saturating_sub(self.baseline),
                heap_baseline_bytes: None,
                heap_peak_growth_bytes: None,
            };
        }
        let _ = &self.device;
        let peak = status_bytes("VmHWM").unwrap_or(0).max(self.baseline);
        MemoryFigures {
            device: "cpu",
            baseline_bytes: self.baseline,
            peak_bytes: peak,
            peak_growth_bytes: peak - self.baseline,
            heap_baseline_bytes: self.heap_baseline,
            heap_peak_growth_bytes: heap_peak_growth,
        }
    }
}

/// Device memory in use (total - free), as `nvidia-smi` counts it.
#[cfg(feature = "cuda")]
fn cuda_used(d: &candle_core::CudaDevice) -> Option<u64> {
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as u64)
}

/// A thread sampling the device's used memory every millisecond until told to stop; returns the largest sample.
#[cfg(feature = "cuda")]
fn cuda_sampler(
    d: candle_core::CudaDevice,
    baseline: u64,
) -> (std::sync::Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut peak = baseline;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(cuda_used(&d).unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        peak.max(cuda_used(&d).unwrap_or(0))
    });
    (stop, handle)
}

/// Bytes as GiB with two decimals, for tables.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_is_read_and_its_peak_covers_a_big_allocation() {
        let probe = Probe::start(&Device::Cpu);
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        // The resident set while the block lives. (Against the baseline the growth would depend on what the tests
        // running beside this one allocate and free meanwhile.)
        let during = status_bytes("VmRSS").unwrap();
        drop(block);
        let m = probe.finish();
        assert!(m.baseline_bytes > 0, "{m:?}");
        // The kernel syncs its per-thread RSS counters lazily: the two readings may differ by a few pages.
        assert!(
            m.peak_bytes + (1 << 20) >= during && during >= 64 << 20,
            "a 64 MiB block touched while probing ({during} bytes resident): {m:?}"
        );
    }
}
