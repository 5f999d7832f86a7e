//! CPU f32 kernels for the generation engine's steps ([`crate::generate::Engine`]): the matrix products of the
//! linear layers and the LM head, and attention over the slot cache ([`super::slots`]).
//!
//! - **Both cores.** Products are split across the thread pool by output features (for a decode step of 1-8 rows
//!   that is the only split there is: each weight row is read once and applied to every row of the step);
//!   attention by (sequence, head, block of queries).
//! - **Batch-invariant.** Every output element is one dot product summed in one fixed order (SIMD lanes over the
//!   input features, then the lanes, then the remainder), whatever the number of rows, the other tokens of the step
//!   or the thread count; attention reads a query's keys in position order. With per-request seeds, a request then
//!   draws the same tokens whatever shares its steps, bit for bit. (candle's gemm blocks its sums by problem size.)
//! - **No allocation per call** beyond the output tensor: attention's scratch rows live in the threads.
//!
//! The engine turns them on for its forward passes with [`run`] (or [`scope`]): [`super::ops::FrozenMatmul`] asks
//! `frozen_matmul` first, which answers only inside a scope. Instructions: AVX-512 or AVX2+FMA when the CPU has
//! them (chosen once per process), else plain f32.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use self::kernels::{attend_block, products, Attend, Operands, Plain, NR, QB};

mod kernels;
#[cfg(target_arch = "x86_64")]
mod simd;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// While the returned guard lives, frozen f32 linear layers run on this thread go through [`matmul`].
pub fn scope() -> Scope {
    Scope { was: ACTIVE.with(|a| a.replace(true)) }
}

/// Runs `f` with these kernels on (when `enable`): on a thread of the pool, so that the many small parallel
/// products of a step hand work to the other threads cheaply (a caller outside the pool would wake a worker and wait
/// for it at every one: about 20 us each, a fifth of a small model's decode step).
pub fn run<R: Send>(enable: bool, f: impl FnOnce() -> R + Send) -> R {
    if !enable {
        return f();
    }
    let on = move || {
        let _on = scope();
        f()
    };
    if rayon::current_thread_index().is_some() {
        return on();
    }
    rayon::join(on, || ()).0
}

/// See [`scope`].
pub struct Scope {
    was: bool,
}

impl Drop for Scope {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.was));
    }
}

/// The hook of [`super::ops::FrozenMatmul`]'s CPU forward: `x (..., in) @ w^T` through [`matmul`] inside a
/// [`scope`], for f32 with a contiguous `x`; `None` everywhere else (candle's gemm runs).
pub(crate) fn frozen_matmul(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &Tensor,
) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
    if !ACTIVE.with(Cell::get) || !x_layout.is_contiguous() {
        return Ok(None);
    }
    let (CpuStorage::F32(xs), (n, k)) = (x, w.dims2()?) else { return Ok(None) };
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(ws)), true) = (&*w_storage, w_layout.is_contiguous()) else {
        return Ok(None);
    };
    let dims = x_layout.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("cpu matmul: input has {:?} features, weight expects {k}", dims.last());
    }
    let m = x_layout.shape().elem_count() / k.max(1);
    let xs = &xs[x_layout.start_offset()..x_layout.start_offset() + m * k];
    let ws = &ws[w_layout.start_offset()..w_layout.start_offset() + n * k];
    let mut y = vec![0f32; m * n];
    matmul(xs, ws, &mut y, m, k, n);
    let mut out = dims.to_vec();
    *out.last_mut().unwrap_or(&mut 0) = n;
    Ok(Some((CpuStorage::F32(y), Shape::from(out))))
}

/// `y (m, n) = x (m, k) @ w (n, k)^T`, all row-major. Batch-invariant (see the module notes).
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n, "cpu matmul: slices too short");
    if m == 0 || n == 0 {
        return;
    }
    let op = Operands { x: x.as_ptr(), ldx: k, w: w.as_ptr(), ldw: k, y: y.as_mut_ptr(), ldy: n, m, k };
    let run = move |cols: std::ops::Range<usize>| {
        // SAFETY: the slices hold (m, k), (n, k) and (m, n) elements (asserted above); every task writes the
        // columns `cols` of y only, and the ranges are disjoint.
        unsafe { level().products(op, cols) }
    };
    let tasks = tasks_for(m * n * k, n.div_ceil(NR));
    if tasks <= 1 {
        return run(0..n);
    }
    let per = n.div_ceil(tasks).next_multiple_of(NR);
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| run(t * per..((t + 1) * per).min(n)));
}

/// One sequence's part of a packed attention step: its new tokens sit at `token..token + len` of the step, its
/// keys and values at cache rows `start..start + past + len` (position p at row `start + p`).
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    pub token: usize,
    pub len: usize,
    pub start: usize,
    pub past: usize,
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens in the step.
    pub tokens: usize,
}

/// Causal attention of a packed step over the slot cache: `q` (heads, tokens, head_dim), the cache `k` and `v`
/// (rows, kv_heads, head_dim), `out` (tokens, heads * head_dim). Query i of a sequence sees its keys up to position
/// `past + i`. Scores in f32 scaled by `scale`, softmax in f32 (max subtracted), then the weighted sum of values.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], seqs: &[SeqSpan], h: Heads, scale: f32, out: &mut [f32]) {
    assert!(q.len() >= h.heads * h.tokens * h.head_dim && out.len() >= h.tokens * h.heads * h.head_dim);
    assert!(
        h.kv_heads > 0 && h.heads.is_multiple_of(h.kv_heads),
        "attention: {} heads over {} kv heads",
        h.heads,
        h.kv_heads
    );
    for s in seqs {
        let rows = (s.start + s.past + s.len) * h.kv_heads * h.head_dim;
        assert!(
            k.len() >= rows && v.len() >= rows && s.token + s.len <= h.tokens,
            "attention: span {s:?} out of range"
        );
    }
    // Tasks: (sequence, head, block of up to 16 queries).
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| (0..h.heads).flat_map(move |hd| (0..s.len.div_ceil(QB)).map(move |b| (si, hd, b * QB))))
        .collect();
    let at = Attend { q: q.as_ptr(), k: k.as_ptr(), v: v.as_ptr(), out: out.as_mut_ptr(), h, scale };
    let run = move |&(si, head, first): &(usize, usize, usize)| {
        let s = seqs[si];
        let count = QB.min(s.len - first);
        SCORES.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let need = count * (s.past + first + count + h.head_dim);
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            // SAFETY: bounds asserted above; each (token, head) output slice belongs to one task.
            unsafe { level().attend(at, &s, first, count, head, &mut scratch) };
        });
    };
    let work: usize = seqs.iter().map(|s| s.len * (s.past + s.len)).sum::<usize>() * h.heads * h.head_dim;
    if tasks_for(work, tasks.len()) <= 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// How many tasks `work` multiply-adds deserve: one below about 64k (the thread hand-off costs more), else
/// four per thread, at most `units`.
fn tasks_for(work: usize, units: usize) -> usize {
    let threads = rayon::current_num_threads();
    if work < 1 << 16 || threads == 1 {
        return 1;
    }
    (4 * threads).min(units).max(1)
}

/// The instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Plain,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Plain
    })
}

impl Level {
    /// Columns `cols` of `op.y = op.x @ op.w^T`.
    ///
    /// # Safety
    /// The operands must hold what their shapes and strides address; `cols` rows of `w` exist.
    unsafe fn products(self, op: Operands, cols: std::ops::Range<usize>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => simd::products_avx512(op, cols),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => simd::products_avx2(op, cols),
            _ => products::<Plain>(op, cols),
        }
    }

    /// Queries `first..first + count` of `s` for one head (see [`attention`]).
    ///
    /// # Safety
    /// As [`attention`] asserts; `scratch` holds `count * (past + first + count + head_dim)`.
    unsafe fn attend(self, at: Attend, s: &SeqSpan, first: usize, count: usize, head: usize, scratch: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => simd::attend_avx512(at, s, first, count, head, scratch),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => simd::attend_avx2(at, s, first, count, head, scratch),
            _ => attend_block::<Plain>(at, s, first, count, head, scratch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) >> 8) as f32 / (1 << 24) as f32 - 0.5).collect()
    }

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn products_match_f64_and_do_not_depend_on_the_rows_beside() {
        // Odd sizes exercise the tile edges and the remainders past the last register; 5 to 8 rows take the tall
        // tiles of a decode step.
        for (m, k, n) in [(1, 64, 8), (3, 37, 5), (6, 37, 9), (8, 300, 70), (9, 300, 70), (70, 512, 33)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let mut y = vec![0f32; m * n];
            matmul(&x, &w, &mut y, m, k, n);
            for (a, b) in y.iter().zip(naive(&x, &w, m, k, n)) {
                assert!((*a as f64 - b).abs() < 1e-4, "({m}, {k}, {n}): {a} vs {b}");
            }
            // Row by row, and a tail of rows on their own: the same bits.
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul(&x[i * k..(i + 1) * k], &w, &mut one, 1, k, n);
                assert_eq!(one[..], y[i * n..(i + 1) * n], "row {i} of ({m}, {k}, {n})");
            }
            if m > 2 {
                let mut tail = vec![0f32; 2 * n];
                matmul(&x[(m - 2) * k..], &w, &mut tail, 2, k, n);
                assert_eq!(tail[..], y[(m - 2) * n..]);
            }
        }
    }

    #[test]
    fn attention_matches_a_direct_softmax_and_chunks_alike() {
        let (heads, kvh, d) = (4, 2, 20);
        let (start, past, len) = (3, 5, 4);
        let rows = start + past + len;
        let (kc, vc) = (data(rows * kvh * d, 3), data(rows * kvh * d, 4));
        let q = data(heads * len * d, 5);
        let h = Heads { heads, kv_heads: kvh, head_dim: d, tokens: len };
        let mut out = vec![0f32; len * heads * d];
        attention(&q, &kc, &vc, &[SeqSpan { token: 0, len, start, past }], h, 0.3, &mut out);
        for i in 0..len {
            for hd in 0..heads {
                let g = hd / (heads / kvh);
                let qv = &q[(hd * len + i) * d..][..d];
                let key = |p: usize| (start + p) * kvh * d + g * d;
                let s: Vec<f64> = (0..=past + i)
                    .map(|p| 0.3 * (0..d).map(|c| qv[c] as f64 * kc[key(p) + c] as f64).sum::<f64>())
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = e.iter().enumerate().map(|(p, w)| w / z * vc[key(p) + c] as f64).sum();
                    let got = out[(i * heads + hd) * d + c] as f64;
                    assert!((got - want).abs() < 1e-5, "query {i} head {hd} dim {c}: {got} vs {want}");
                }
            }
        }
        // The last query alone (a decode step after the others are cached) gives the same bits.
        let last: Vec<f32> = (0..heads).flat_map(|hd| q[(hd * len + len - 1) * d..][..d].to_vec()).collect();
        let mut one = vec![0f32; heads * d];
        let h1 = Heads { tokens: 1, ..h };
        attention(&last, &kc, &vc, &[SeqSpan { token: 0, len: 1, start, past: past + len - 1 }], h1, 0.3, &mut one);
        assert_eq!(one[..], out[(len - 1) * heads * d..]);
    }
}
