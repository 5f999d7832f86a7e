//! The kernels behind [`super::matmul`] and [`super::attention`], generic over the SIMD register ([`Lanes`]):
//! tiled products and attention blocks whose every output is one dot product summed in a fixed order.

use super::{Heads, SeqSpan};

/// The operands of `y = x @ w^T` with row strides: `x` (m, k), `w` (any rows, k), `y` (m, those rows). Shared by
/// the tasks of one call, which write disjoint columns of `y`.
#[derive(Clone, Copy)]
pub(super) struct Operands {
    pub(super) x: *const f32,
    pub(super) ldx: usize,
    pub(super) w: *const f32,
    pub(super) ldw: usize,
    pub(super) y: *mut f32,
    pub(super) ldy: usize,
    pub(super) m: usize,
    pub(super) k: usize,
}
// SAFETY: used only within one `matmul` / `attention` call, whose tasks write disjoint outputs.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// Queries per attention task: their scores against the keys are one tiled product.
pub(super) const QB: usize = 16;

/// The operands of one [`super::attention`] call, shared by its tasks (each writes its own (token, head) outputs).
#[derive(Clone, Copy)]
pub(super) struct Attend {
    pub(super) q: *const f32,
    pub(super) k: *const f32,
    pub(super) v: *const f32,
    pub(super) out: *mut f32,
    pub(super) h: Heads,
    pub(super) scale: f32,
}
// SAFETY: see [`Attend`].
unsafe impl Send for Attend {}
unsafe impl Sync for Attend {}

/// Weight rows per tile (the output features computed together).
pub(super) const NR: usize = 4;
/// Input rows per tile.
pub(super) const MR: usize = 4;

/// A SIMD register of f32 lanes: what the kernels below need of it.
pub(super) trait Lanes: Copy {
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
pub(super) struct Plain(f32);

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
pub(super) unsafe fn products<L: Lanes>(op: Operands, cols: std::ops::Range<usize>) {
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
pub(super) unsafe fn tile<L: Lanes, const R: usize, const C: usize>(op: Operands) {
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
pub(super) unsafe fn dot<L: Lanes>(a: *const f32, b: *const f32, k: usize) -> f32 {
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
pub(super) unsafe fn finish(mut sum: f32, a: *const f32, b: *const f32, from: usize, k: usize) -> f32 {
    for p in from..k {
        sum += *a.add(p) * *b.add(p);
    }
    sum
}

/// Queries `first..first + count` of sequence `s`, head `head` (see [`super::attention`]): their scores against the keys
/// the last of them sees as one tiled product (each query then reads only its own causal part), a softmax per
/// query, and the weighted sum of values per query in position order. Every output is the same sum whichever block
/// its query falls in.
#[inline(always)]
pub(super) unsafe fn attend_block<L: Lanes>(
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
pub(super) unsafe fn weighted<L: Lanes, const R: usize>(
    weights: &[f32],
    values: *const f32,
    stride: usize,
    out: *mut f32,
) {
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
