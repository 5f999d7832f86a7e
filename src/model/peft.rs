//! PEFT's tensor names for what bpo adapts: LoRA on the language model's linears, and the projector kept whole
//! (`modules_to_save`). Every spelling bpo reads and the one it writes live here.
//!
//! PEFT names a LoRA tensor `base_model.model.<module path>.lora_{A,B}.weight`. For llava-hf models peft with
//! transformers 5 writes `base_model.model.model.language_model.layers.N...` and, for the projector,
//! `base_model.model.model.multi_modal_projector.*`; older stacks wrote `base_model.model.language_model.model.layers.N...`
//! and `base_model.model.multi_modal_projector.*.modules_to_save.default.*`. bpo writes the first spelling (and
//! names its variables by it in memory and in `optimizer.safetensors`) and reads all of them, with the original
//! LLaVA's `base_model.model.model.layers.N...` / `mm_projector.{0,2}`.

/// The projector's module name in llava-hf models.
pub const PROJECTOR_MODULE: &str = "multi_modal_projector";

/// The name bpo gives the LoRA tensor `which` ('A' or 'B') of a decoder linear (`layers.0.self_attn.q_proj`) of a
/// LLaVA or plain Llama base model.
pub fn lora_key(is_llava: bool, module: &str, which: char) -> String {
    let prefix = if is_llava { "base_model.model.model.language_model" } else { "base_model.model.model" };
    format!("{prefix}.{module}.lora_{which}.weight")
}

/// Decoder module path (`layers.0.self_attn.q_proj`) and 'A'/'B' of a PEFT LoRA tensor name in any spelling.
pub fn parse_lora_key(name: &str) -> Option<(String, char)> {
    let rest =
        ["base_model.model.language_model.model.", "base_model.model.model.language_model.", "base_model.model.model."]
            .iter()
            .find_map(|p| name.strip_prefix(p))?;
    let rest = rest.strip_suffix(".weight")?.replace(".default", "");
    let (module, which) = rest.rsplit_once(".lora_")?;
    let which = match which {
        "A" => 'A',
        "B" => 'B',
        _ => return None,
    };
    module.starts_with("layers.").then(|| (module.to_string(), which))
}

/// The name bpo writes for a projector tensor given its llava-hf name (`multi_modal_projector.linear_1.weight`).
pub fn projector_key(name: &str) -> String {
    format!("base_model.model.model.{name}")
}

/// llava-hf name (`multi_modal_projector.linear_1.weight`) of a projector tensor saved by PEFT in any spelling.
pub fn parse_projector_key(name: &str) -> Option<String> {
    let rest = ["base_model.model.multi_modal_projector.", "base_model.model.model.multi_modal_projector."]
        .iter()
        .find_map(|p| name.strip_prefix(p));
    let rest = rest.map(|r| r.replace(".modules_to_save.default", "")).or_else(|| {
        let r = name.strip_prefix("base_model.model.model.mm_projector.")?;
        r.strip_prefix("0.")
            .map(|x| format!("linear_1.{x}"))
            .or_else(|| r.strip_prefix("2.").map(|x| format!("linear_2.{x}")))
    })?;
    Some(format!("{PROJECTOR_MODULE}.{rest}"))
}

/// A trained variable's name as bpo writes it today: a LoRA tensor in any spelling becomes [`lora_key`]'s, any
/// other name stays. Checkpoints of bpo before 2026-12-06 named LoRA variables (and their optimizer moments) in
/// the older llava spelling; resuming one goes through this.
pub fn current_name(name: &str, is_llava: bool) -> String {
    match parse_lora_key(name) {
        Some((module, which)) => lora_key(is_llava, &module, which),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_keys_in_every_spelling() {
        let want = Some(("layers.3.self_attn.q_proj".to_string(), 'A'));
        for n in [
            "base_model.model.language_model.model.layers.3.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
        ] {
            assert_eq!(parse_lora_key(n), want, "{n}");
        }
        assert_eq!(
            parse_lora_key("base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight"),
            Some(("layers.0.mlp.down_proj".to_string(), 'B'))
        );
        // The vision tower's projections and the LM head are not adapted by bpo.
        assert_eq!(
            parse_lora_key("base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_lora_key("base_model.model.lm_head.lora_A.weight"), None);
        for is_llava in [true, false] {
            assert_eq!(
                parse_lora_key(&lora_key(is_llava, "layers.1.mlp.up_proj", 'B')),
                Some(("layers.1.mlp.up_proj".to_string(), 'B'))
            );
        }
    }

    #[test]
    fn projector_keys_in_every_spelling() {
        for n in [
            "base_model.model.multi_modal_projector.linear_1.weight",
            "base_model.model.multi_modal_projector.linear_1.modules_to_save.default.weight",
            "base_model.model.model.multi_modal_projector.linear_1.weight",
            "base_model.model.model.mm_projector.0.weight",
        ] {
            assert_eq!(parse_projector_key(n).as_deref(), Some("multi_modal_projector.linear_1.weight"), "{n}");
        }
        assert_eq!(
            parse_projector_key("base_model.model.model.mm_projector.2.bias").as_deref(),
            Some("multi_modal_projector.linear_2.bias")
        );
        assert_eq!(
            parse_projector_key(&projector_key("multi_modal_projector.linear_2.weight")).as_deref(),
            Some("multi_modal_projector.linear_2.weight")
        );
    }

    #[test]
    fn older_names_become_current() {
        let old = "base_model.model.language_model.model.layers.0.self_attn.v_proj.lora_B.weight";
        assert_eq!(
            current_name(old, true),
            "base_model.model.model.language_model.layers.0.self_attn.v_proj.lora_B.weight"
        );
        assert_eq!(
            current_name("multi_modal_projector.linear_1.weight", true),
            "multi_modal_projector.linear_1.weight"
        );
    }
}
