//! `bpo merge`: folds a LoRA adapter (and its projector) into the base weights, `W + (alpha / r) B A`, and writes
//! a plain model folder in llava-hf layout (older transformers names, which transformers and bpo both load).
//! Full fine-tuning runs write their output with the same function.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::load_adapter;
use crate::model::load::{save_safetensors, TensorSource};
use crate::model::{load, LoadOptions};
use crate::{Error, Result};

/// Files of a model folder that are not weights (copied as they are).
const COMPANIONS: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "tokenizer.model",
    "added_tokens.json",
];

/// Writes a model folder at `out`: every tensor of `base` (llava-hf names, in its dtype), with `replace` (llava-hf
/// names) taking precedence, plus the base folder's config and tokenizer files.
pub fn write_model_dir(base: &Path, out: &Path, replace: &[(String, Var)]) -> Result<()> {
    let tensors: HashMap<String, Tensor> = replace.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    write_with(base, out, &tensors)
}

fn write_with(base: &Path, out: &Path, replace: &HashMap<String, Tensor>) -> Result<()> {
    crate::output::create_dir(out)?;
    let source = TensorSource::open(base)?;
    let mut tensors = Vec::new();
    for name in source.names() {
        let stored = source.raw(&name, &Device::Cpu)?;
        let t = match replace.get(&name) {
            Some(t) => t.to_dtype(stored.dtype())?.to_device(&Device::Cpu)?,
            None => stored,
        };
        tensors.push((name, t));
    }
    if let Some(name) = replace.keys().find(|n| !tensors.iter().any(|(m, _)| m == *n)) {
        crate::bail!("{}: no tensor {name} to replace", base.display());
    }
    save_safetensors(&out.join("model.safetensors"), &tensors)?;
    for name in COMPANIONS {
        let from = base.join(name);
        if from.is_file() {
            crate::output::write_with(&out.join(name), |tmp| {
                std::fs::copy(&from, tmp).map(drop).map_err(|e| Error::io(&from, e))
            })?;
        }
    }
    Ok(())
}

/// What [`merge`] folded in.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub linears: usize,
    pub projector: bool,
}

/// Merges the adapter of `adapter_dir` (a run folder or any PEFT adapter folder) into the model of `model_dir`,
/// writing a model folder at `out`.
pub fn merge(model_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeReport> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false) {
        crate::bail!("{} exists and is not empty: choose a new --out", out.display());
    }
    let mut model = load(model_dir, &LoadOptions::default())?;
    let adapter = load_adapter(&mut model, adapter_dir)?;
    let prefix = if model.vision.is_some() { "language_model.model" } else { "model" };
    let mut replace = HashMap::new();
    let mut linears = 0;
    for (module, lin) in model.llm.linears_mut() {
        let Some(lora) = &lin.lora else { continue };
        let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
        replace.insert(format!("{prefix}.{module}.weight"), (lin.weight.to_dtype(DType::F32)? + delta)?);
        linears += 1;
    }
    for (name, var) in &adapter.projector {
        replace.insert(name.clone(), var.as_tensor().clone());
    }
    write_with(model_dir, out, &replace)?;
    Ok(MergeReport { linears, projector: !adapter.projector.is_empty() })
}
