//! Fresh random-weight checkpoints from a `config.json`, written in llava-hf layout: for benchmarks, tests and the
//! demo's from-scratch model. Initialisation follows transformers' `_init_weights` (normal, std 0.02; norms 1,
//! biases 0), drawn from a seeded RNG so a seed always gives the same weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::config::ModelConfig;
use super::load::{build, save_safetensors, LoadOptions};
use crate::{Error, Result};

/// Writes `dir/config.json` (= `config`) and `dir/model.safetensors` with seeded random weights.
pub fn random_checkpoint(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    crate::output::write_bytes(&cfg_path, serde_json::to_string_pretty(config).unwrap_or_default().as_bytes())?;
    let model_config = ModelConfig::from_dir(dir)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    build(vb, &model_config, &LoadOptions::default())?;
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).map_err(Error::invalid)?;
    let data = varmap.data().lock().map_err(|_| Error::invalid("variable map poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort(); // HashMap order is random: sort so the seed alone decides the weights.
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let is_norm = name.contains("norm") && name.ends_with("weight");
        let values: Vec<f32> = if name.ends_with("bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    let tensors: Vec<(String, Tensor)> = data.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save_safetensors(&dir.join("model.safetensors"), &tensors)
}
