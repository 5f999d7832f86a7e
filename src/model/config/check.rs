//! Checks of a parsed config: sizes that would divide by zero, index out of range or build empty layers, and
//! settings bpo does not compute, named as config.json spells them.

use super::{ClipVisionConfig, LlamaConfig, ModelConfig, TensorLayout};

impl ModelConfig {
    /// Refuses values that would later divide by zero, index out of range or build empty layers, naming the
    /// field as config.json spells it: `text_config.hidden_size: ...`.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            ModelConfig::Llama(c) => c.check(""),
            ModelConfig::Llava(c) => {
                let text_prefix = if c.layout == TensorLayout::Original { "" } else { "text_config." };
                c.text.check(text_prefix)?;
                c.vision.check("vision_config.")?;
                known_activation("projector_hidden_act", &c.projector_hidden_act)?;
                let layers = c.vision.num_hidden_layers as i64;
                let field =
                    if c.layout == TensorLayout::Original { "mm_vision_select_layer" } else { "vision_feature_layer" };
                if !(-(layers + 1)..=layers).contains(&c.vision_feature_layer) {
                    return Err(format!(
                        "{field}: {} is out of range for a vision tower of {layers} layers (use {}..={layers})",
                        c.vision_feature_layer,
                        -(layers + 1)
                    ));
                }
                Ok(())
            }
        }
    }
}

/// `Err("{prefix}{name}: must be at least 1 (got 0)")` for each zero among `fields`.
fn positive(prefix: &str, fields: &[(&str, usize)]) -> std::result::Result<(), String> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((name, v)) => Err(format!("{prefix}{name}: must be at least 1 (got {v})")),
        None => Ok(()),
    }
}

/// `Err` naming the first of `fields` that is not a finite number >= 0 (or > 0 when `strict`).
fn finite(prefix: &str, fields: &[(&str, f64)], strict: bool) -> std::result::Result<(), String> {
    let bad = |v: f64| !v.is_finite() || v < 0.0 || (strict && v == 0.0);
    match fields.iter().find(|(_, v)| bad(*v)) {
        Some((name, v)) => {
            Err(format!("{prefix}{name}: must be a finite number {} 0 (got {v})", if strict { ">" } else { ">=" }))
        }
        None => Ok(()),
    }
}

impl ClipVisionConfig {
    /// Refuses sizes that are zero or do not divide (see [`ModelConfig::check`]).
    pub(super) fn check(&self, prefix: &str) -> std::result::Result<(), String> {
        positive(
            prefix,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "{prefix}hidden_size: {} is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size > self.image_size {
            return Err(format!(
                "{prefix}patch_size: {} is larger than image_size ({}): no patch fits",
                self.patch_size, self.image_size
            ));
        }
        if self.num_channels != 3 {
            return Err(format!("{prefix}num_channels: must be 3 (RGB images), got {}", self.num_channels));
        }
        known_activation(&format!("{prefix}hidden_act"), &self.hidden_act)?;
        finite(prefix, &[("layer_norm_eps", self.layer_norm_eps)], false)
    }
}

/// `Err` naming `field` unless `name` is an activation bpo computes ([`crate::model::ops::Activation`]).
fn known_activation(field: &str, name: &str) -> std::result::Result<(), String> {
    crate::model::ops::Activation::from_name(name).map(|_| ()).map_err(|e| format!("{field}: {e}"))
}

impl LlamaConfig {
    /// Refuses sizes that are zero or do not divide (see [`ModelConfig::check`]).
    pub(super) fn check(&self, prefix: &str) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "{prefix}hidden_act: {:?} is not supported (the Llama MLP is SwiGLU: silu)",
                self.hidden_act
            ));
        }
        positive(
            prefix,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        positive(prefix, &[("num_key_value_heads", self.kv_heads()), ("head_dim", self.head_dim.unwrap_or(1))])?;
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "{prefix}num_attention_heads: {} is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "{prefix}hidden_size: {} is not divisible by num_attention_heads ({}) and no head_dim is given",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("{prefix}head_dim: {} must be even (RoPE rotates pairs)", self.head_dim()));
        }
        finite(prefix, &[("rms_norm_eps", self.rms_norm_eps)], false)?;
        let theta = self.rope().and_then(|r| r.rope_theta).unwrap_or(self.rope_theta);
        finite(prefix, &[("rope_theta", theta)], true)?;
        if let Some(r) = self.rope() {
            finite(prefix, &[("rope_scaling.factor", r.factor)], true)?;
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}
