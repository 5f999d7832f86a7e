//! bpo's own CUDA kernels, loaded from PTX compiled ahead of time: `kernels/dropout.cu` → `kernels/dropout.ptx`
//! (`scripts/make-ptx.sh`, dev-only; the PTX is checked in, so building with CUDA needs no extra step). The PTX is
//! for compute capability 7.5 without architecture-specific features, so the driver compiles it for any newer card
//! on first use.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout};

const DROPOUT_PTX: &str = include_str!("kernels/dropout.ptx");

/// Inverted dropout of a contiguous tensor with the mask of [`super::generic::keep`] for the keys `(k1, k2)`.
pub fn dropout(x: &CudaStorage, l: &Layout, p: f32, (k1, k2): (u32, u32)) -> candle_core::Result<CudaStorage> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("dropout: input must be contiguous") };
    let dev = &x.device;
    let scale = 1.0f32 / (1.0 - p);
    let n = u32::try_from(b - a).map_err(|_| candle_core::Error::Msg("dropout: tensor too large".into()))?;
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        kernel: &str,
        src: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        (a, b): (usize, usize),
        args: (u32, u32, u32, f32, f32),
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
        let (n, k1, k2, p, scale) = args;
        let func = dev.get_or_load_custom_func(kernel, "bpo_dropout", DROPOUT_PTX)?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(b - a)? };
        let src = src.slice(a..b);
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&n);
        builder.arg(&k1);
        builder.arg(&k2);
        builder.arg(&p);
        builder.arg(&scale);
        // A grid-stride loop: at most 65535 blocks of 256 threads cover any size.
        let blocks = n.div_ceil(256).clamp(1, 65_535);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel reads n elements of `src` and writes n elements of `out`, both of length n.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
    let args = (n, k1, k2, p, scale);
    let slice = match &x.slice {
        CudaStorageSlice::F32(s) => CudaStorageSlice::F32(launch(dev, "bpo_dropout_f32", s, (a, b), args)?),
        CudaStorageSlice::BF16(s) => CudaStorageSlice::BF16(launch(dev, "bpo_dropout_bf16", s, (a, b), args)?),
        CudaStorageSlice::F16(s) => CudaStorageSlice::F16(launch(dev, "bpo_dropout_f16", s, (a, b), args)?),
        _ => candle_core::bail!("dropout: unsupported dtype {:?}", x.dtype()),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}
