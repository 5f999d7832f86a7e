//! Saving and loading what a run trains: LoRA adapters in PEFT's layout (loadable by `peft`), the projector,
//! full weights, and the files a resumed run needs (optimizer moments, step). Every file is written to a temporary
//! name, fsynced and renamed; a checkpoint folder is filled under a temporary name and renamed whole.
//! Tensor names: [`crate::model::peft`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde_json::{json, Value};

use crate::model::linear::{DropoutSeed, Lora};
use crate::model::load::{check_finite_file, save_safetensors};
use crate::model::lora::LoraConfig;
use crate::model::peft::{lora_key, parse_lora_key, parse_projector_key, projector_key, PROJECTOR_MODULE};
use crate::model::Model;
use crate::{bail, Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The trained projector under llava-hf names, for tools that do not read PEFT files.
pub const PROJECTOR_WEIGHTS: &str = "projector.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
/// The run folder's cache of reference log-probs (`--precompute-ref`, `--init-adapter`).
pub const REF_LOGPS: &str = "ref_logps.jsonl";

/// Checkpoint folders are filled atomically by the one folder writer.
pub use crate::output::write_dir as write_dir_atomically;

/// `adapter_config.json` for `cfg`. LLaVA targets are a regex restricted to the language model, so that peft does
/// not also wrap the CLIP tower's identically named `q_proj`/`k_proj`/`v_proj`.
fn adapter_config(is_llava: bool, cfg: &LoraConfig, with_projector: bool, base_model: &str) -> Value {
    let modules = cfg.module_names();
    let targets =
        if is_llava { json!(format!(".*language_model.*\\.({})", modules.join("|"))) } else { json!(modules) };
    json!({
        "peft_type": "LORA", "task_type": if is_llava { Value::Null } else { json!("CAUSAL_LM") },
        "base_model_name_or_path": base_model, "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": (cfg.dropout as f64 * 1e6).round() / 1e6,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "use_rslora": false, "use_dora": false, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": null, "layers_pattern": null,
        "modules_to_save": if with_projector { json!([PROJECTOR_MODULE]) } else { Value::Null },
    })
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` (LoRA, and the projector as `modules_to_save`) and,
/// with a projector, `projector.safetensors`. `lora` carries [`lora_key`] names, `projector` llava-hf names.
pub fn save_adapter(
    dir: &Path,
    is_llava: bool,
    cfg: &LoraConfig,
    lora: &[(String, Var)],
    projector: &[(String, Var)],
    base_model: &str,
) -> Result<()> {
    let mut tensors = Vec::with_capacity(lora.len() + projector.len());
    for (key, var) in lora {
        let (module, which) =
            parse_lora_key(key).ok_or_else(|| Error::invalid(format!("not a LoRA tensor name: {key}")))?;
        tensors.push((lora_key(is_llava, &module, which), var.as_tensor().clone()));
    }
    tensors.extend(projector.iter().map(|(n, v)| (projector_key(n), v.as_tensor().clone())));
    save_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    if !projector.is_empty() {
        let plain: Vec<(String, Tensor)> = projector.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        save_safetensors(&dir.join(PROJECTOR_WEIGHTS), &plain)?;
    }
    crate::output::write_json(
        &dir.join(ADAPTER_CONFIG),
        &adapter_config(is_llava, cfg, !projector.is_empty(), base_model),
    )
}

/// An adapter attached to a model by [`load_adapter`].
pub struct Adapter {
    /// LoRA variables under [`lora_key`] names.
    pub lora: Vec<(String, Var)>,
    /// Projector variables under llava-hf names (empty if the adapter has none).
    pub projector: Vec<(String, Var)>,
    pub config: LoraConfig,
}

/// The fields of a PEFT `adapter_config.json` that decide how its weights apply; the rest is ignored.
#[derive(serde::Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    lora_dropout: Option<f64>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    rank_pattern: Option<serde_json::Map<String, Value>>,
    alpha_pattern: Option<serde_json::Map<String, Value>>,
}

impl PeftConfig {
    /// Reads an `adapter_config.json`, refusing the PEFT options bpo does not apply; returns the rank, alpha and
    /// dropout (no targets) and the scale of the update (alpha / r, or alpha / sqrt(r) with rsLoRA).
    fn read(path: &Path) -> Result<(LoraConfig, f64)> {
        let cfg: PeftConfig = crate::jsonl::read_json(path)?;
        let bad = |msg: String| Error::parse(path, None, msg);
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(bad(format!("peft_type {:?} is not LORA", cfg.peft_type.unwrap_or_default())));
        }
        if cfg.use_dora == Some(true) {
            return Err(bad("DoRA adapters are not supported".into()));
        }
        for (key, pattern) in [("rank_pattern", &cfg.rank_pattern), ("alpha_pattern", &cfg.alpha_pattern)] {
            if pattern.as_ref().is_some_and(|m| !m.is_empty()) {
                return Err(bad(format!("{key} is not supported")));
            }
        }
        let (rank, alpha) = (cfg.r, cfg.lora_alpha);
        let dropout = cfg.lora_dropout.unwrap_or(0.0) as f32;
        let scale = if cfg.use_rslora == Some(true) { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        Ok((LoraConfig { rank, alpha, dropout, targets: Vec::new() }, scale))
    }
}

/// Attaches the PEFT adapter in `dir` (either spelling) to `model`: LoRA on every linear it has tensors for, and
/// its projector copy if it saved one. Unknown tensors, unsupported PEFT options and non-finite weights are errors,
/// not ignored.
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<Adapter> {
    load_adapter_with(model, dir, false)
}

/// [`load_adapter`], accepting NaN or infinite weights if `allow_non_finite`.
pub fn load_adapter_with(model: &mut Model, dir: &Path, allow_non_finite: bool) -> Result<Adapter> {
    let (LoraConfig { rank, alpha, dropout, .. }, scale) = PeftConfig::read(&dir.join(ADAPTER_CONFIG))?;

    let path = dir.join(ADAPTER_WEIGHTS);
    if allow_non_finite {
        crate::model::load::check_weights_file(&path)?;
    } else {
        check_finite_file(&path)?;
    }
    let tensors = candle_core::safetensors::load(&path, &model.rt.device)
        .map_err(|e| Error::Checkpoint { path: path.clone(), msg: e.to_string() })?;
    let mut lora: HashMap<String, [Option<Tensor>; 2]> = HashMap::new();
    let mut projector: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        if let Some((module, which)) = parse_lora_key(&name) {
            lora.entry(module).or_default()[usize::from(which == 'B')] = Some(t.to_dtype(candle_core::DType::F32)?);
        } else if let Some(p) = parse_projector_key(&name) {
            projector.insert(p, t.to_dtype(candle_core::DType::F32)?);
        } else {
            return Err(Error::Checkpoint {
                path,
                msg: format!(
                    "unsupported adapter tensor {name} (bpo adapts the language model's linears and the projector)"
                ),
            });
        }
    }

    let is_llava = model.vision.is_some();
    let seed = Arc::new(DropoutSeed::new(0));
    let mut out = Adapter {
        lora: Vec::new(),
        projector: Vec::new(),
        config: LoraConfig { rank, alpha, dropout, targets: Vec::new() },
    };
    for (module, lin) in model.llm.linears_mut() {
        let Some([a, b]) = lora.remove(&module) else { continue };
        let (Some(a), Some(b)) = (a, b) else {
            bail!("{}: {module} has only one of lora_A and lora_B", path.display())
        };
        if a.dims() != [rank, lin.in_features()] || b.dims() != [lin.out_features(), rank] {
            bail!(
                "{}: {module} has A {:?} and B {:?}, expected [{rank}, {}] and [{}, {rank}]",
                path.display(),
                a.dims(),
                b.dims(),
                lin.in_features(),
                lin.out_features()
            );
        }
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        out.lora.push((lora_key(is_llava, &module, 'A'), a.clone()));
        out.lora.push((lora_key(is_llava, &module, 'B'), b.clone()));
        let short = module.rsplit('.').next().unwrap_or_default().trim_end_matches("_proj").to_string();
        if !out.config.targets.contains(&short) {
            out.config.targets.push(short);
        }
        lin.lora = Some(Lora { a, b, scale, dropout, seed: seed.clone() });
    }
    if let Some(module) = lora.keys().next() {
        bail!("{}: the adapter has weights for {module}, which this model does not have", path.display());
    }
    if !projector.is_empty() {
        out.projector = set_projector(model, &projector, &path)?;
    }
    Ok(out)
}

/// Replaces the projector's weights with trainable copies of `tensors` (llava-hf names). Returns the variables.
fn set_projector(model: &mut Model, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<(String, Var)>> {
    let vars = crate::model::lora::unfreeze_projector(model)?;
    for (name, var) in &vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Checkpoint { path: path.into(), msg: format!("projector tensor {name} missing") })?;
        if t.dims() != var.dims() {
            bail!("{}: {name} has shape {:?}, the model {:?}", path.display(), t.dims(), var.dims());
        }
        var.set(t)?;
    }
    Ok(vars)
}

/// Overwrites `vars` (saved by [`save_adapter`] in `dir`) with the values stored there.
pub fn restore_adapter(dir: &Path, lora: &[(String, Var)], projector: &[(String, Var)]) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let saved = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.clone(), msg: e.to_string() })?;
    let mut by_name: HashMap<String, &Tensor> = HashMap::new();
    for (name, t) in &saved {
        if let Some((module, which)) = parse_lora_key(name) {
            by_name.insert(format!("{module}.{which}"), t);
        } else if let Some(p) = parse_projector_key(name) {
            by_name.insert(p, t);
        }
    }
    for (key, var) in lora {
        let (module, which) =
            parse_lora_key(key).ok_or_else(|| Error::invalid(format!("not a LoRA tensor name: {key}")))?;
        set_from(var, by_name.get(&format!("{module}.{which}")).copied(), key, &path)?;
    }
    for (name, var) in projector {
        set_from(var, by_name.get(name).copied(), name, &path)?;
    }
    Ok(())
}

fn set_from(var: &Var, t: Option<&Tensor>, name: &str, path: &Path) -> Result<()> {
    let t = t.ok_or_else(|| Error::Checkpoint { path: path.into(), msg: format!("{name} missing") })?;
    Ok(var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?)
}

/// Loads named tensors from a safetensors file into `vars` (by name; all must be present).
pub fn restore_named(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let saved = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.into(), msg: e.to_string() })?;
    for (name, var) in vars {
        set_from(var, saved.get(name), name, path)?;
    }
    Ok(())
}

/// The newest `checkpoint-N` folder of a run (by N), if any.
pub fn latest_checkpoint(run: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(checkpoints(run)?.into_iter().next())
}

/// The `checkpoint-N` folders of a run that hold a trainer state, newest (largest N) first.
pub fn checkpoints(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(run) else { return Ok(Vec::new()) };
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(run, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else { continue };
        if e.path().join(TRAINER_STATE).is_file() {
            found.push((step, e.path()));
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(found)
}

/// Whether `run` holds anything trained: a logged step, a checkpoint, or final weights. A folder with none (a run
/// that failed before its first step) may be started again.
pub fn run_started(run: &Path) -> bool {
    let weights = [ADAPTER_WEIGHTS, "model.safetensors"].iter().any(|f| run.join(f).exists());
    weights || logged_steps(run) > 0 || checkpoints(run).map_or(true, |c| !c.is_empty())
}

/// Lines of the run's `metrics.jsonl` (0 when there is none).
pub(super) fn logged_steps(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// Drops `metrics.jsonl` lines past `step` (left by a run that went on after its last checkpoint, the last perhaps torn
/// by a kill). The lines kept are kept byte for byte: the file is cut, not rewritten, since a number read and written
/// again may come back one unit in the last place different. A file that is not a log bpo wrote (a complete line that
/// is not a JSON step record, a torn tail that does not start like one) is refused, never cut.
pub(super) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut keep = None;
    let mut at = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let logged = serde_json::from_str::<Value>(line).ok().and_then(|r| r.get("step").and_then(Value::as_u64));
        match logged {
            _ if !line.ends_with('\n') && line.starts_with("{\"") => {}
            Some(s) if line.ends_with('\n') => {
                if s as usize > step {
                    keep.get_or_insert(at);
                }
            }
            _ => {
                return Err(Error::parse(
                    path,
                    Some(i + 1),
                    "not a step of a training log bpo wrote; refusing to cut this file (move it away to resume)",
                ))
            }
        }
        if !line.ends_with('\n') {
            keep.get_or_insert(at);
        }
        at += line.len();
    }
    if let Some(keep) = keep {
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        file.set_len(keep as u64).and_then(|()| file.sync_all()).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
