//! Loading a Hugging Face model folder: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), memory-mapped. Tensors are read through the llava-hf names; other layouts
//! (newer transformers, the original LLaVA release, plain Llama) are mapped onto them at this one boundary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::clip::ClipVision;
use super::config::{ModelConfig, TensorLayout};
use super::linear::Linear;
use super::llama::Llama;
use super::llava::{Model, Projector, VisionTower};
use super::runtime::Runtime;
use crate::{Error, Result};

/// The safetensors files of a model folder.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found")));
    }
    let index = dir.join("model.safetensors.index.json");
    if let Some(text) = crate::jsonl::read_folder_file(&index)? {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(&index, None, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::parse(&index, None, "no weight_map object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        files.iter().try_for_each(|f| check_weights_file(f))?;
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if crate::jsonl::open_folder_file(&single, u64::MAX)?.is_some() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint { path: dir.into(), msg: "no model.safetensors or model.safetensors.index.json".into() })
}

/// Refuses a weights file that is missing or not a regular file (a device, a FIFO, which mapping would read
/// forever or wait on), before it is mapped; its size is not capped, as weights are mapped, not read.
pub fn check_weights_file(path: &Path) -> Result<()> {
    match crate::jsonl::open_folder_file(path, u64::MAX)? {
        Some(_) => Ok(()),
        None => Err(Error::io(path, std::io::Error::from_raw_os_error(libc::ENOENT))),
    }
}

/// Which naming family a set of tensor names belongs to.
fn detect_layout(names: &[String]) -> Option<TensorLayout> {
    let has = |p: &str| names.iter().any(|n| n.starts_with(p));
    if has("language_model.") {
        Some(TensorLayout::LlavaHf)
    } else if has("model.language_model.") {
        Some(TensorLayout::LlavaHfNew)
    } else if has("model.mm_projector.") || has("model.layers.") {
        Some(TensorLayout::Original)
    } else {
        None
    }
}

/// How llava-hf tensor-name prefixes are spelled in each layout, as (llava-hf, stored) pairs: one table for both
/// directions.
fn prefixes(layout: TensorLayout) -> &'static [(&'static str, &'static str)] {
    match layout {
        TensorLayout::LlavaHf => &[],
        TensorLayout::LlavaHfNew => &[
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ],
        TensorLayout::Original => &[
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
            ("vision_tower.", "model.vision_tower.vision_tower."),
        ],
    }
}

/// `name` with its longest prefix among `pairs`' first elements replaced by the second; unchanged when none matches.
fn swap_prefix<'a>(name: &str, pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    match pairs.filter(|(from, _)| name.starts_with(from)).max_by_key(|(from, _)| from.len()) {
        Some((from, to)) => format!("{to}{}", &name[from.len()..]),
        None => name.to_string(),
    }
}

/// Maps an llava-hf tensor name to its spelling in `layout`.
fn rename(layout: TensorLayout, name: &str) -> String {
    swap_prefix(name, prefixes(layout).iter().copied())
}

/// The inverse of `rename`: the llava-hf name of a tensor stored under `name` in `layout`. Names with no
/// llava-hf counterpart come back unchanged.
pub fn to_llava_hf(layout: TensorLayout, name: &str) -> String {
    swap_prefix(name, prefixes(layout).iter().map(|&(hf, stored)| (stored, hf)))
}

/// A model folder's tensors, addressed by llava-hf names (plain `model.*` names for a Llama) whatever layout the
/// files use. Memory-mapped: reading a tensor copies only that tensor.
pub struct TensorSource {
    st: MmapedSafetensors,
    layout: Option<TensorLayout>,
    dir: PathBuf,
}

impl TensorSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: read-only mapping, as in [`load`].
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Checkpoint { path: dir.into(), msg: e.to_string() })?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let layout = match ModelConfig::from_dir(dir)? {
            ModelConfig::Llava(_) => detect_layout(&names),
            ModelConfig::Llama(_) => None,
        };
        Ok(TensorSource { st, layout, dir: dir.into() })
    }

    /// Every tensor name, as llava-hf names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.st.tensors().into_iter().map(|(n, _)| self.layout.map_or(n.clone(), |l| to_llava_hf(l, &n))).collect();
        names.sort();
        names
    }

    /// The tensor with llava-hf name `name`, converted to `dtype` on `device`.
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<candle_core::Tensor> {
        Ok(self.raw(name, device)?.to_dtype(dtype)?)
    }

    /// The tensor with llava-hf name `name` in its stored dtype.
    pub fn raw(&self, name: &str, device: &Device) -> Result<candle_core::Tensor> {
        let stored = self.layout.map_or(name.to_string(), |l| rename(l, name));
        self.st
            .load(&stored, device)
            .map_err(|e| Error::Checkpoint { path: self.dir.clone(), msg: format!("{name}: {e}") })
    }
}

/// Where a llava-hf checkpoint keeps the CLIP tower's weights.
pub const VISION_PREFIX: &str = "vision_tower.";

/// Loads a model for full fine-tuning: every language-model weight (embeddings, norms, linears, head) and the
/// projector become trainable variables (f32 master copies, cast to the compute dtype in the forward pass), and with
/// `with_vision` every weight of the vision tower's used layers too; otherwise the tower stays frozen
/// (memory-mapped, in the compute dtype). Returns the model and its variables with their llava-hf names
/// (`model.*` / `lm_head.*` for a Llama).
pub fn load_trainable(
    dir: &Path,
    opts: &LoadOptions,
    with_vision: bool,
) -> Result<(Model, Vec<(String, candle_core::Var)>)> {
    let config = ModelConfig::from_dir(dir)?;
    if with_vision && !opts.allow_non_finite {
        // (Otherwise `load` below checks.)
        safetensors_files(dir)?.iter().try_for_each(|f| check_finite_file(f))?;
    }
    let varmap = candle_nn::VarMap::new();
    let device = &opts.rt.device;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let ckpt = |e: candle_core::Error| Error::Checkpoint { path: dir.into(), msg: e.to_string() };
    // With the vision tower, everything is a variable (the projector too); otherwise the tower comes frozen.
    let text = build(vb, &config, &LoadOptions { text_only: !with_vision, ..opts.clone() }).map_err(ckpt)?;
    let source = TensorSource::open(dir)?;
    let mut vars: Vec<(String, candle_core::Var)> = {
        let data = varmap.data().lock().map_err(|_| Error::invalid("variable map poisoned"))?;
        data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        var.set(&source.get(name, DType::F32, device)?)?;
    }
    if with_vision {
        return Ok((text, vars));
    }
    let frozen = load(dir, opts)?;
    let mut model = Model { llm: text.llm, vision: frozen.vision, rt: opts.rt.clone() };
    if model.vision.is_some() {
        vars.extend(super::lora::unfreeze_projector(&mut model)?);
    }
    Ok((model, vars))
}

/// Where to load and in which precision.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub rt: Runtime,
    /// Load only the language model of a LLaVA folder (error injection runs the MLLM's own LLM).
    pub text_only: bool,
    /// Accept weights that are NaN or infinite (by default loading refuses them, see [`check_finite_file`]).
    pub allow_non_finite: bool,
}

impl LoadOptions {
    pub fn new(rt: &Runtime) -> Self {
        LoadOptions { rt: rt.clone(), text_only: false, allow_non_finite: false }
    }
}

/// Refuses a safetensors file holding a NaN or infinite float, naming the file and the tensor. It reads the
/// memory-mapped bytes once, testing exponent bits (no conversion, no allocation): 0.15 s per GiB of f16 weights in
/// memory with a release build on the 2-vCPU development VM, small next to loading the same weights.
pub fn check_finite_file(path: &Path) -> Result<()> {
    check_weights_file(path)?;
    // SAFETY: read-only mapping, as in [`load`].
    let st = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| Error::Checkpoint { path: path.into(), msg: e.to_string() })?;
    for (name, view) in st.tensors() {
        if let Some(i) = first_non_finite(view.dtype(), view.data()) {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!("tensor {name} is not finite (NaN or infinity at element {i})"),
            });
        }
    }
    Ok(())
}

/// Index of the first NaN or infinity in the little-endian float data `bytes`; None for integer tensors.
///
/// A float is NaN or infinite exactly when its exponent bits, which sit just below the sign bit, are all ones; adding
/// the exponent's lowest bit to the masked exponent then carries into the sign bit. Done on 8 bytes at a time (2 to
/// 8 floats), the lanes cannot carry into each other, so one add and two ands test a whole word.
fn first_non_finite(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<usize> {
    use safetensors::Dtype;
    let (size, low): (usize, u64) = match dtype {
        Dtype::F16 => (2, 0x0400),
        Dtype::BF16 => (2, 0x0080),
        Dtype::F32 => (4, 0x0080_0000),
        Dtype::F64 => (8, 0x0010_0000_0000_0000),
        _ => return None,
    };
    let (lanes, bits) = (8 / size, 8 * size as u32);
    let sign = 1u64 << (bits - 1);
    let exponent = sign - low;
    let every_lane = |v: u64| (0..lanes as u32).fold(0u64, |acc, i| acc | v << (i * bits));
    let (m, l, h) = (every_lane(exponent), every_lane(low), every_lane(sign));
    let words = bytes.chunks_exact(8);
    let mut tail = [0u8; 8]; // zeros are finite
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    let word = |c: &[u8]| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    let (k, w) = words.map(word).chain([word(&tail)]).enumerate().find(|(_, w)| ((w & m) + l) & h != 0)?;
    (0..lanes).find(|&i| (w >> (i as u32 * bits)) & exponent == exponent).map(|i| k * lanes + i)
}

/// Loads a model folder (llava-hf, newer transformers, original LLaVA, or a plain Llama).
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    let mut config = ModelConfig::from_dir(dir)?;
    let files = safetensors_files(dir)?;
    if !opts.allow_non_finite {
        files.iter().try_for_each(|f| check_finite_file(f))?;
    }
    let ckpt = |e: candle_core::Error| Error::Checkpoint { path: dir.into(), msg: e.to_string() };
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume nobody truncates them
    // while the model is alive.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(ckpt)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    drop(st);
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, opts.rt.dtype, &opts.rt.device) }.map_err(ckpt)?;
    let vb = match config {
        ModelConfig::Llava(ref mut cfg) => {
            cfg.layout = detect_layout(&names).ok_or_else(|| Error::Checkpoint { path: dir.into(), msg: "no language-model tensors found (expected language_model.*, model.language_model.* or model.layers.*)".into() })?;
            let layout = cfg.layout;
            vb.rename_f(move |n| rename(layout, n))
        }
        ModelConfig::Llama(_) => vb,
    };
    build(vb, &config, opts).map_err(ckpt)
}

/// Builds the model from `vb` (llava-hf names for LLaVA, `model.*` / `lm_head` for Llama). With a `VarMap`-backed
/// builder this creates fresh variables under exactly the names a checkpoint has (see [`super::init`]).
pub fn build(vb: VarBuilder, config: &ModelConfig, opts: &LoadOptions) -> candle_core::Result<Model> {
    let cfg = match config {
        ModelConfig::Llama(cfg) => {
            let llm = Llama::load(vb.pp("model"), vb.pp("lm_head"), cfg, &opts.rt)?;
            return Ok(Model { llm, vision: None, rt: opts.rt.clone() });
        }
        ModelConfig::Llava(cfg) => cfg.clone(),
    };
    let lm = vb.pp("language_model");
    let llm = Llama::load(lm.pp("model"), lm.pp("lm_head"), &cfg.text, &opts.rt)?;
    let vision = if opts.text_only {
        None
    } else {
        let keep = ClipVision::layers_for(cfg.vision_feature_layer, cfg.vision.num_hidden_layers);
        let clip = ClipVision::load(vb.pp("vision_tower.vision_model"), &cfg.vision, keep, &opts.rt)?;
        let p = vb.pp("multi_modal_projector");
        let (vh, th) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let projector = Projector {
            linear_1: Linear::load(p.pp("linear_1"), vh, th, cfg.projector_bias)?,
            linear_2: Linear::load(p.pp("linear_2"), th, th, cfg.projector_bias)?,
            act: super::ops::Activation::from_name(&cfg.projector_hidden_act).map_err(candle_core::Error::msg)?,
        };
        Some(VisionTower { clip, projector, cfg })
    };
    Ok(Model { llm, vision, rt: opts.rt.clone() })
}

/// Writes tensors as safetensors with PyTorch's metadata (`{"format": "pt"}`, which transformers and peft expect),
/// through [`crate::output::write_with`] (a temporary file and a rename), so an interrupted write never leaves a
/// torn checkpoint.
pub fn save_safetensors(path: &Path, tensors: &[(String, candle_core::Tensor)]) -> Result<()> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let contiguous: Vec<(String, candle_core::Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    crate::output::write_with(path, |tmp| {
        safetensors::serialize_to_file(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), tmp)
            .map_err(|e| Error::Checkpoint { path: path.into(), msg: e.to_string() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_floats_are_found_in_every_float_dtype() {
        use safetensors::Dtype;
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(first_non_finite(Dtype::F32, &f32s(&[1.0, -3e38, 0.0])), None);
        assert_eq!(first_non_finite(Dtype::F32, &f32s(&[1.0, f32::NAN])), Some(1));
        assert_eq!(first_non_finite(Dtype::F32, &f32s(&[f32::NEG_INFINITY])), Some(0));
        let halves = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (h, b) = (half::f16::from_f32(65504.0).to_bits(), half::bf16::from_f32(3e38).to_bits());
        assert_eq!(first_non_finite(Dtype::F16, &halves(&[h, half::f16::INFINITY.to_bits()])), Some(1));
        // In the last, partial word; and a word of finite values with every exponent bit but one set.
        assert_eq!(first_non_finite(Dtype::F16, &halves(&[h, h, h, h, h, half::f16::NAN.to_bits()])), Some(5));
        assert_eq!(first_non_finite(Dtype::F16, &halves(&[0xfbff; 7])), None);
        assert_eq!(first_non_finite(Dtype::BF16, &halves(&[b, b])), None);
        assert_eq!(first_non_finite(Dtype::BF16, &halves(&[half::bf16::NAN.to_bits()])), Some(0));
        assert_eq!(first_non_finite(Dtype::F64, &f64::NAN.to_le_bytes()), Some(0));
        assert_eq!(first_non_finite(Dtype::I64, &u64::MAX.to_le_bytes()), None);
    }

    #[test]
    fn names_map_onto_every_layout() {
        let n = "language_model.model.layers.0.self_attn.q_proj.weight";
        assert_eq!(rename(TensorLayout::LlavaHf, n), n);
        assert_eq!(rename(TensorLayout::LlavaHfNew, n), "model.language_model.layers.0.self_attn.q_proj.weight");
        assert_eq!(rename(TensorLayout::Original, n), "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(rename(TensorLayout::Original, "multi_modal_projector.linear_2.bias"), "model.mm_projector.2.bias");
        assert_eq!(rename(TensorLayout::LlavaHfNew, "language_model.lm_head.weight"), "lm_head.weight");
        assert_eq!(
            rename(TensorLayout::Original, "vision_tower.vision_model.pre_layrnorm.weight"),
            "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"
        );
    }

    #[test]
    fn stored_names_map_back() {
        let names = [
            "language_model.model.layers.3.mlp.up_proj.weight",
            "language_model.model.norm.weight",
            "language_model.lm_head.weight",
            "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.linear_2.bias",
            "vision_tower.vision_model.post_layernorm.bias",
        ];
        for layout in [TensorLayout::LlavaHf, TensorLayout::LlavaHfNew, TensorLayout::Original] {
            for n in names {
                assert_eq!(to_llava_hf(layout, &rename(layout, n)), n, "{layout:?}");
            }
        }
        // The longest stored prefix wins: `model.mm_projector.0.` and `model.vision_tower.vision_tower.` over `model.`.
        assert_eq!(
            to_llava_hf(TensorLayout::Original, "model.mm_projector.0.weight"),
            "multi_modal_projector.linear_1.weight"
        );
        assert_eq!(to_llava_hf(TensorLayout::Original, "model.vision_tower.vision_tower.x"), "vision_tower.x");
        assert_eq!(
            to_llava_hf(TensorLayout::Original, "model.embed_tokens.weight"),
            "language_model.model.embed_tokens.weight"
        );
    }
}
