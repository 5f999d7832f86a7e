//! Benchmarks on random-weight models: the configurations of `shared/reference.md` ("tiny" and "small"), so the
//! numbers can be compared with the PyTorch baseline measured there, and LLaVA-1.5 7B / 13B with their real shapes
//! for GPUs. Weights are drawn in memory on the target device ([`Size::random_vlm`]); nothing large touches disk.

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::model::Vlm;
use crate::model::{init, LoadOptions, ModelConfig, Runtime};
use crate::Result;

mod generate;
mod mixed;
mod train;

pub use generate::{bootstrap_throughput, generate_throughput, BootstrapFigures, GenerateFigures};
pub use mixed::{mixed_workload, MixedFigures};
pub use train::{train_step, TrainBench, TrainFigures};

/// Model shapes to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Size {
    /// Llama 128 hidden, 2 layers, GQA 4/2 heads; CLIP 32 px, patch 8; vocab 1024 (0.7 M parameters).
    Tiny,
    /// Llama 512 hidden, 8 layers; CLIP 224 px, patch 14, 4 layers; vocab 32064 (62 M parameters).
    Small,
    /// LLaVA-1.5-7B: Llama 4096 x 32 layers, 32 heads, MLP 11008; CLIP ViT-L/14-336 (24 layers x 1024); vocab 32064.
    #[cfg_attr(feature = "clap", value(name = "llava-7b"))]
    Llava7b,
    /// LLaVA-1.5-13B: Llama 5120 x 40 layers, 40 heads, MLP 13824; the same CLIP tower; vocab 32064.
    #[cfg_attr(feature = "clap", value(name = "llava-13b"))]
    Llava13b,
}

impl Size {
    /// The llava-hf `config.json` of this size.
    pub fn config(self) -> serde_json::Value {
        self.config_with_layers(None)
    }

    /// The llava-hf `config.json` of this size with the decoder cut to `layers` (None: the size's own depth; every
    /// width, the vision tower and the vocabulary stay). Lets 7B and 13B shapes run on a small machine: every op at
    /// the real widths, and per-layer costs separated from fixed ones by comparing two depths.
    pub fn config_with_layers(self, layers: Option<usize>) -> serde_json::Value {
        // text: (hidden, intermediate, layers, heads, kv heads); vision: (image, patch, hidden, intermediate, layers, heads)
        let (mut text, vision, vocab, context) = match self {
            Size::Tiny => ((128, 256, 2, 4, 2), (32, 8, 64, 256, 2, 4), 1024, 2048),
            Size::Small => ((512, 1376, 8, 8, 8), (224, 14, 256, 1024, 4, 4), 32064, 2048),
            Size::Llava7b => ((4096, 11008, 32, 32, 32), (336, 14, 1024, 4096, 24, 16), 32064, 4096),
            Size::Llava13b => ((5120, 13824, 40, 40, 40), (336, 14, 1024, 4096, 24, 16), 32064, 4096),
        };
        text.2 = layers.unwrap_or(text.2);
        serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 4, "pad_token_id": 3, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": text.0, "intermediate_size": text.1,
                "num_hidden_layers": text.2, "num_attention_heads": text.3, "num_key_value_heads": text.4,
                "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": context,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
            "vision_config": {"model_type": "clip_vision_model", "image_size": vision.0, "patch_size": vision.1,
                "hidden_size": vision.2, "intermediate_size": vision.3, "num_hidden_layers": vision.4,
                "num_attention_heads": vision.5, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        })
    }

    /// Writes the small files of a model folder of this size: config, a word-level tokenizer, and the image
    /// processor settings of its CLIP resolution (no weights).
    pub fn write_config(self, dir: &Path) -> Result<()> {
        self.write_config_with_layers(None, dir)
    }

    /// [`Size::write_config`] with the decoder cut to `layers` ([`Size::config_with_layers`]).
    pub fn write_config_with_layers(self, layers: Option<usize>, dir: &Path) -> Result<()> {
        let cfg = self.config_with_layers(layers);
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        crate::output::write_bytes(
            &cfg_path,
            serde_json::to_string_pretty(&cfg).map_err(crate::Error::invalid)?.as_bytes(),
        )?;
        let px = &cfg["vision_config"]["image_size"];
        let pre = serde_json::json!({"size": {"shortest_edge": px}, "crop_size": {"height": px, "width": px}});
        let pre_path = dir.join("preprocessor_config.json");
        crate::output::write_bytes(&pre_path, pre.to_string().as_bytes())?;
        let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap_or(1024) as usize;
        let n_special = crate::text::tokenizer::WORD_LEVEL_SPECIALS.len();
        let words: Vec<String> = (n_special..vocab).map(|i| format!("w{i}")).collect();
        crate::text::tokenizer::write_word_level(dir, &words)
    }

    /// Writes a random-weight model folder of this size (weights included: meant for the small sizes).
    pub fn write_model(self, dir: &Path, seed: u64) -> Result<()> {
        init::random_checkpoint(dir, &self.config(), seed)?;
        self.write_config(dir)
    }

    /// A random-weight model of this size built in memory on `rt` (weights N(0, 0.02), norms 1, biases 0), with
    /// its tokenizer and image processor from the small files written into `dir`.
    pub fn random_vlm(self, rt: &Runtime, dir: &Path) -> Result<Vlm> {
        self.random_vlm_with_layers(None, rt, dir)
    }

    /// [`Size::random_vlm`] with the decoder cut to `layers` ([`Size::config_with_layers`]).
    pub fn random_vlm_with_layers(self, layers: Option<usize>, rt: &Runtime, dir: &Path) -> Result<Vlm> {
        self.write_config_with_layers(layers, dir)?;
        let config = ModelConfig::from_dir(dir)?;
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), rt.dtype, rt.device.clone());
        let model = crate::model::load::build(vb, &config, &LoadOptions::new(rt))?;
        Vlm::from_model(model, dir, crate::text::Template::VicunaV1)
    }

    /// Parameters of the language model's linear layers and head: what a token's forward pass multiplies by.
    pub fn llm_matmul_params(self) -> usize {
        self.llm_matmul_params_with_layers(None)
    }

    /// [`Size::llm_matmul_params`] with the decoder cut to `layers`.
    pub fn llm_matmul_params_with_layers(self, layers: Option<usize>) -> usize {
        let t = &self.config_with_layers(layers)["text_config"];
        let g = |k: &str| t[k].as_u64().unwrap_or(0) as usize;
        let (h, i, l, v) = (g("hidden_size"), g("intermediate_size"), g("num_hidden_layers"), g("vocab_size"));
        let kv = h / g("num_attention_heads") * g("num_key_value_heads");
        l * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    }
}

/// Random weights for [`Size::random_vlm`].
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let leaf = name.rsplit('.').nth(1).unwrap_or_default();
        let t = if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, dev)?
        } else if leaf.contains("norm") || leaf.contains("layrnorm") {
            Tensor::ones(shape, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl Size {
    /// Image positions per image of this size (patch tokens, class token dropped).
    pub fn image_positions(self) -> usize {
        let v = &self.config()["vision_config"];
        let grid = v["image_size"].as_u64().unwrap_or(0) / v["patch_size"].as_u64().unwrap_or(1);
        (grid * grid) as usize
    }
}
