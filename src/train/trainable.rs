//! What a run trains and how it is written: LoRA (+ projector) as a PEFT adapter, or every weight as a model
//! folder (with f32 master copies in checkpoints).

use std::path::{Path, PathBuf};

use candle_core::Var;

use super::checkpoint::{self, restore_adapter, restore_named};
use crate::model::lora::LoraConfig;
use crate::model::Kernels;
use crate::Result;

/// In a checkpoint of full fine-tuning: the trained weights as the f32 master copies. The checkpoint's
/// `model.safetensors` holds them in the model's own dtype (f16 or bf16 for most released models), whose rounding
/// would change the run that resumes from it.
pub const MASTER_WEIGHTS: &str = "master_weights.safetensors";

/// What a run trains and how it is written: LoRA (+ projector) as a PEFT adapter, or all weights as a model folder.
pub struct Trainable {
    pub is_llava: bool,
    /// LoRA variables under [`crate::model::peft::lora_key`] names.
    pub lora: Vec<(String, Var)>,
    pub lora_cfg: Option<LoraConfig>,
    /// Projector variables under llava-hf names (saved with the adapter).
    pub projector: Vec<(String, Var)>,
    /// Whether the projector variables train (false: an adapter's projector kept as it came).
    pub projector_trains: bool,
    /// Full fine-tuning: every trained weight under llava-hf names.
    pub full: Vec<(String, Var)>,
    /// The model folder training started from (named in the adapter config; copied from for full weights).
    pub base_model: PathBuf,
    /// The run's ops path, which also picks the optimizer's state ([`crate::train::optim::AdamW::new`]).
    pub kernels: Kernels,
}

impl Trainable {
    pub fn vars(&self) -> Vec<(String, Var)> {
        let projector = if self.projector_trains { &self.projector[..] } else { &[] };
        self.lora.iter().chain(projector).chain(&self.full).cloned().collect()
    }

    /// The first trained tensor holding a NaN or infinity, by name.
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        for (name, var) in self.lora.iter().chain(&self.projector).chain(&self.full) {
            // 0 * x is 0 for every finite x and NaN otherwise; its sum cannot overflow.
            if !var
                .as_tensor()
                .affine(0.0, 0.0)?
                .sum_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?
                .is_finite()
            {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }

    /// Writes the trained weights into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if !self.full.is_empty() {
            return super::merge::write_model_dir(&self.base_model, dir, &self.full);
        }
        let cfg = self.lora_cfg.clone().unwrap_or_default();
        checkpoint::save_adapter(
            dir,
            self.is_llava,
            &cfg,
            &self.lora,
            &self.projector,
            &self.base_model.to_string_lossy(),
        )
    }

    /// Reads back what [`Trainable::save`] wrote, or in a checkpoint of full fine-tuning the f32 master weights.
    pub fn restore(&self, dir: &Path) -> Result<()> {
        if !self.full.is_empty() {
            let masters = dir.join(MASTER_WEIGHTS);
            let path = if masters.exists() { masters } else { dir.join("model.safetensors") };
            return restore_named(&path, &self.full);
        }
        restore_adapter(dir, &self.lora, &self.projector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_weight_is_named() {
        let var = |v: f32| {
            Var::from_tensor(&candle_core::Tensor::new(&[1.0f32, v], &candle_core::Device::Cpu).unwrap()).unwrap()
        };
        let mut t = Trainable {
            is_llava: false,
            lora: Vec::new(),
            lora_cfg: None,
            projector: Vec::new(),
            projector_trains: false,
            full: vec![("a".into(), var(2.0))],
            base_model: PathBuf::new(),
            kernels: Kernels::Fused,
        };
        assert_eq!(t.first_non_finite().unwrap(), None);
        for bad in [f32::INFINITY, f32::NAN] {
            t.full.push(("b".into(), var(bad)));
            assert_eq!(t.first_non_finite().unwrap().as_deref(), Some("b"));
            t.full.pop();
        }
    }
}
