//! The Llama decoder (Touvron et al. 2023) as in transformers' `modeling_llama.py`: RMSNorm, rotary embeddings with
//! `rope_theta` and `linear` / `dynamic` / `llama3` scaling, grouped-query attention, SwiGLU MLP, tied or untied
//! `lm_head`. Returns hidden states for every position (training needs them all); [`Llama::logits`] projects them.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

use super::checkpoint::{Block, Tape};
use super::config::{LlamaConfig, RopeType};
use super::linear::{DropoutSeed, Linear, Pass};
use super::ops::{self, Kernels};
use super::runtime::Runtime;
use super::slots::{self, SlotCache, SlotLayer, StepLayout};

/// Per-layer key/value cache for incremental decoding (preallocated, appended in place: no copy per token).
pub struct Cache {
    layers: Vec<KvCache>,
}

impl Cache {
    pub fn new(cfg: &LlamaConfig, max_len: usize) -> Self {
        Cache { layers: (0..cfg.num_hidden_layers).map(|_| KvCache::new(2, max_len.max(1))).collect() }
    }
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.current_seq_len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows that go through the decoder beside others, layer by layer: the training forward pass of a batch of prompts
/// and of the answers that continue them ([`Llama::forward_segments`]).
pub struct Segment {
    /// (b, t, hidden).
    pub embeds: Tensor,
    /// (b, t) u32.
    pub positions: Tensor,
    /// Additive (b, 1, t, k) with k = t, or the preceding segment's width + t when `after` is set.
    pub mask: Tensor,
    /// (segment index, rows u32 (b)): row r attends first to row `rows[r]` of that earlier segment's keys and
    /// values (an answer after its prompt), which then get gradients from both.
    pub after: Option<(usize, Tensor)>,
}

/// What a segment's attention needs in every layer.
struct SegmentContext {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    after: Option<(usize, Tensor)>,
    /// A later segment attends to this one's keys and values.
    record: bool,
}

/// Where a layer's attention gets keys and values besides its own tokens.
enum Kv<'a> {
    /// Incremental decoding (or nothing).
    Cache(Option<&'a mut KvCache>),
    /// Keep this layer's keys and values.
    Record(&'a mut Option<(Tensor, Tensor)>),
    /// Prepend prefix row `rows[r]` to row r.
    Prefix(&'a (Tensor, Tensor), &'a Tensor),
    /// A packed step of the generation engine: each sequence's keys and values in its slot (see [`super::slots`]).
    Slots(&'a mut SlotLayer, &'a StepLayout),
}

/// Inverse frequencies of the rotary embedding, with the checkpoint's scaling applied.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    cfg: LlamaConfig,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig) -> Self {
        Rope { inv_freq: inv_freq(cfg, None), cfg: cfg.clone() }
    }

    /// cos and sin for `positions` (b, t): each (b, t, head_dim / 2), in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        // Only dynamic NTK scaling depends on the longest position, and only it reads one value back from the device.
        let dynamic = self.cfg.rope().is_some_and(|s| s.rope_type == RopeType::Dynamic);
        let max_pos =
            if dynamic { positions.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? as usize + 1 } else { 0 };
        let inv = if dynamic && max_pos > self.cfg.max_position_embeddings {
            inv_freq(&self.cfg, Some(max_pos))
        } else {
            self.inv_freq.clone()
        };
        let n = inv.len();
        let inv = Tensor::from_vec(inv, (1, 1, n), positions.device())?;
        let freqs = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?.broadcast_mul(&inv)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

/// transformers' `ROPE_INIT_FUNCTIONS` for the kinds Llama checkpoints use. `seq_len` is for dynamic NTK scaling.
fn inv_freq(cfg: &LlamaConfig, seq_len: Option<usize>) -> Vec<f32> {
    let dim = cfg.head_dim();
    let scaling = cfg.rope();
    let mut theta = scaling.and_then(|s| s.rope_theta).unwrap_or(cfg.rope_theta);
    let kind = scaling.map_or(RopeType::Default, |s| s.rope_type);
    if let (Some(s), RopeType::Dynamic, Some(len)) = (scaling, kind, seq_len) {
        let max = cfg.max_position_embeddings as f64;
        theta *= ((s.factor * len as f64 / max) - (s.factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
    }
    let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect();
    let freqs: Vec<f64> = match (kind, scaling) {
        (RopeType::Linear, Some(s)) => base.iter().map(|f| f / s.factor).collect(),
        (RopeType::Llama3, Some(s)) => {
            let old = s.original_max_position_embeddings.unwrap_or(cfg.max_position_embeddings) as f64;
            let (low_wl, high_wl) = (old / s.low_freq_factor, old / s.high_freq_factor);
            base.iter()
                .map(|&f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < high_wl {
                        f
                    } else if wl > low_wl {
                        f / s.factor
                    } else {
                        let smooth = (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect()
        }
        _ => base,
    };
    // transformers builds inv_freq in f32 from an int64 arange; computing in f64 and rounding once is within 1 ulp.
    freqs.into_iter().map(|f| f as f32).collect()
}

pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kernels: Kernels,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, kernels: Kernels) -> candle_core::Result<Self> {
        let (h, hd, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.kv_heads());
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Linear::load(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, kvh * hd, bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, kvh * hd, bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), cfg.num_attention_heads * hd, h, bias)?,
            heads: cfg.num_attention_heads,
            kv_heads: kvh,
            head_dim: hd,
            kernels,
        })
    }

    /// `x`: (b, t, hidden); `mask`: additive (b, 1, t, past + t).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        kv: Kv,
        pass: Pass,
    ) -> candle_core::Result<Tensor> {
        let kernels = self.kernels;
        let (b, t, _) = x.dims3()?;
        let (hd, kvh, rep) = (self.head_dim, self.kv_heads, self.heads / self.kv_heads);
        let q = self.q_proj.forward(x, pass)?.reshape((b, t, self.heads, hd))?.transpose(1, 2)?; // (b, heads, t, hd)
        let k = self.k_proj.forward(x, pass)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?; // (b, kvh, t, hd)
        let v = self.v_proj.forward(x, pass)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let q = ops::rope(kernels, &q, cos, sin)?;
        let k = ops::rope(kernels, &k, cos, sin)?.contiguous()?;
        let (k, v) = match kv {
            Kv::Slots(layer, step) => {
                return self.o_proj.forward(&slots::attend(&q, &k, &v, layer, step, kernels)?, pass)
            }
            Kv::Cache(Some(c)) => c.append(&k, &v)?,
            Kv::Cache(None) => (k, v),
            Kv::Record(out) => {
                *out = Some((k.clone(), v.clone()));
                (k, v)
            }
            Kv::Prefix((pk, pv), rows) => (
                Tensor::cat(&[pk.index_select(rows, 0)?, k], 2)?,
                Tensor::cat(&[pv.index_select(rows, 0)?, v], 2)?.contiguous()?,
            ),
        };
        let total = k.dim(2)?;
        // Grouped-query attention without repeating K/V: the `rep` query heads sharing a KV head are stacked along
        // the time axis, so one batched matmul serves them all. (b, kvh, rep * t, hd)
        let q = q.contiguous()?.reshape((b, kvh, rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, self.heads, t, total))?;
        let probs = ops::attention_softmax(kernels, &scores, mask, 1.0 / (hd as f64).sqrt())?.to_dtype(v.dtype())?;
        let out = probs.reshape((b, kvh, rep * t, total))?.matmul(&v)?; // (b, kvh, rep * t, hd)
        let out = out.reshape((b, self.heads, t, hd))?.transpose(1, 2)?.reshape((b, t, self.heads * hd))?;
        self.o_proj.forward(&out, pass)
    }
}

pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> candle_core::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i, bias)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i, bias)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, bias)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let act = ops::swiglu(&self.gate_proj.forward(x, pass)?, &self.up_proj.forward(x, pass)?)?;
        self.down_proj.forward(&act, pass)
    }
}

pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, kernels: Kernels) -> candle_core::Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, kernels)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: vb.pp("input_layernorm").get(cfg.hidden_size, "weight")?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").get(cfg.hidden_size, "weight")?,
            eps: cfg.rms_norm_eps,
            kernels,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        kv: Kv,
        pass: Pass,
    ) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(self.kernels, x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, cos, sin, mask, kv, pass)?)?;
        let h = ops::rms_norm(self.kernels, &x, &self.post_attention_layernorm, self.eps)?;
        x + self.mlp.forward(&h, pass)?
    }

    /// This layer for every segment, in order (a segment's keys and values recorded for those that follow it).
    fn forward_segments(&self, segs: &[SegmentContext], xs: &[Tensor], pass: Pass) -> candle_core::Result<Vec<Tensor>> {
        let mut recorded: Vec<Option<(Tensor, Tensor)>> = vec![None; segs.len()];
        let mut out = Vec::with_capacity(segs.len());
        for (i, (seg, x)) in segs.iter().zip(xs).enumerate() {
            let y = match &seg.after {
                Some((p, rows)) => {
                    let kv = recorded[*p].as_ref().ok_or_else(|| candle_core::Error::Msg("segment order".into()))?;
                    self.forward(x, &seg.cos, &seg.sin, &seg.mask, Kv::Prefix(kv, rows), pass)?
                }
                None if seg.record => {
                    self.forward(x, &seg.cos, &seg.sin, &seg.mask, Kv::Record(&mut recorded[i]), pass)?
                }
                None => self.forward(x, &seg.cos, &seg.sin, &seg.mask, Kv::Cache(None), pass)?,
            };
            out.push(y);
        }
        Ok(out)
    }

    /// The dropout seed source of this layer's adapters, if it has any.
    fn dropout_seed(&self) -> Option<Arc<DropoutSeed>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            .into_iter()
            .find_map(|l| l.lora.as_ref().map(|l| l.seed.clone()))
    }
}

pub struct Llama {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub rope: Rope,
    pub cfg: LlamaConfig,
    /// Compute dtype and ops path (from the load's [`Runtime`]).
    pub dtype: DType,
    pub kernels: Kernels,
}

impl Llama {
    /// `vb` points at the decoder (`model` in a Llama checkpoint); `head` at `lm_head` (ignored when tied or absent).
    pub fn load(vb: VarBuilder, head: VarBuilder, cfg: &LlamaConfig, rt: &Runtime) -> candle_core::Result<Self> {
        let embed_tokens = vb.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("layers.{i}")), cfg, rt.kernels))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = vb.pp("norm").get(cfg.hidden_size, "weight")?;
        // Tied checkpoints usually omit lm_head; some still store a copy, which is then the same matrix.
        let lm_head = if cfg.tie_word_embeddings && !head.contains_tensor("weight") {
            Linear { weight: embed_tokens.clone(), bias: None, lora: None }
        } else {
            Linear::load(head, cfg.hidden_size, cfg.vocab_size, false)?
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            cfg: cfg.clone(),
            dtype: rt.dtype,
            kernels: rt.kernels,
        })
    }

    /// Token embeddings for `ids` (b, t).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?
            .to_dtype(self.dtype)
    }

    /// Final-norm hidden states (b, t, hidden) for input embeddings (b, t, hidden) at `positions` (b, t).
    /// `mask` is additive, (b, 1, t, cached + t) (see [`causal_mask`]).
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Cache>,
        pass: Pass,
    ) -> candle_core::Result<Tensor> {
        let Some(cache) = cache else {
            let seg = Segment { embeds: embeds.clone(), positions: positions.clone(), mask: mask.clone(), after: None };
            return Ok(self.forward_segments(&[seg], pass, None)?.remove(0));
        };
        let (cos, sin) = self.rope.cos_sin(positions, embeds.dtype())?;
        let mut x = embeds.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, mask, Kv::Cache(Some(kv)), pass)?;
        }
        ops::rms_norm(self.kernels, &x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Final-norm hidden states (1, tokens, hidden) of a packed step of the generation engine: `embeds` (1, tokens,
    /// hidden) are the new tokens of the sequences `step` lays out, at `positions` (1, tokens); each attends to its
    /// own keys in `cache`, where the step's keys and values are written (see [`super::slots`]).
    pub fn forward_slots(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        cache: &mut SlotCache,
        step: &StepLayout,
        pass: Pass,
    ) -> candle_core::Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            candle_core::bail!("slot cache has {} layers, the model {}", cache.layers.len(), self.layers.len());
        }
        let (cos, sin) = self.rope.cos_sin(positions, embeds.dtype())?;
        // Slot attention masks by sequence itself: the additive mask argument is not read.
        let unused = Tensor::zeros((), self.dtype, embeds.device())?;
        let mut x = embeds.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, &unused, Kv::Slots(kv, step), pass)?;
        }
        ops::rms_norm(self.kernels, &x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Final-norm hidden states of each segment, the segments going through the decoder together, layer by layer
    /// (an answer segment attends to its prompt segment's keys and values of the same layer). With `tape`, every
    /// layer is checkpointed: its activations are dropped after the forward pass and recomputed in the backward
    /// pass ([`super::checkpoint`]).
    pub fn forward_segments<'a>(
        &'a self,
        segments: &[Segment],
        pass: Pass,
        tape: Option<&mut Tape<'a>>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut ctx = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            let (cos, sin) = self.rope.cos_sin(&s.positions, s.embeds.dtype())?;
            let record = segments[i + 1..].iter().any(|later| later.after.as_ref().is_some_and(|(p, _)| *p == i));
            ctx.push(SegmentContext { cos, sin, mask: s.mask.clone(), after: s.after.clone(), record });
        }
        let mut xs: Vec<Tensor> = segments.iter().map(|s| s.embeds.clone()).collect();
        match tape {
            None => {
                for layer in &self.layers {
                    xs = layer.forward_segments(&ctx, &xs, pass)?;
                }
            }
            Some(tape) => {
                let ctx = Arc::new(ctx);
                for layer in &self.layers {
                    let (ctx, seed) = (ctx.clone(), layer.dropout_seed());
                    // The recomputation draws the dropout masks this pass draws.
                    let start = seed.as_ref().map(|s| s.position());
                    let run: Block<'a> = Box::new(move |xs: &[Tensor]| {
                        if let (Some(seed), Some(start)) = (&seed, start) {
                            seed.rewind(start);
                        }
                        layer.forward_segments(&ctx, xs, pass)
                    });
                    xs = tape.checkpoint(xs, run).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                xs = tape.leaves(&xs).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
        }
        xs.iter().map(|x| ops::rms_norm(self.kernels, x, &self.norm, self.cfg.rms_norm_eps)).collect()
    }

    /// Vocabulary logits for hidden states (..., hidden).
    pub fn logits(&self, hidden: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden, pass)
    }

    /// Every linear layer of the decoder with its module path under the decoder (`layers.0.self_attn.q_proj`, ...),
    /// for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// The seed source of the LoRA dropout masks (shared by every adapter), if adapters are attached.
    pub fn dropout_seed(&mut self) -> Option<Arc<DropoutSeed>> {
        self.linears_mut().into_iter().find_map(|(_, l)| l.lora.as_ref().map(|l| l.seed.clone()))
    }

    /// Sets the dropout probability of every attached adapter.
    pub fn set_lora_dropout(&mut self, p: f32) {
        for (_, l) in self.linears_mut() {
            if let Some(l) = l.lora.as_mut() {
                l.dropout = p;
            }
        }
    }
}

/// The additive mask value of a hidden key: the dtype's most negative finite number.
pub fn mask_min(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f32::from(half::f16::MIN),
        DType::BF16 => f32::from(half::bf16::MIN),
        _ => f32::MIN,
    }
}

/// Additive attention mask (b, 1, t, past + t) for queries at cache offset `past`: query i sees key j when
/// `j <= past + i` and key j is not padding (`key_mask[j] != 0`; `key_mask`: (b, past + t), u8/u32). Built on the
/// key mask's device.
pub fn causal_mask(key_mask: &Tensor, t: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, total) = key_mask.dims2()?;
    let past = total - t;
    let device = key_mask.device();
    let neg = mask_min(dtype);
    let keys = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let queries = Tensor::arange(past as u32, total as u32, device)?.reshape((t, 1))?;
    let causal = keys.broadcast_le(&queries)?.unsqueeze(0)?; // (1, t, total)
    let present = key_mask.ne(0u32)?.unsqueeze(1)?; // (b, 1, total)
    let seen = causal.broadcast_mul(&present)?.unsqueeze(1)?; // (b, 1, t, total), u8
    let zeros = Tensor::zeros((b, 1, t, total), dtype, device)?;
    let hidden = Tensor::full(neg, (b, 1, t, total), device)?.to_dtype(dtype)?;
    seen.where_cond(&zeros, &hidden)
}
