//! Pillow-exact image resizing (`Image.resize(size, BICUBIC | BILINEAR)` on 8-bit RGB), which is what
//! transformers' PIL image processors call. A port of the algorithm in Pillow's `libImaging/Resample.c`:
//! separable, antialiased (the filter support grows with the downscale factor), coefficients normalised to sum 1
//! and quantised to 22-bit fixed point, a horizontal pass into an 8-bit intermediate (rounded and clipped), then a
//! vertical pass. Bit-exact with Pillow, so CLIP inputs match transformers to the last float bit.
//!
//! Because every output pixel depends only on its own coefficients, [`resize_window`] computes just a window of
//! the resized image: a centre crop costs only the pixels it keeps.

use std::ops::Range;

/// Pillow's fixed-point precision for 8-bit images: 32 bits minus 8 for the value minus 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A resampling filter, numbered as in PIL (`Image.Resampling`) and `preprocessor_config.json`'s `resample`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// PIL 2: triangle filter, support 1.
    Bilinear,
    /// PIL 3: Keys cubic convolution with a = -0.5, support 2 (CLIP's choice).
    Bicubic,
}

impl Filter {
    /// Maps PIL's resample code; `None` for filters not implemented here (nearest, box, hamming, lanczos).
    pub fn from_pil(code: i64) -> Option<Self> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear if x < 1.0 => 1.0 - x,
            Filter::Bicubic if x < 1.0 => (1.5 * x - 2.5) * x * x + 1.0,
            Filter::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5,
            _ => 0.0,
        }
    }
}

/// Fixed-point taps for a range of output positions along one axis (Pillow's `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`), in one flat buffer. Output `i` reads `len` inputs from `first`, weighted by
/// `weights[i * stride..][..len]`.
struct Taps {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    stride: usize,
}

impl Taps {
    fn new(in_size: usize, out_size: usize, range: Range<usize>, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let ss = 1.0 / filterscale;
        let support = filter.support() * filterscale;
        let stride = support.ceil() as usize * 2 + 1;
        let mut taps = Taps { bounds: Vec::with_capacity(range.len()), weights: vec![0; range.len() * stride], stride };
        let mut w = Vec::with_capacity(stride);
        for (i, out) in range.enumerate() {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) cast truncates; the operands are >= -0.5 here, so clamping first changes nothing.
            let xmin = ((center - support + 0.5).max(0.0) as usize).min(in_size);
            let xmax = ((center + support + 0.5) as usize).min(in_size);
            w.clear();
            w.extend((xmin..xmax).map(|x| filter.eval((x as f64 - center + 0.5) * ss)));
            let total: f64 = w.iter().sum();
            let norm = if total != 0.0 { total } else { 1.0 };
            for (dst, &v) in taps.weights[i * stride..].iter_mut().zip(&w) {
                // (int)(x +- 0.5) in C: round half away from zero.
                *dst = (v / norm * f64::from(1u32 << PRECISION_BITS)).round() as i32;
            }
            taps.bounds.push((xmin, w.len()));
        }
        taps
    }

    /// Output `i`'s first input and its weights.
    fn get(&self, i: usize) -> (usize, &[i32]) {
        let (first, len) = self.bounds[i];
        (first, &self.weights[i * self.stride..i * self.stride + len])
    }

    fn len(&self) -> usize {
        self.bounds.len()
    }

    /// Input span `[lo, hi)` used by all outputs of this range.
    fn span(&self) -> Range<usize> {
        let lo = self.bounds.first().map_or(0, |b| b.0);
        let hi = self.bounds.iter().map(|(f, n)| f + n).max().unwrap_or(lo);
        lo..hi
    }
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift) and saturate to 0..=255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// An interleaved 8-bit RGB image borrowed as a slice.
#[derive(Clone, Copy)]
pub(crate) struct RgbView<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
}

/// Resizes `src` to `out_w` x `out_h` exactly as Pillow does and returns only the window `rows` x `cols` of the
/// result (interleaved RGB, `cols.len()` pixels wide). The ranges must lie inside the output.
pub(crate) fn resize_window(
    src: RgbView,
    (out_w, out_h): (usize, usize),
    rows: Range<usize>,
    cols: Range<usize>,
    filter: Filter,
) -> Vec<u8> {
    // Pillow skips a pass whose size does not change (that pass would be the identity anyway).
    let vtaps = (out_h != src.height).then(|| Taps::new(src.height, out_h, rows.clone(), filter));
    let src_rows = vtaps.as_ref().map_or(rows.clone(), Taps::span);
    let mid = if out_w != src.width {
        horizontal(src, src_rows.clone(), &Taps::new(src.width, out_w, cols, filter))
    } else {
        copy_window(src, src_rows.clone(), cols)
    };
    match vtaps {
        Some(taps) => vertical(&mid, cols_len(&mid, src_rows.len()), src_rows.start, &taps),
        None => mid,
    }
}

fn cols_len(buf: &[u8], rows: usize) -> usize {
    if rows == 0 {
        0
    } else {
        buf.len() / (3 * rows)
    }
}

fn copy_window(src: RgbView, rows: Range<usize>, cols: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * cols.len() * 3);
    for y in rows {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        out.extend_from_slice(&row[cols.start * 3..cols.end * 3]);
    }
    out
}

/// Horizontal pass over source rows `rows`, one output pixel per tap set.
fn horizontal(src: RgbView, rows: Range<usize>, taps: &Taps) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * taps.len() * 3);
    for y in rows {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for i in 0..taps.len() {
            let (first, w) = taps.get(i);
            let px = &row[first * 3..(first + w.len()) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &k) in px.chunks_exact(3).zip(w) {
                r += i32::from(p[0]) * k;
                g += i32::from(p[1]) * k;
                b += i32::from(p[2]) * k;
            }
            out.extend_from_slice(&[clip8(r), clip8(g), clip8(b)]);
        }
    }
    out
}

/// Vertical pass: `mid` holds source rows starting at `row0`, `width` pixels each. Accumulates whole rows at a
/// time into one reused buffer (integer sums, so the order does not change the result).
fn vertical(mid: &[u8], width: usize, row0: usize, taps: &Taps) -> Vec<u8> {
    let stride = width * 3;
    let mut out = Vec::with_capacity(taps.len() * stride);
    let mut acc = vec![0i32; stride];
    for i in 0..taps.len() {
        let (first, w) = taps.get(i);
        acc.fill(HALF);
        for (k, &wk) in w.iter().enumerate() {
            let y = first + k - row0;
            for (a, &p) in acc.iter_mut().zip(&mid[y * stride..(y + 1) * stride]) {
                *a += i32::from(p) * wk;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize(data: &[u8], (w, h): (usize, usize), (ow, oh): (usize, usize), f: Filter) -> Vec<u8> {
        resize_window(RgbView { data, width: w, height: h }, (ow, oh), 0..oh, 0..ow, f)
    }

    fn gray_row(v: &[u8]) -> Vec<u8> {
        v.iter().flat_map(|&x| [x, x, x]).collect()
    }

    #[test]
    fn matches_pillow_on_a_row() {
        // PIL 13: im = Image.fromarray(np.array([[0, 50, 200, 255, 10, 90, 30]], np.uint8))
        //   im.resize((3, 1), BICUBIC) -> [64, 170, 47]; im.resize((3, 1), BILINEAR) -> [64, 163, 51]
        //   im.resize((11, 1), BICUBIC) -> [0, 13, 60, 163, 240, 255, 88, 12, 87, 59, 26] (overshoot clipped)
        let src = gray_row(&[0, 50, 200, 255, 10, 90, 30]);
        assert_eq!(resize(&src, (7, 1), (3, 1), Filter::Bicubic), gray_row(&[64, 170, 47]));
        assert_eq!(resize(&src, (7, 1), (3, 1), Filter::Bilinear), gray_row(&[64, 163, 51]));
        let up = gray_row(&[0, 13, 60, 163, 240, 255, 88, 12, 87, 59, 26]);
        assert_eq!(resize(&src, (7, 1), (11, 1), Filter::Bicubic), up);
        // The same row as a column exercises the vertical pass.
        let col = resize(&src, (1, 7), (1, 11), Filter::Bicubic);
        assert_eq!(col, up);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9 * 3];
        for (ow, oh) in [(5, 4), (26, 18), (13, 3)] {
            for f in [Filter::Bicubic, Filter::Bilinear] {
                assert!(resize(&src, (13, 9), (ow, oh), f).iter().all(|&v| v == 77));
            }
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let (w, h) = (23, 17);
        let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 37) % 251) as u8).collect();
        let view = RgbView { data: &src, width: w, height: h };
        let full = resize_window(view, (15, 11), 0..11, 0..15, Filter::Bicubic);
        let win = resize_window(view, (15, 11), 3..9, 2..12, Filter::Bicubic);
        let expect: Vec<u8> = (3..9).flat_map(|y| full[(y * 15 + 2) * 3..(y * 15 + 12) * 3].to_vec()).collect();
        assert_eq!(win, expect);
    }

    #[test]
    fn same_size_is_a_copy() {
        let src: Vec<u8> = (0..6 * 4 * 3).map(|i| (i * 7) as u8).collect();
        assert_eq!(resize(&src, (6, 4), (6, 4), Filter::Bicubic), src);
    }
}
