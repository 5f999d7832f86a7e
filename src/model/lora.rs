//! Attaching LoRA adapters to the language model, with PEFT's names ([`super::peft`]) so adapters round-trip with
//! `peft`.

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::linear::{DropoutSeed, Lora};
use super::llava::Model;
use crate::{bail, Result};

/// Which linears get adapters and how big they are.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r, at least 1.
    pub rank: usize,
    /// Scale numerator, > 0: the update is `(alpha / r) B A x`.
    pub alpha: f64,
    /// Dropout on the adapters' input, in [0, 1).
    pub dropout: f32,
    /// Short projection names: q, k, v, o, gate, up, down (or full names like `q_proj`).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    /// The BPO paper's recipe: r 64, alpha 256, dropout 0.05, every projection of the language model.
    fn default() -> Self {
        LoraConfig {
            rank: 64,
            alpha: 256.0,
            dropout: 0.05,
            targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec(),
        }
    }
}

impl LoraConfig {
    /// Refuses a rank of 0, an alpha that is not a finite number > 0, and a dropout outside [0, 1).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            bail!("LoRA alpha must be a finite number > 0, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must lie in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// PEFT's `target_modules` spelling (`q_proj`, ...).
    pub fn module_names(&self) -> Vec<String> {
        self.targets.iter().map(|t| if t.ends_with("_proj") { t.clone() } else { format!("{t}_proj") }).collect()
    }
}

/// Adds fresh adapters (A Kaiming-uniform as in PEFT, B zero) to the targeted linears. Returns (PEFT key, variable)
/// for every new tensor, A and B interleaved.
pub fn attach(model: &mut Model, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    let wanted = cfg.module_names();
    for w in &wanted {
        if !["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].contains(&w.as_str()) {
            bail!("unknown LoRA target {w:?} (use q, k, v, o, gate, up, down)");
        }
    }
    cfg.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    // Adapters are f32 master copies whatever the compute dtype (cast in the forward pass).
    let dev = model.rt.device.clone();
    let is_llava = model.vision.is_some();
    let mut vars = Vec::new();
    let dropout_seed = std::sync::Arc::new(DropoutSeed::new(seed));
    for (path, lin) in model.llm.linears_mut() {
        let short = path.rsplit('.').next().unwrap_or_default();
        if !wanted.iter().any(|w| w == short) {
            continue;
        }
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        // PEFT: kaiming_uniform_(a = sqrt(5)) => bound = 1 / sqrt(in_features).
        let bound = 1.0 / (in_f as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * in_f).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, in_f), &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out_f, cfg.rank), DType::F32, &dev)?)?;
        vars.push((super::peft::lora_key(is_llava, &path, 'A'), a.clone()));
        vars.push((super::peft::lora_key(is_llava, &path, 'B'), b.clone()));
        lin.lora =
            Some(Lora { a, b, scale: cfg.alpha / cfg.rank as f64, dropout: cfg.dropout, seed: dropout_seed.clone() });
    }
    if vars.is_empty() {
        bail!("no linear layer matched the LoRA targets {:?}", cfg.targets);
    }
    Ok(vars)
}

/// Trainable copies of the projector weights (the projector trains fully in BPO), as f32 master copies. Returns
/// (llava-hf name, variable).
pub fn unfreeze_projector(model: &mut Model) -> Result<Vec<(String, Var)>> {
    let Some(v) = model.vision.as_mut() else { bail!("this model has no projector") };
    let mut out = Vec::new();
    for (name, lin) in [
        ("multi_modal_projector.linear_1", &mut v.projector.linear_1),
        ("multi_modal_projector.linear_2", &mut v.projector.linear_2),
    ] {
        let w = Var::from_tensor(&lin.weight.to_dtype(DType::F32)?)?;
        lin.weight = w.as_tensor().clone();
        out.push((format!("{name}.weight"), w));
        if let Some(b) = &lin.bias {
            let bv = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
            lin.bias = Some(bv.as_tensor().clone());
            out.push((format!("{name}.bias"), bv));
        }
    }
    Ok(out)
}
