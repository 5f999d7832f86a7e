//! The kernels compiled for AVX-512 and for AVX2 + FMA (entry points with the features enabled, so the generic
//! bodies inline with them).
use std::arch::x86_64::*;

use super::kernels::{attend_block, products, Attend, Lanes, Operands};
use super::SeqSpan;

#[derive(Clone, Copy)]
pub(super) struct V16(__m512);

impl Lanes for V16 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        V16(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        V16(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        V16(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        V16(_mm512_fmadd_ps(a.0, b.0, self.0))
    }
    /// Halves added: 512 to 256 bits, 256 to 128, then lanes (0, 2) and (1, 3), then those two.
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        Self::sum4(self, self, self, self)[0]
    }
    #[inline(always)]
    unsafe fn sum4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4] {
        // [a.lo256 + a.hi256 | b.lo256 + b.hi256], the same for c and d.
        let ab =
            _mm512_add_ps(_mm512_shuffle_f32x4(a.0, b.0, 0b01_00_01_00), _mm512_shuffle_f32x4(a.0, b.0, 0b11_10_11_10));
        let cd =
            _mm512_add_ps(_mm512_shuffle_f32x4(c.0, d.0, 0b01_00_01_00), _mm512_shuffle_f32x4(c.0, d.0, 0b11_10_11_10));
        // [a4 | b4 | c4 | d4]: each 256-bit half folded to 128.
        let q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0b10_00_10_00), _mm512_shuffle_f32x4(ab, cd, 0b11_01_11_01));
        // In every 128-bit lane: (x0 + x2, x1 + x3), then their sum in element 0.
        let q = _mm512_add_ps(q, _mm512_permute_ps(q, 0b01_00_11_10));
        let q = _mm512_add_ps(q, _mm512_permute_ps(q, 0b10_11_00_01));
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), q);
        [out[0], out[4], out[8], out[12]]
    }
}

#[derive(Clone, Copy)]
pub(super) struct V8(__m256);

impl Lanes for V8 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        V8(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        V8(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        V8(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        V8(_mm256_fmadd_ps(a.0, b.0, self.0))
    }
    /// Halves added: 256 to 128 bits, then lanes (0, 2) and (1, 3), then those two.
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        Self::sum4(self, self, self, self)[0]
    }
    #[inline(always)]
    unsafe fn sum4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4] {
        // [a.lo + a.hi | b.lo + b.hi], the same for c and d.
        let ab = _mm256_add_ps(_mm256_permute2f128_ps(a.0, b.0, 0x20), _mm256_permute2f128_ps(a.0, b.0, 0x31));
        let cd = _mm256_add_ps(_mm256_permute2f128_ps(c.0, d.0, 0x20), _mm256_permute2f128_ps(c.0, d.0, 0x31));
        let fold = |v: __m256| {
            let v = _mm256_add_ps(v, _mm256_permute_ps(v, 0b01_00_11_10));
            _mm256_add_ps(v, _mm256_permute_ps(v, 0b10_11_00_01))
        };
        let (mut x, mut y) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(x.as_mut_ptr(), fold(ab));
        _mm256_storeu_ps(y.as_mut_ptr(), fold(cd));
        [x[0], x[4], y[0], y[4]]
    }
}

macro_rules! entry {
    ($products:ident, $attend:ident, $lanes:ty, $features:literal) => {
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $products(op: Operands, cols: std::ops::Range<usize>) {
            products::<$lanes>(op, cols)
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn $attend(
            at: Attend,
            s: &SeqSpan,
            first: usize,
            count: usize,
            head: usize,
            scratch: &mut [f32],
        ) {
            attend_block::<$lanes>(at, s, first, count, head, scratch)
        }
    };
}

entry!(products_avx512, attend_avx512, V16, "avx512f");
entry!(products_avx2, attend_avx2, V8, "avx2,fma");
