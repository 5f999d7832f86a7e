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
//! [`frozen_matmul`] first, which answers only inside a scope. Instructions: AVX-512 or AVX2+FMA when the CPU has
//! them (chosen once per process), else plain f32.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

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

/// The operands of `y = x @ w^T` with row strides: `x` (m, k), `w` (any rows, k), `y` (m, those rows). Shared by
/// the tasks of one call, which write disjoint columns of `y`.
#[derive(Clone, Copy)]
struct Operands {
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
    m: usize,
    k: usize,
}
// SAFETY: used only within one `matmul` / `attention` call, whose tasks write disjoint outputs.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

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

/// Queries per attention task: their scores against the keys are one tiled product.
const QB: usize = 16;

/// The operands of one [`attention`] call, shared by its tasks (each writes its own (token, head) outputs).
#[derive(Clone, Copy)]
struct Attend {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    h: Heads,
    scale: f32,
}
// SAFETY: see [`Attend`].
unsafe impl Send for Attend {}
unsafe impl Sync for Attend {}

/// How many tasks `work` multiply-adds deserve: one below about 64k (the thread hand-off costs more), else
/// four per thread, at most `units`.
fn tasks_for(work: usize, units: usize) -> usize {
    let threads = rayon::current_num_threads();
    if work < 1 << 16 || threads == 1 {
        return 1;
    }
    (4 * threads).min(units).max(1)
}

/// Weight rows per tile (the output features computed together).
const NR: usize = 4;
/// Input rows per tile.
const MR: usize = 4;

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

/// A SIMD register of f32 lanes: what the kernels below need of it.
trait Lanes: Copy {
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + self`.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// The lanes' sum, by a fixed tree.
    unsafe fn sum(self) -> f32;
    /// `[a.sum(), b.sum(), c.sum(), d.sum()]`, the same bits, with shuffles shared between the four.
    unsafe fn sum4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4] {
        [a.sum(), b.sum(), c.sum(), d.sum()]
    }
}

/// One lane, no SIMD: the fallback on CPUs without AVX2 (and off x86).
#[derive(Clone, Copy)]
struct Plain(f32);

impl Lanes for Plain {
    const N: usize = 1;
    unsafe fn zero() -> Self {
        Plain(0.0)
    }
    unsafe fn splat(x: f32) -> Self {
        Plain(x)
    }
    unsafe fn load(p: *const f32) -> Self {
        Plain(*p)
    }
    unsafe fn store(self, p: *mut f32) {
        *p = self.0
    }
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        Plain(a.0 * b.0 + self.0)
    }
    unsafe fn sum(self) -> f32 {
        self.0
    }
}

/// Columns `cols` of `y = x @ w^T`, in tiles of [`MR`] rows by [`NR`] weight rows. Rows come in blocks that keep
/// their part of `x` in the core's cache while the block's weight rows pass. A block of 5 to 8 rows (a decode step
/// of a batch) is one tile high instead, 2 weight rows wide (AVX-512's 32 registers hold its 16 sums), so that the
/// weights stream from memory while they are multiplied rather than in one of two passes over them. Every element
/// is [`dot`]'s sum whatever the tile.
#[inline(always)]
unsafe fn products<L: Lanes>(op: Operands, cols: std::ops::Range<usize>) {
    let (m, k) = (op.m, op.k);
    let block = ((256 << 10) / (4 * k.max(1))).max(2 * MR) / MR * MR;
    for r0 in (0..m).step_by(block) {
        let r1 = (r0 + block).min(m);
        let tall = L::N >= 16 && (MR + 1..=2 * MR).contains(&(r1 - r0));
        let (mr_most, nr_most) = if tall { (r1 - r0, 2) } else { (MR, NR) };
        let mut c = cols.start;
        while c < cols.end {
            let nr = nr_most.min(cols.end - c);
            let mut r = r0;
            while r < r1 {
                let mr = mr_most.min(r1 - r);
                let at =
                    Operands { x: op.x.add(r * op.ldx), w: op.w.add(c * op.ldw), y: op.y.add(r * op.ldy + c), ..op };
                match (mr, nr) {
                    (4, NR) => tile::<L, 4, NR>(at),
                    (3, NR) => tile::<L, 3, NR>(at),
                    (2, NR) => tile::<L, 2, NR>(at),
                    (1, NR) => tile::<L, 1, NR>(at),
                    (8, 2) => tile::<L, 8, 2>(at),
                    (7, 2) => tile::<L, 7, 2>(at),
                    (6, 2) => tile::<L, 6, 2>(at),
                    (5, 2) => tile::<L, 5, 2>(at),
                    (mr, nr) => {
                        for i in 0..mr {
                            for j in 0..nr {
                                *at.y.add(i * op.ldy + j) = dot::<L>(at.x.add(i * op.ldx), at.w.add(j * op.ldw), k);
                            }
                        }
                    }
                }
                r += mr;
            }
            c += nr;
        }
    }
}

/// An `R x C` tile at the operands' origin: `y[i][j] = dot(x row i, w row j)`, the same sums as [`dot`] computes
/// one at a time.
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize, const C: usize>(op: Operands) {
    let k = op.k;
    let mut acc = [[L::zero(); C]; R];
    let full = k / L::N * L::N;
    let mut p = 0;
    while p < full {
        let mut wv = [L::zero(); C];
        for (j, wj) in wv.iter_mut().enumerate() {
            *wj = L::load(op.w.add(j * op.ldw + p));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let xv = L::load(op.x.add(i * op.ldx + p));
            for (a, wj) in row.iter_mut().zip(wv) {
                *a = a.fma(xv, wj);
            }
        }
        p += L::N;
    }
    for (i, row) in acc.iter().enumerate() {
        // Four sums at a time (sharing their shuffles); a short group repeats its last register.
        for j0 in (0..C).step_by(4) {
            let at = |j: usize| row[(j0 + j).min(C - 1)];
            let sums = L::sum4(at(0), at(1), at(2), at(3));
            for (j, lanes) in sums.into_iter().enumerate().take(C - j0) {
                let (x, w) = (op.x.add(i * op.ldx), op.w.add((j0 + j) * op.ldw));
                *op.y.add(i * op.ldy + j0 + j) = finish(lanes, x, w, full, k);
            }
        }
    }
}

/// `sum(a[i] * b[i], i < k)`: lane-wise multiply-adds over whole registers, the lanes summed, then the remainder
/// one by one.
#[inline(always)]
unsafe fn dot<L: Lanes>(a: *const f32, b: *const f32, k: usize) -> f32 {
    let full = k / L::N * L::N;
    let mut acc = L::zero();
    let mut p = 0;
    while p < full {
        acc = acc.fma(L::load(a.add(p)), L::load(b.add(p)));
        p += L::N;
    }
    finish(acc.sum(), a, b, full, k)
}

/// Adds the products past the last whole register to a dot product's lane sum.
#[inline(always)]
unsafe fn finish(mut sum: f32, a: *const f32, b: *const f32, from: usize, k: usize) -> f32 {
    for p in from..k {
        sum += *a.add(p) * *b.add(p);
    }
    sum
}

/// Queries `first..first + count` of sequence `s`, head `head` (see [`attention`]): their scores against the keys
/// the last of them sees as one tiled product (each query then reads only its own causal part), a softmax per
/// query, and the weighted sum of values per query in position order. Every output is the same sum whichever block
/// its query falls in.
#[inline(always)]
unsafe fn attend_block<L: Lanes>(
    at: Attend,
    s: &SeqSpan,
    first: usize,
    count: usize,
    head: usize,
    scratch: &mut [f32],
) {
    let (h, d) = (at.h, at.h.head_dim);
    let stride = h.kv_heads * d;
    let group = (head / (h.heads / h.kv_heads)) * d;
    let keys = s.past + first + count;
    let (scores, acc) = scratch.split_at_mut(count * keys);
    let op = Operands {
        x: at.q.add((head * h.tokens + s.token + first) * d),
        ldx: d,
        w: at.k.add(s.start * stride + group),
        ldw: stride,
        y: scores.as_mut_ptr(),
        ldy: keys,
        m: count,
        k: d,
    };
    products::<L>(op, 0..keys);
    let full = d / L::N * L::N;
    for i in 0..count {
        let seen = s.past + first + i + 1;
        let row = &mut scores[i * keys..i * keys + seen];
        let mut max = f32::NEG_INFINITY;
        for sc in row.iter_mut() {
            *sc *= at.scale;
            max = max.max(*sc);
        }
        let mut total = 0f32;
        for sc in row.iter_mut() {
            *sc = (*sc - max).exp();
            total += *sc;
        }
        // The weighted sum of values, a few registers of output features at a time held over all the keys.
        let acc = &mut acc[..d];
        let values = at.v.add(s.start * stride + group);
        let mut c = 0;
        while c + 4 * L::N <= full {
            weighted::<L, 4>(row, values.add(c), stride, acc.as_mut_ptr().add(c));
            c += 4 * L::N;
        }
        while c < full {
            weighted::<L, 1>(row, values.add(c), stride, acc.as_mut_ptr().add(c));
            c += L::N;
        }
        for (c, a) in acc.iter_mut().enumerate().skip(full) {
            *a = row.iter().enumerate().fold(0.0, |sum, (p, &e)| sum + e * *values.add(p * stride + c));
        }
        let o = at.out.add((s.token + first + i) * h.heads * d + head * d);
        let inv = 1.0 / total;
        for (c, a) in acc.iter().enumerate() {
            *o.add(c) = a * inv;
        }
    }
}

/// `R` registers of `out` = `sum(weights[p] * values[p * stride ..], p in order)`: the sums of [`attend_block`]'s
/// weighted values, kept in registers across the keys.
#[inline(always)]
unsafe fn weighted<L: Lanes, const R: usize>(weights: &[f32], values: *const f32, stride: usize, out: *mut f32) {
    let mut acc = [L::zero(); R];
    for (p, &e) in weights.iter().enumerate() {
        let (ev, row) = (L::splat(e), values.add(p * stride));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = a.fma(ev, L::load(row.add(j * L::N)));
        }
    }
    for (j, a) in acc.into_iter().enumerate() {
        a.store(out.add(j * L::N));
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The kernels compiled for AVX-512 and for AVX2 + FMA (entry points with the features enabled, so the generic
    //! bodies inline with them).
    use std::arch::x86_64::*;

    use super::{attend_block, products, Attend, Lanes, Operands, SeqSpan};

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
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4(a.0, b.0, 0b01_00_01_00),
                _mm512_shuffle_f32x4(a.0, b.0, 0b11_10_11_10),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4(c.0, d.0, 0b01_00_01_00),
                _mm512_shuffle_f32x4(c.0, d.0, 0b11_10_11_10),
            );
            // [a4 | b4 | c4 | d4]: each 256-bit half folded to 128.
            let q =
                _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0b10_00_10_00), _mm512_shuffle_f32x4(ab, cd, 0b11_01_11_01));
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
