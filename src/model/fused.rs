//! Fused f32 CPU kernels with analytic backward passes, for the ops that dominate a training step besides the
//! matmuls: the attention softmax (with its scale and mask folded in), RMSNorm and rotary embeddings.
//!
//! Composed from candle's elementwise ops, each of these is 5-10 tensors per call, and candle's backward adds a
//! zero-filled buffer and an addition per gradient contribution (including gradients of constants such as the
//! attention mask). Here each op is one graph node: one pass forward, one or two passes backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// The values of a contiguous f32 CPU tensor.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expects a contiguous f32 tensor"),
    }
}

/// Runs `f(first_row, rows_out)` over `out` split into rows of `len`, on up to candle's thread count (only when
/// there is enough work to pay for a thread).
fn par_rows(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / len.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, 8);
    if threads == 1 || out.len() < 1 << 16 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// `softmax(x * scale + mask)` over the last dimension; `x`: (b, h, t, k), `mask`: (b, 1, t, k) additive, shared by
/// the heads. Backward: `scale * y * (g - sum(g * y))` for `x`, nothing for the mask.
pub struct AttnSoftmax {
    pub scale: f32,
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "attn-softmax"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m) = (f32s(x, xl, self.name())?, f32s(m, ml, self.name())?);
        let dims = xl.dims();
        let [b, h, t, k] = dims[..] else { candle_core::bail!("attn-softmax: scores must be (b, heads, t, k)") };
        if ml.dims() != [b, 1, t, k] {
            candle_core::bail!("attn-softmax: mask {:?} does not fit scores {dims:?}", ml.dims());
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, k, |first, rows| {
            for (j, o) in rows.chunks_mut(k).enumerate() {
                let r = first + j;
                let (xi, mi) = (&x[r * k..(r + 1) * k], &m[((r / (h * t)) * t + r % t) * k..][..k]);
                let mut max = f32::NEG_INFINITY;
                for ((o, &xv), &mv) in o.iter_mut().zip(xi).zip(mi) {
                    *o = xv * self.scale + mv;
                    max = max.max(*o);
                }
                let mut sum = 0f32;
                for o in o.iter_mut() {
                    *o = (*o - max).exp();
                    sum += *o;
                }
                o.iter_mut().for_each(|v| *v /= sum);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _m: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(y.apply_op2(&g.contiguous()?, SoftmaxGrad { scale: self.scale })?), None))
    }
}

/// Plain softmax over the last dimension (no scale, no mask).
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(x, xl, self.name())?;
        let k = *xl.dims().last().unwrap_or(&1);
        let mut out = x.to_vec();
        par_rows(&mut out, k, |_, rows| {
            for o in rows.chunks_mut(k) {
                let max = o.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut sum = 0f32;
                for v in o.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                o.iter_mut().for_each(|v| *v /= sum);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2(&g.contiguous()?, SoftmaxGrad { scale: 1.0 })?))
    }
}

/// Softmax input gradient from output `y` and output gradient `g`, row by row.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = (f32s(y, yl, self.name())?, f32s(g, gl, self.name())?);
        let k = *yl.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        par_rows(&mut out, k, |first, rows| {
            for (j, o) in rows.chunks_mut(k).enumerate() {
                let at = (first + j) * k;
                let (yr, gr) = (&y[at..at + k], &g[at..at + k]);
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                    *o = self.scale * yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// Llama RMSNorm `w * x / sqrt(mean(x^2) + eps)` over the last dimension.
pub struct RmsNorm {
    pub eps: f32,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(x, xl, self.name())?, f32s(w, wl, self.name())?);
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |first, rows| {
            for (j, o) in rows.chunks_mut(h).enumerate() {
                let xr = &x[(first + j) * h..][..h];
                let inv = inv_rms(xr, self.eps);
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = xv * inv * wv;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3(w, &g, RmsNormGrad { eps: self.eps })?;
        // The weight's gradient only when it trains (full fine-tuning): sum over rows of g * x / rms.
        let dw = if w.track_op() {
            let h = w.elem_count();
            let inv = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            Some(g.mul(&x.broadcast_mul(&inv)?)?.reshape(((), h))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// RMSNorm input gradient: `inv * g w - x inv^3 sum(g w x) / h` per row.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, g) = (f32s(x, xl, self.name())?, f32s(w, wl, self.name())?, f32s(g, gl, self.name())?);
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |first, rows| {
            for (j, o) in rows.chunks_mut(h).enumerate() {
                let at = (first + j) * h;
                let (xr, gr) = (&x[at..at + h], &g[at..at + h]);
                let inv = inv_rms(xr, self.eps);
                let dot: f32 = xr.iter().zip(gr).zip(w).map(|((a, b), c)| a * b * c).sum();
                let c = inv * inv * inv * dot / h as f32;
                for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = inv * gv * wv - xv * c;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Rotary embedding, rotate-half convention: `x` (b, h, t, d), `cos`/`sin` (b, t, d/2). `inverse` rotates by the
/// opposite angle, which is the backward pass.
pub struct Rope {
    pub inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (f32s(x, xl, self.name())?, f32s(c, cl, self.name())?, f32s(s, sl, self.name())?);
        let [b, h, t, d] = xl.dims()[..] else { candle_core::bail!("rope: x must be (b, heads, t, d)") };
        let half = d / 2;
        if cl.dims() != [b, t, half] || sl.dims() != [b, t, half] {
            candle_core::bail!("rope: cos/sin {:?} do not fit x {:?}", cl.dims(), xl.dims());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |first, rows| {
            for (j, o) in rows.chunks_mut(d).enumerate() {
                let r = first + j;
                let xr = &x[r * d..(r + 1) * d];
                let at = ((r / (h * t)) * t + r % t) * half;
                let (cr, sr) = (&cos[at..at + half], &sin[at..at + half]);
                for i in 0..half {
                    let (x1, x2, c, s) = (xr[i], xr[i + half], cr[i], sign * sr[i]);
                    o[i] = x1 * c - x2 * s;
                    o[i + half] = x2 * c + x1 * s;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.contiguous()?.apply_op3(cos, sin, Rope { inverse: !self.inverse })?), None, None))
    }
}
