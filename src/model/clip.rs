//! The CLIP vision transformer (Radford et al. 2021) as in transformers' `CLIPVisionModel`, returning the hidden state
//! of one chosen layer (LLaVA's `vision_feature_layer`, -2 for LLaVA-1.5) rather than the last.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::checkpoint::{Block, Tape};
use super::config::ClipVisionConfig;
use super::linear::{Linear, Pass};
use super::ops::{self, Kernels};
use super::runtime::Runtime;

#[derive(Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Clone)]
struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    heads: usize,
    act: ops::Activation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(EncoderLayer {
            q_proj: Linear::load(attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(attn.pp("out_proj"), h, h, true)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), h, eps)?,
            fc1: Linear::load(mlp.pp("fc1"), h, i, true)?,
            fc2: Linear::load(mlp.pp("fc2"), i, h, true)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), h, eps)?,
            heads: cfg.num_attention_heads,
            act: ops::Activation::from_name(&cfg.hidden_act).map_err(candle_core::Error::msg)?,
        })
    }

    fn forward(&self, kernels: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
        let pass = Pass::BASE;
        let (b, n, h) = x.dims3()?;
        let hd = h / self.heads;
        let y = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split((self.q_proj.forward(&y, pass)? * (1.0 / (hd as f64).sqrt()))?)?;
        let k = split(self.k_proj.forward(&y, pass)?)?;
        let v = split(self.v_proj.forward(&y, pass)?)?;
        let probs = ops::softmax(kernels, &q.matmul(&k.t()?)?)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        let x = (x + self.out_proj.forward(&attn, pass)?)?;
        let y = self.layer_norm2.forward(&x)?;
        let y = self.fc2.forward(&self.act.apply(&self.fc1.forward(&y, pass)?)?, pass)?;
        x + y
    }
}

#[derive(Clone)]
pub struct ClipVision {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    cfg: ClipVisionConfig,
    dtype: DType,
    kernels: Kernels,
}

impl ClipVision {
    /// `vb` points at `vision_model`. Only the layers up to `keep_layers` are loaded: LLaVA never uses the rest
    /// (nor `post_layernorm`).
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig, keep_layers: usize, rt: &Runtime) -> candle_core::Result<Self> {
        let (h, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = vb.pp("embeddings");
        let positions = cfg.grid() * cfg.grid() + 1;
        Ok(ClipVision {
            patch_embedding: emb.pp("patch_embedding").get((h, c, p, p), "weight")?,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.pp("position_embedding").get((positions, h), "weight")?,
            // transformers' spelling.
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            layers: (0..keep_layers)
                .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), cfg))
                .collect::<candle_core::Result<_>>()?,
            cfg: cfg.clone(),
            dtype: rt.dtype,
            kernels: rt.kernels,
        })
    }

    /// Hidden state after `self.layers.len()` encoder layers (`hidden_states[n]` in transformers, counting the embedding
    /// output as 0): (b, grid^2 + 1, hidden), class token first. `pixels`: (b, 3, image_size, image_size).
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_checkpointed(pixels, None)
    }

    /// [`ClipVision::forward`]; with `tape`, every encoder layer is checkpointed (the tower trains with
    /// `--train-vision`).
    pub fn forward_checkpointed<'a>(
        &'a self,
        pixels: &Tensor,
        tape: Option<&mut Tape<'a>>,
    ) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        // Weights that train (--train-vision) are f32 masters: cast to the compute dtype where used.
        let patches = self
            .patchify(&pixels.to_dtype(self.dtype)?)?
            .broadcast_matmul(&self.patch_embedding.to_dtype(self.dtype)?.flatten_from(1)?.t()?)?; // (b, grid^2, hidden)
        let class = self
            .class_embedding
            .to_dtype(self.dtype)?
            .reshape((1, 1, self.cfg.hidden_size))?
            .broadcast_as((b, 1, self.cfg.hidden_size))?;
        let x = Tensor::cat(&[class, patches], 1)?
            .broadcast_add(&self.position_embedding.to_dtype(self.dtype)?.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let kernels = self.kernels;
        let Some(tape) = tape else {
            for layer in &self.layers {
                x = layer.forward(kernels, &x)?;
            }
            return Ok(x);
        };
        let msg = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        for layer in &self.layers {
            let run: Block<'a> = Box::new(move |xs: &[Tensor]| Ok(vec![layer.forward(kernels, &xs[0])?]));
            x = tape.checkpoint(vec![x], run).map_err(msg)?.remove(0);
        }
        Ok(tape.leaves(&[x]).map_err(msg)?.remove(0))
    }

    /// The patch embedding's input: non-overlapping `patch x patch` squares of `pixels` (b, c, H, W) in row-major grid
    /// order, each flattened as (c, y, x): (b, grid^2, c * patch^2). The convolution of stride = kernel is then one
    /// matmul, on every device and dtype (candle's CPU convolution has no bf16 kernel).
    fn patchify(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = pixels.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?.reshape((b, c, gh, p, gw, p))?;
        x.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))
    }

    /// Layers needed for `vision_feature_layer` (negative counts from the end, as in transformers).
    pub fn layers_for(feature_layer: i64, total: usize) -> usize {
        if feature_layer < 0 {
            (total as i64 + 1 + feature_layer).max(0) as usize
        } else {
            feature_layer as usize
        }
    }
}

/// Drop the class token (`default` strategy).
pub fn drop_class(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(1)?;
    x.narrow(1, 1, n - 1)
}
