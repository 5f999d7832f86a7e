//! The demo's tiny LLaVA: a llava-hf `config.json` (CLIP vision tower, GELU MLP projector, Llama), random
//! initialisation through [`crate::model::init::random_checkpoint`], and the files that make the folder a model
//! every other `bpo` command (and transformers) loads: word-level tokenizer, `preprocessor_config.json`.
//!
//! Seeing well comes first (demo-world.md, lesson 1). Inside LLaVA's architecture the lever is the patch size:
//! here a patch is one 16-pixel cell of the scene grid, so each of the 9 image positions holds at most one
//! object. Measured on this world (3000 images, 800 steps): with 8-pixel patches (36 positions) the model stayed
//! blind to shape; with cell-sized patches its descriptions reached object recall 0.92 — even with the vision
//! tower left at its random initialisation and only the projector and language model trained, which is what the
//! project's trainer does (random features of a whole cell are easy to read). The tower uses its last layer
//! (`vision_feature_layer` -1) rather than LLaVA's second-to-last, which would leave a layer unused.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::output::write_json;
use crate::text::tokenizer::{write_word_level, WORD_LEVEL_SPECIALS};
use crate::Result;

/// Sizes of the demo model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    /// One matrix for input embeddings and output head.
    pub tie_embeddings: bool,
}

impl ModelSpec {
    /// The demo's model: about 0.6 M parameters.
    pub fn standard() -> Self {
        ModelSpec {
            image_size: 48,
            patch_size: 16,
            vision_hidden: 96,
            vision_layers: 2,
            vision_heads: 4,
            hidden: 128,
            intermediate: 256,
            layers: 3,
            heads: 4,
            tie_embeddings: true,
        }
    }

    /// For tests: a few thousand parameters.
    pub fn quick() -> Self {
        ModelSpec {
            image_size: 24,
            patch_size: 8,
            vision_hidden: 16,
            vision_layers: 1,
            vision_heads: 2,
            hidden: 32,
            intermediate: 64,
            layers: 1,
            heads: 2,
            tie_embeddings: false,
        }
    }

    /// Image positions in the language model's sequence.
    pub fn image_tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The llava-hf `config.json` for a vocabulary of `words` words (special tokens come first).
    pub fn config(&self, words: usize) -> serde_json::Value {
        let vocab = (WORD_LEVEL_SPECIALS.len() + words).next_multiple_of(8);
        let image_token = WORD_LEVEL_SPECIALS.iter().position(|t| *t == "<image>").unwrap_or(4);
        json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": image_token, "pad_token_id": 3, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
                "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": self.tie_embeddings},
            "vision_config": {"model_type": "clip_vision_model", "image_size": self.image_size, "patch_size": self.patch_size,
                "hidden_size": self.vision_hidden, "intermediate_size": 2 * self.vision_hidden,
                "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        })
    }
}

/// `preprocessor_config.json` of a CLIP processor working at `size` pixels (the world's images are already that
/// size and square, so resizing and cropping change nothing).
pub fn preprocessor_config(size: usize) -> serde_json::Value {
    json!({
        "crop_size": {"height": size, "width": size}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1.0 / 255.0, "size": {"shortest_edge": size}
    })
}

/// Writes a random-weight model folder: config, weights, tokenizer for `words`, image processor.
pub fn init_model(dir: &Path, spec: &ModelSpec, words: &[String], seed: u64) -> Result<()> {
    crate::model::init::random_checkpoint(dir, &spec.config(words.len()), seed)?;
    write_word_level(dir, words)?;
    let write = |name: &str, v: serde_json::Value| write_json(&dir.join(name), &v);
    write("preprocessor_config.json", preprocessor_config(spec.image_size))?;
    write(
        "special_tokens_map.json",
        json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}),
    )?;
    write("generation_config.json", json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use crate::model::Vlm;
    use crate::text::Template;

    #[test]
    fn a_fresh_demo_model_loads_and_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let words = crate::demo::data::tokenizer_words();
        init_model(tmp.path(), &ModelSpec::quick(), &words, 1).unwrap();
        let vlm = Vlm::load(tmp.path(), &LoadOptions::default(), Template::LlavaHf).unwrap();
        assert_eq!(vlm.model.image_tokens(), ModelSpec::quick().image_tokens());
        assert!(vlm.tok.vocab_size() <= vlm.model.llm.cfg.vocab_size);
        let img = image::RgbImage::new(24, 24);
        let path = tmp.path().join("x.png");
        img.save(&path).unwrap();
        let px = vlm.load_image(&path).unwrap();
        assert_eq!(px.dims(), &[3, 24, 24]);
        let params = crate::generate::SamplingParams { max_new_tokens: 3, ..Default::default() };
        let req = vlm.request(crate::demo::world::DESCRIBE, Some(px), &params, 0).unwrap();
        let out = vlm.answer(vec![req], crate::model::Pass::INFER).unwrap();
        assert_eq!(out.len(), 1);
    }
}
