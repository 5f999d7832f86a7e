//! Getting a run ready: the model with what it trains (fresh LoRA, a starting adapter, or every weight), the
//! frozen copy of the starting projector that the DPO reference uses, and the run folder with its resolved config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::checkpoint::load_adapter;
use super::trainable::Trainable;
use crate::jsonl::read_json;
use crate::model::llava::Projector;
use crate::model::load::{load_trainable, VISION_PREFIX};
use crate::model::lora::{attach, unfreeze_projector, LoraConfig};
use crate::model::Vlm;
use crate::model::{LoadOptions, Runtime};
use crate::output::write_json;
use crate::output::{self, Lock};
use crate::text::{Chat, PromptStyle, Template};
use crate::vision::AspectMode;
use crate::{bail, Error, Result};

/// The model side of a run's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSetup {
    pub model: PathBuf,
    pub template: Template,
    pub prompt_style: PromptStyle,
    pub aspect: AspectMode,
    /// LoRA settings; None = full fine-tuning of the language model (and the projector).
    pub lora: Option<LoraConfig>,
    pub train_projector: bool,
    /// Full fine-tuning only: train the CLIP tower too. LLaVA keeps its pretrained tower frozen; a tower trained from
    /// scratch (the demo's) must learn to see.
    #[serde(default)]
    pub train_vision: bool,
    /// Start from this PEFT adapter instead of fresh LoRA weights.
    pub init_adapter: Option<PathBuf>,
    /// Keep only each decoder layer's input in the forward pass and recompute the layer in the backward pass
    /// (transformers' and TRL's `gradient_checkpointing`): activation memory of one layer instead of all, for about
    /// one more forward pass. The results are the same; a run may resume with it switched.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Where the run computes and in which precision. Not part of the recorded config: a run may resume on another
    /// device.
    #[serde(skip)]
    pub runtime: Runtime,
}

/// A model ready to train.
pub struct Prepared {
    pub vlm: Vlm,
    pub trainable: Trainable,
    /// The projector as it was before training (LoRA runs of LLaVA models), for the reference.
    pub start_projector: Option<Projector>,
}

fn copy_projector(p: &Projector) -> Projector {
    Projector { linear_1: p.linear_1.clone(), linear_2: p.linear_2.clone(), act: p.act }
}

/// Loads the model of `s` (on its runtime) and makes trainable what `s` asks for, as f32 master copies.
pub fn prepare_model(s: &ModelSetup, seed: u64) -> Result<Prepared> {
    prepare_loaded(Vlm::load(&s.model, &LoadOptions::new(&s.runtime), s.template)?, s, seed)
}

/// [`prepare_model`] for a model already loaded from `s.model` on `s.runtime` (or built in memory, as the
/// benchmarks do; full fine-tuning reloads its variables from `s.model`).
pub fn prepare_loaded(mut vlm: Vlm, s: &ModelSetup, seed: u64) -> Result<Prepared> {
    let opts = LoadOptions::new(&s.runtime);
    vlm.set_template(s.template, &s.model)?;
    vlm.aspect = s.aspect;
    vlm.style = s.prompt_style;
    let is_llava = vlm.model.vision.is_some();
    let mut trainable = Trainable {
        is_llava,
        lora: Vec::new(),
        lora_cfg: s.lora.clone(),
        projector: Vec::new(),
        projector_trains: s.train_projector && is_llava,
        full: Vec::new(),
        base_model: s.model.clone(),
        kernels: s.runtime.kernels,
    };
    if s.train_vision && !is_llava {
        bail!("--train-vision: {} has no vision tower", s.model.display());
    }
    let Some(lora) = &s.lora else {
        if s.init_adapter.is_some() {
            bail!("--init-adapter starts LoRA training; it cannot be combined with full fine-tuning");
        }
        let (model, vars) = load_trainable(&s.model, &opts, s.train_vision)?;
        vlm.model = model;
        let frozen = |n: &str| {
            (!s.train_projector && n.starts_with("multi_modal_projector."))
                || (!s.train_vision && n.starts_with(VISION_PREFIX))
        };
        trainable.full = vars.into_iter().filter(|(n, _)| !frozen(n)).collect();
        return Ok(Prepared { vlm, trainable, start_projector: None });
    };
    lora.validate()?;
    if s.train_vision {
        bail!("--train-vision needs full fine-tuning (--full): LoRA runs keep the vision tower frozen");
    }
    let start_projector = vlm.model.vision.as_ref().map(|v| copy_projector(&v.projector));
    match &s.init_adapter {
        Some(dir) => {
            let adapter = load_adapter(&mut vlm.model, dir)?;
            trainable.lora = adapter.lora;
            trainable.projector = adapter.projector;
            trainable.lora_cfg = Some(LoraConfig { dropout: lora.dropout, ..adapter.config });
            vlm.model.llm.set_lora_dropout(lora.dropout);
        }
        None => trainable.lora = attach(&mut vlm.model, lora, seed)?,
    }
    if trainable.projector_trains && trainable.projector.is_empty() {
        trainable.projector = unfreeze_projector(&mut vlm.model)?;
    }
    Ok(Prepared { vlm, trainable, start_projector })
}

/// Creates `out`, locks it for as long as the returned [`Lock`] lives (a second run on the same folder is
/// refused, naming the first), and records `config` there as `train_config.json`. A folder that already holds a
/// run is refused unless `resume`, and then its config must match `config`.
pub fn prepare_run_dir(out: &Path, config: &Value, resume: bool) -> Result<Lock> {
    output::create_dir(out)?;
    let lock = Lock::dir(out)?;
    let path = out.join("train_config.json");
    match (path.exists(), resume) {
        (false, true) => bail!("--resume: {} holds no run (no train_config.json)", out.display()),
        (true, false) if super::checkpoint::run_started(out) => {
            bail!("{} already holds a run: pass --resume to continue it, or choose another --out", out.display())
        }
        // A run that stopped before its first step left its config (and maybe reference log-probs of other inputs).
        (true, false) => forget_unstarted_run(out).and_then(|()| write_json(&path, config)),
        (true, true) => {
            let old: Value = read_json(&path)?;
            let differ = differing_keys(&old, config);
            let (switched, differ): (Vec<String>, Vec<String>) =
                differ.into_iter().partition(|k| SWITCHABLE_ON_RESUME.contains(&k.as_str()));
            if !differ.is_empty() {
                return Err(Error::invalid(format!(
                    "--resume: the options differ from the run's train_config.json in {}",
                    differ.join(", ")
                )));
            }
            // A setting that changes how, not what, is computed: record the one the run goes on with.
            if switched.is_empty() {
                Ok(())
            } else {
                write_json(&path, config)
            }
        }
        (false, false) => write_json(&path, config),
    }
    .map(|()| lock)
}

/// Settings a resumed run may change: they change how a step is computed, not its result.
const SWITCHABLE_ON_RESUME: [&str; 1] = ["gradient_checkpointing"];

/// Records the chat template a run renders from its model folder (`--template model`) in the run folder as
/// `chat_template.jinja`, the name transformers saves it under, next to `train_config.json`'s `"template":
/// "model"`.
pub fn record_template(out: &Path, vlm: &Vlm) -> Result<()> {
    match &vlm.chat {
        Chat::Model(t, _) => crate::output::write_bytes(&out.join("chat_template.jinja"), t.source.as_bytes()),
        Chat::Builtin(_) => Ok(()),
    }
}

/// Removes what a run that never trained a step may have cached, so that starting again computes it afresh.
fn forget_unstarted_run(out: &Path) -> Result<()> {
    let cached = out.join(super::checkpoint::REF_LOGPS);
    match std::fs::remove_file(&cached) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&cached, e)),
        _ => Ok(()),
    }
}

/// Top-level (and one level down) keys whose values differ.
pub(crate) fn differing_keys(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["(whole config)".into()] };
    let mut out = Vec::new();
    for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        match (a.get(key), b.get(key)) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => out.extend(
                differing_keys(&Value::Object(x.clone()), &Value::Object(y.clone()))
                    .into_iter()
                    .map(|k| format!("{key}.{k}")),
            ),
            (x, y) if x != y => out.push(key.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_dir_refuses_reuse_and_checks_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = json!({"lr": 1.0, "optim": {"epochs": 2}});
        assert!(prepare_run_dir(tmp.path(), &cfg, true).is_err(), "nothing to resume");
        prepare_run_dir(tmp.path(), &cfg, false).unwrap();
        // Nothing trained yet (a run that failed before step 1): starting again is fine.
        prepare_run_dir(tmp.path(), &cfg, false).unwrap();
        std::fs::write(tmp.path().join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
        assert!(prepare_run_dir(tmp.path(), &cfg, false).unwrap_err().to_string().contains("--resume"));
        prepare_run_dir(tmp.path(), &cfg, true).unwrap();
        let err =
            prepare_run_dir(tmp.path(), &json!({"lr": 1.0, "optim": {"epochs": 3}}), true).unwrap_err().to_string();
        assert!(err.contains("optim.epochs"), "{err}");
        // Gradient checkpointing may be switched on resume; the config then records the new setting.
        let switched = json!({"lr": 1.0, "optim": {"epochs": 2}, "gradient_checkpointing": true});
        prepare_run_dir(tmp.path(), &switched, true).unwrap();
        assert_eq!(read_json::<Value>(&tmp.path().join("train_config.json")).unwrap(), switched);
    }
}
