//! The slot cache of the generation engine ([`crate::generate::Engine`]) and attention over it.
//!
//! Every layer keeps its keys and values in one arena of token rows, `(rows, kv_heads, head_dim)`, shared by the
//! running sequences: a sequence owns a contiguous range of rows (its slot) from admission to its end, position p
//! at row `start + p`, and a finished sequence's rows go to the next one. The arena grows (keeping its contents)
//! when an admission needs more rows than it has and never shrinks; the engine decides who gets which rows.
//!
//! A packed step ([`StepLayout`]) runs the new tokens of several sequences as one batch of `tokens` rows: the
//! linear layers see them all at once, attention sees each sequence's own keys. On the CPU in f32 attention is
//! [`cpu_decode::attention`]; elsewhere (CUDA, bf16) candle ops gather each group of sequences into a padded batch:
//! all one-token sequences (decoding) together, each longer chunk (a prefill) on its own.

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::cpu_decode::{self, Heads, SeqSpan};
use super::ops::mask_min;
use super::ops::{self, Kernels};

/// Keys and values of one layer: `(rows, kv_heads, head_dim)` each.
pub struct SlotLayer {
    k: Tensor,
    v: Tensor,
}

/// Every layer's arena (see the module notes).
pub struct SlotCache {
    pub(crate) layers: Vec<SlotLayer>,
    n_layers: usize,
    rows: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl SlotCache {
    /// An empty cache for `cfg`'s layers in `dtype` on `device` (no rows until [`SlotCache::grow`]).
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Self {
        SlotCache {
            layers: Vec::with_capacity(cfg.num_hidden_layers),
            n_layers: cfg.num_hidden_layers,
            rows: 0,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            dtype,
            device: device.clone(),
        }
    }

    /// Rows (token positions) the arena holds.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of one row across all layers (keys and values).
    pub fn row_bytes(cfg: &LlamaConfig, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers * cfg.kv_heads() * cfg.head_dim() * dtype.size_in_bytes()
    }

    /// Grows every layer's arena to at least `rows` rows, keeping the rows already written; never shrinks.
    pub fn grow(&mut self, rows: usize) -> candle_core::Result<()> {
        if rows <= self.rows {
            return Ok(());
        }
        let shape = (rows, self.kv_heads, self.head_dim);
        let mut grown = Vec::with_capacity(self.n_layers);
        for i in 0..self.n_layers {
            let (k, v) =
                (Tensor::zeros(shape, self.dtype, &self.device)?, Tensor::zeros(shape, self.dtype, &self.device)?);
            if let Some(old) = self.layers.get(i) {
                k.slice_set(&old.k, 0, 0)?;
                v.slice_set(&old.v, 0, 0)?;
            }
            grown.push(SlotLayer { k, v });
        }
        self.layers = grown;
        self.rows = rows;
        Ok(())
    }
}

/// The sequences of one packed step, in token order, and what the device-generic attention precomputes for them
/// once per step (shared by every layer).
pub struct StepLayout {
    pub spans: Vec<SeqSpan>,
    tokens: usize,
    /// None on the CPU's f32 path, which needs nothing precomputed.
    groups: Option<Vec<Group>>,
}

/// A padded batch of sequences for the device-generic attention: `s` sequences of up to `t` queries and `l` keys.
struct Group {
    s: usize,
    t: usize,
    l: usize,
    /// (s * t): the step token of each query slot (padding repeats the sequence's last token).
    queries: Tensor,
    /// (s * l): the cache row of each key slot (padding repeats the last one).
    keys: Tensor,
    /// (s, 1, t, l) additive: query i of a sequence sees its keys 0..=past + i.
    mask: Tensor,
    /// The query slots that are real tokens, in the group's token order.
    real: Tensor,
}

impl StepLayout {
    /// The layout of `spans` (in token order, covering tokens 0..n) for a model whose attention runs with
    /// `kernels` in `dtype` on `device`.
    pub fn new(spans: Vec<SeqSpan>, kernels: Kernels, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let tokens = spans.iter().map(|s| s.len).sum();
        let mut next = 0;
        for s in &spans {
            if s.token != next || s.len == 0 {
                candle_core::bail!("step layout: spans must cover the tokens in order, got {s:?} at token {next}");
            }
            next += s.len;
        }
        let groups = if cpu_path(kernels, dtype, device) {
            None
        } else {
            // The leading one-token sequences (the engine puts its decoding rows first) in one group, each later
            // sequence (a prefill chunk, of any length) on its own: the groups' outputs are then in token order.
            let lead = spans.iter().take_while(|s| s.len == 1).count();
            let mut groups = Vec::new();
            if lead > 0 {
                groups.push(Group::new(&spans[..lead], dtype, device)?);
            }
            for s in &spans[lead..] {
                groups.push(Group::new(std::slice::from_ref(s), dtype, device)?);
            }
            Some(groups)
        };
        Ok(StepLayout { spans, tokens, groups })
    }

    /// Tokens in the step.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Whether attention runs as [`cpu_decode::attention`]: the CPU's f32 (fused-kernel) runtime.
fn cpu_path(kernels: Kernels, dtype: DType, device: &Device) -> bool {
    kernels == Kernels::Fused && dtype == DType::F32 && device.is_cpu()
}

impl Group {
    fn new(spans: &[SeqSpan], dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let s = spans.len();
        let t = spans.iter().map(|x| x.len).max().unwrap_or(1);
        let l = spans.iter().map(|x| x.past + x.len).max().unwrap_or(1);
        let (mut queries, mut keys, mut real) = (Vec::with_capacity(s * t), Vec::with_capacity(s * l), Vec::new());
        let mut mask = vec![mask_min(dtype); s * t * l];
        for (g, x) in spans.iter().enumerate() {
            for i in 0..t {
                queries.push((x.token + i.min(x.len - 1)) as u32);
                if i < x.len {
                    real.push((g * t + i) as u32);
                }
                let seen = x.past + i.min(x.len - 1);
                mask[(g * t + i) * l..][..=seen].fill(0.0);
            }
            keys.extend((0..l).map(|p| (x.start + p.min(x.past + x.len - 1)) as u32));
        }
        Ok(Group {
            s,
            t,
            l,
            queries: Tensor::from_vec(queries, s * t, device)?,
            keys: Tensor::from_vec(keys, s * l, device)?,
            mask: Tensor::from_vec(mask, (s, 1, t, l), device)?.to_dtype(dtype)?,
            real: Tensor::from_vec(real, spans.iter().map(|x| x.len).sum::<usize>(), device)?,
        })
    }
}

/// One layer's attention in a packed step: writes the step's keys and values into `layer` at each sequence's
/// positions, then attends. `q`: (1, heads, tokens, head_dim) after the rotary embedding; `k`, `v`: (1, kv_heads,
/// tokens, head_dim). Returns (1, tokens, heads * head_dim).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layer: &mut SlotLayer,
    step: &StepLayout,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let (_, heads, n, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let k_rows = k.squeeze(0)?.transpose(0, 1)?.contiguous()?; // (tokens, kvh, d)
    let v_rows = v.squeeze(0)?.transpose(0, 1)?.contiguous()?;
    for s in &step.spans {
        layer.k.slice_set(&k_rows.narrow(0, s.token, s.len)?, 0, s.start + s.past)?;
        layer.v.slice_set(&v_rows.narrow(0, s.token, s.len)?, 0, s.start + s.past)?;
    }
    let scale = 1.0 / (d as f64).sqrt();
    let Some(groups) = &step.groups else {
        let q = q.contiguous()?;
        let h = Heads { heads, kv_heads: kvh, head_dim: d, tokens: n };
        let mut out = vec![0f32; n * heads * d];
        {
            let (qs, kc, vc) = (cpu_slice(&q)?, cpu_slice(&layer.k)?, cpu_slice(&layer.v)?);
            cpu_decode::attention(&qs, &kc, &vc, &step.spans, h, scale as f32, &mut out);
        }
        return Tensor::from_vec(out, (1, n, heads * d), q.device());
    };
    let rep = heads / kvh;
    let q_rows = q.squeeze(0)?.transpose(0, 1)?.contiguous()?; // (tokens, heads, d)
    let mut outs = Vec::with_capacity(groups.len());
    for g in groups {
        let qg = q_rows.index_select(&g.queries, 0)?.reshape((g.s, g.t, heads, d))?.transpose(1, 2)?.contiguous()?;
        let qg = qg.reshape((g.s, kvh, rep * g.t, d))?;
        let gather = |arena: &Tensor| -> candle_core::Result<Tensor> {
            arena.index_select(&g.keys, 0)?.reshape((g.s, g.l, kvh, d))?.transpose(1, 2)?.contiguous()
        };
        let (kg, vg) = (gather(&layer.k)?, gather(&layer.v)?);
        let scores = qg.matmul(&kg.t()?)?.reshape((g.s, heads, g.t, g.l))?;
        let probs = ops::attention_softmax(kernels, &scores, &g.mask, scale)?.to_dtype(vg.dtype())?;
        let out = probs.reshape((g.s, kvh, rep * g.t, g.l))?.matmul(&vg)?; // (s, kvh, rep * t, d)
        let out = out.reshape((g.s, heads, g.t, d))?.transpose(1, 2)?.reshape((g.s * g.t, heads * d))?;
        outs.push(out.index_select(&g.real, 0)?);
    }
    Tensor::cat(&outs, 0)?.unsqueeze(0)
}

/// The f32 elements of a contiguous CPU tensor (a copy-free view while the guard lives).
fn cpu_slice(t: &Tensor) -> candle_core::Result<CpuView<'_>> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!("slot attention: expected a contiguous tensor");
    }
    let (start, len) = (layout.start_offset(), layout.shape().elem_count());
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)) => Ok(CpuView { storage, start, len }),
        _ => candle_core::bail!("slot attention: expected f32 on the CPU"),
    }
}

/// A read guard on a CPU tensor's f32 elements.
struct CpuView<'a> {
    storage: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for CpuView<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => &[],
        }
    }
}
