//! Model configs as they appear in `config.json` (serde structs with transformers' defaults for absent keys).
//!
//! Three folder kinds are recognised: llava-hf `LlavaForConditionalGeneration` (nested `text_config` /
//! `vision_config`), the original LLaVA release (`LlavaLlamaForCausalLM`: a flat Llama config plus `mm_*` keys, vision
//! tower assumed to be CLIP ViT-L/14-336), and a plain `LlamaForCausalLM` text model.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

mod check;

/// `LlamaConfig` fields (transformers defaults where real configs omit them).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Grouped-query attention; absent means one KV head per query head.
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f64,
    /// `linear`, `dynamic` or `llama3` scaling (transformers 4); read through [`LlamaConfig::rope`].
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5's name for the same settings (with `rope_theta` inside); a config may carry both keys.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosIds>,
    pub pad_token_id: Option<u32>,
}

/// `eos_token_id` is an int in Llama-2 configs and a list in Llama-3 ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            EosIds::One(id) => vec![*id],
            EosIds::Many(ids) => ids.clone(),
        }
    }
}

/// The RoPE kinds bpo computes (transformers' `ROPE_INIT_FUNCTIONS` that Llama checkpoints use); a config naming
/// another (`yarn`, `longrope`, ...) is refused when it is read, not computed as plain RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    #[default]
    Default,
    Linear,
    Dynamic,
    Llama3,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type", default)]
    pub rope_type: RopeType,
    #[serde(default = "d_one")]
    pub factor: f64,
    #[serde(default = "d_one")]
    pub low_freq_factor: f64,
    #[serde(default = "d_four")]
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: Option<usize>,
    /// transformers 5 keeps `rope_theta` inside `rope_parameters`.
    pub rope_theta: Option<f64>,
}

/// `CLIPVisionConfig` fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_clip_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_three")]
    pub num_channels: usize,
    #[serde(default = "d_clip_image")]
    pub image_size: usize,
    #[serde(default = "d_clip_patch")]
    pub patch_size: usize,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
}

impl ClipVisionConfig {
    /// Patches per side: the patch convolution has stride = kernel = patch, so a remainder is dropped.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5.
    pub fn vit_l_14_336() -> Self {
        ClipVisionConfig {
            hidden_size: d_clip_hidden(),
            intermediate_size: d_clip_intermediate(),
            num_hidden_layers: d_clip_layers(),
            num_attention_heads: d_clip_heads(),
            num_channels: 3,
            image_size: d_clip_image(),
            patch_size: d_clip_patch(),
            layer_norm_eps: d_ln_eps(),
            hidden_act: d_quick_gelu(),
        }
    }
}

/// Which positions of the selected CLIP layer become image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureStrategy {
    /// Drop the class token: `grid^2` image positions (LLaVA-1.5).
    Default,
    /// Keep the class token: `grid^2 + 1` positions.
    Full,
}

/// A LLaVA model: vision tower + projector + Llama.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub text: LlamaConfig,
    pub vision: ClipVisionConfig,
    pub image_token_index: u32,
    pub vision_feature_layer: i64,
    pub feature_strategy: FeatureStrategy,
    /// `gelu` (exact, erf) for LLaVA-1.5.
    pub projector_hidden_act: String,
    pub projector_bias: bool,
    /// Where the tensors live in the checkpoint.
    pub layout: TensorLayout,
}

impl LlavaConfig {
    /// Image positions each image expands to.
    pub fn image_tokens(&self) -> usize {
        let g = self.vision.grid();
        match self.feature_strategy {
            FeatureStrategy::Default => g * g,
            FeatureStrategy::Full => g * g + 1,
        }
    }
}

/// Tensor-name families seen in the wild; everything is loaded through the llava-hf (older transformers) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    /// `language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*` (llava-hf checkpoints).
    LlavaHf,
    /// `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head` (transformers >= 4.52).
    LlavaHfNew,
    /// `model.layers.*`, `model.mm_projector.{0,2}`, `model.vision_tower.vision_tower.*` (liuhaotian/llava-v1.5).
    Original,
}

#[derive(Deserialize)]
struct RawLlava {
    text_config: Option<LlamaConfig>,
    vision_config: Option<ClipVisionConfig>,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    image_token_index: u32,
    #[serde(default = "d_feature_layer")]
    vision_feature_layer: i64,
    #[serde(default = "d_strategy")]
    vision_feature_select_strategy: FeatureStrategy,
    #[serde(default = "d_gelu")]
    projector_hidden_act: String,
    #[serde(default = "d_true")]
    multimodal_projector_bias: bool,
    // Original LLaVA keys.
    mm_vision_select_layer: Option<i64>,
    mm_vision_select_feature: Option<String>,
    mm_projector_type: Option<String>,
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
}

/// What `config.json` describes.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Llava(LlavaConfig),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads `dir/config.json`, decides which architecture it is and checks its fields ([`ModelConfig::check`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let config = Self::parse_file(&path)?;
        config.check().map_err(|msg| Error::parse(&path, None, msg))?;
        Ok(config)
    }

    fn parse_file(path: &Path) -> Result<Self> {
        let text = crate::jsonl::read_folder_file_required(path)?;
        let parse = |e: serde_json::Error| Error::parse(path, None, e);
        let head: Head = serde_json::from_str(&text).map_err(parse)?;
        let arch = head.architectures.first().cloned().unwrap_or_default();
        match (arch.as_str(), head.model_type.as_str()) {
            ("LlavaForConditionalGeneration", _) | ("", "llava") => {
                let raw: RawLlava = serde_json::from_str(&text).map_err(parse)?;
                let text_config: LlamaConfig = match raw.text_config {
                    Some(t) => t,
                    None => serde_json::from_str("{}").map_err(parse)?,
                };
                Ok(ModelConfig::Llava(LlavaConfig {
                    text: text_config,
                    vision: raw.vision_config.unwrap_or_else(ClipVisionConfig::vit_l_14_336),
                    image_token_index: raw.image_token_index,
                    vision_feature_layer: raw.vision_feature_layer,
                    feature_strategy: raw.vision_feature_select_strategy,
                    projector_hidden_act: raw.projector_hidden_act,
                    projector_bias: raw.multimodal_projector_bias,
                    layout: TensorLayout::LlavaHf,
                }))
            }
            ("LlavaLlamaForCausalLM", _) => {
                let raw: RawLlava = serde_json::from_str(&text).map_err(parse)?;
                if let Some(kind) = raw.mm_projector_type.as_deref().filter(|k| *k != "mlp2x_gelu") {
                    return Err(Error::parse(path, None, format!("mm_projector_type {kind:?} is not supported (only mlp2x_gelu)")));
                }
                let strategy = match raw.mm_vision_select_feature.as_deref() {
                    Some("cls_patch") => FeatureStrategy::Full,
                    _ => FeatureStrategy::Default,
                };
                Ok(ModelConfig::Llava(LlavaConfig {
                    text: serde_json::from_str(&text).map_err(parse)?,
                    vision: ClipVisionConfig::vit_l_14_336(),
                    // The original release appends `<image>` after the Llama vocabulary's added tokens.
                    image_token_index: 32000,
                    vision_feature_layer: raw.mm_vision_select_layer.unwrap_or(-2),
                    feature_strategy: strategy,
                    projector_hidden_act: "gelu".into(),
                    projector_bias: true,
                    layout: TensorLayout::Original,
                }))
            }
            ("LlamaForCausalLM", _) | ("", "llama") => Ok(ModelConfig::Llama(serde_json::from_str(&text).map_err(parse)?)),
            (a, t) => Err(Error::parse(
                path,
                None,
                format!("unsupported architecture {a:?} (model_type {t:?}); bpo runs LlavaForConditionalGeneration, LlavaLlamaForCausalLM and LlamaForCausalLM"),
            )),
        }
    }

    pub fn text(&self) -> &LlamaConfig {
        match self {
            ModelConfig::Llava(c) => &c.text,
            ModelConfig::Llama(c) => c,
        }
    }
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(EosIds::to_vec).unwrap_or_else(|| vec![2])
    }
    /// The RoPE settings: `rope_parameters` (transformers 5, the newer key) if present, else `rope_scaling`.
    pub fn rope(&self) -> Option<&RopeScaling> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }
}

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_intermediate() -> usize {
    11008
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_rms_eps() -> f64 {
    1e-6
}
fn d_rope_theta() -> f64 {
    10000.0
}
fn d_max_pos() -> usize {
    2048
}
fn d_act() -> String {
    "silu".into()
}
fn d_one() -> f64 {
    1.0
}
fn d_four() -> f64 {
    4.0
}
fn d_three() -> usize {
    3
}
fn d_clip_hidden() -> usize {
    1024
}
fn d_clip_intermediate() -> usize {
    4096
}
fn d_clip_layers() -> usize {
    24
}
fn d_clip_heads() -> usize {
    16
}
fn d_clip_image() -> usize {
    336
}
fn d_clip_patch() -> usize {
    14
}
fn d_ln_eps() -> f64 {
    1e-5
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_image_token() -> u32 {
    32000
}
fn d_feature_layer() -> i64 {
    -2
}
fn d_strategy() -> FeatureStrategy {
    FeatureStrategy::Default
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: &str) -> LlamaConfig {
        serde_json::from_str(&format!("{{\"hidden_size\": 64, \"num_attention_heads\": 4 {extra}}}")).unwrap()
    }

    #[test]
    fn rope_settings_come_from_either_key_and_both_may_be_present() {
        assert!(llama("").rope().is_none());
        let old = llama(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#);
        assert_eq!((old.rope().unwrap().rope_type, old.rope().unwrap().factor), (RopeType::Linear, 2.0));
        let new = llama(r#", "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}"#);
        assert_eq!(new.rope().unwrap().rope_theta, Some(500000.0));
        // transformers 5 configs converted from 4 can hold both: the newer key wins.
        let both = llama(
            r#", "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}"#,
        );
        assert_eq!((both.rope().unwrap().rope_type, both.rope().unwrap().factor), (RopeType::Llama3, 8.0));
        // rope_parameters without rope_type is plain RoPE.
        assert_eq!(llama(r#", "rope_parameters": {"rope_theta": 1e6}"#).rope().unwrap().rope_type, RopeType::Default);
        // A kind bpo does not compute is refused, not taken for plain RoPE.
        let yarn = serde_json::from_str::<LlamaConfig>(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        );
        assert!(yarn.unwrap_err().to_string().contains("unknown variant `yarn`"));
    }

    #[test]
    fn checks_name_the_field() {
        let text = |f: &dyn Fn(&mut LlamaConfig)| {
            let mut c = llama("");
            f(&mut c);
            c.check("text_config.")
        };
        let err = |f: &dyn Fn(&mut LlamaConfig)| text(f).unwrap_err();
        assert!(text(&|_| {}).is_ok());
        assert_eq!(err(&|c| c.num_hidden_layers = 0), "text_config.num_hidden_layers: must be at least 1 (got 0)");
        assert!(err(&|c| c.num_key_value_heads = Some(3)).contains("num_key_value_heads (3)"));
        assert!(err(&|c| c.num_key_value_heads = Some(0)).contains("num_key_value_heads: must be at least 1"));
        assert!(err(&|c| c.num_attention_heads = 3).contains("hidden_size: 64 is not divisible"));
        assert!(err(&|c| c.head_dim = Some(7)).contains("head_dim: 7 must be even"));
        assert!(err(&|c| c.rope_theta = 0.0).contains("rope_theta"));
        assert!(err(&|c| c.rms_norm_eps = f64::NAN).contains("rms_norm_eps"));
        assert!(text(&|c| {
            c.num_attention_heads = 3;
            c.head_dim = Some(8);
        })
        .is_ok());
        let clip = |f: &dyn Fn(&mut ClipVisionConfig)| {
            let mut c = ClipVisionConfig::vit_l_14_336();
            f(&mut c);
            c.check("vision_config.")
        };
        assert!(clip(&|_| {}).is_ok());
        assert_eq!(clip(&|c| c.patch_size = 0).unwrap_err(), "vision_config.patch_size: must be at least 1 (got 0)");
        assert!(clip(&|c| c.patch_size = 400).unwrap_err().contains("larger than image_size"));
        assert!(clip(&|c| c.num_attention_heads = 7).unwrap_err().contains("not divisible"));
        assert!(clip(&|c| c.num_channels = 1).unwrap_err().contains("num_channels"));
    }
}
