//! LoRA dropout masks drawn on the device from a counter-based hash, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::*;

/// lowbias32 (C. Wellons' integer hash): every input bit affects every output bit.
#[inline]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The two 32-bit keys of a 64-bit mask seed, as the kernels take them.
fn keys(seed: u64) -> (u32, u32) {
    (mix32(seed as u32), mix32((seed >> 32) as u32 ^ 0x9e37_79b9))
}

/// Whether dropout keeps element `i` of the mask drawn from `keys` at drop probability `p`: a uniform draw in
/// [0, 1) from 24 bits of `mix32(mix32(i + k1) ^ k2)`, kept when it is at least `p`. The CUDA kernel
/// (`kernels/dropout.cu`) computes the same.
#[inline]
pub fn keep(i: u32, (k1, k2): (u32, u32), p: f32) -> bool {
    let u = (mix32(mix32(i.wrapping_add(k1)) ^ k2) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// Backends that draw dropout masks on the device.
pub trait DropoutStorage: BackendStorage {
    /// Inverted dropout of a contiguous tensor: element i zeroed unless [`keep`], the rest scaled by `1 / (1 - p)`
    /// (computed in f32, rounded once to the dtype).
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self>;
}

fn dropout_slice<T: candle_core::WithDType>(x: &[T], p: f32, seed: u64) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let (k, scale) = (keys(seed), 1.0 / (1.0 - p));
    let mut out = vec![T::zero(); x.len()];
    // Branch-free (a select, not a conditional store), so that the hash and the scaling vectorise.
    let fill = |c: usize, chunk: &mut [T]| {
        let first = c * CHUNK;
        for (j, (o, v)) in chunk.iter_mut().zip(&x[first..]).enumerate() {
            let y = T::from_f64((v.to_f64() as f32 * scale) as f64);
            *o = if keep((first + j) as u32, k, p) { y } else { T::zero() };
        }
    };
    // Threads only where there is enough work to pay for them.
    if x.len() <= CHUNK {
        fill(0, &mut out);
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| fill(c, chunk));
    }
    out
}

impl DropoutStorage for CpuStorage {
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("dropout: input must be contiguous") };
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(dropout_slice(&v[a..b], p, seed)),
            CpuStorage::BF16(v) => CpuStorage::BF16(dropout_slice(&v[a..b], p, seed)),
            CpuStorage::F16(v) => CpuStorage::F16(dropout_slice(&v[a..b], p, seed)),
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        })
    }
}

#[cfg(feature = "cuda")]
impl DropoutStorage for CudaStorage {
    fn dropout(&self, l: &Layout, p: f32, seed: u64) -> R<Self> {
        crate::model::cuda_kernels::dropout(self, l, p, keys(seed))
    }
}

#[cfg(not(feature = "cuda"))]
impl DropoutStorage for CudaStorage {
    fn dropout(&self, _: &Layout, _: f32, _: u64) -> R<Self> {
        candle_core::bail!("this bpo was built without CUDA")
    }
}

/// Inverted dropout with the mask drawn from `seed` on `x`'s device ([`keep`]). The backward pass applies the
/// same mask to the gradient (dropout is its own adjoint), drawing it again rather than keeping it.
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> R<(CpuStorage, Shape)> {
        Ok((x.dropout(xl, self.p, self.seed)?, xl.shape().clone()))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> R<(CudaStorage, Shape)> {
        Ok((x.dropout(xl, self.p, self.seed)?, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}
