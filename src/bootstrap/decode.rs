//! How next-token logits are formed when the MLLM answers from a weakened image (`mllm-hal` negatives).
//!
//! Pure functions on one position's logits (`&[f32]`, one entry per vocabulary item); the generator calls
//! [`DecodeMode::combine`] with the logits of the clean-image and the noised-image forward pass and samples from
//! the result. See docs/bootstrap.md, "`bpo bootstrap weaken`":
//! - [`DecodeMode::Noisy`] (default, the paper's intent): sample from the noised-image logits alone.
//! - [`DecodeMode::PriorContrast`]: amplify what the noised image adds, `(1 + a) * noisy - a * clean`
//!   ([`prior_contrast`]), pushing harder toward the language prior.
//! - [`DecodeMode::Vcd`]: the released script's VCD sampler, `(1 + alpha) * clean - alpha * noisy` with VCD's
//!   plausibility cut-off ([`vcd`]); released values alpha = 1, beta = 0.2 ([`DecodeMode::RELEASED`]).
//!   The released code's bug (noisy branch only used for the first token) is not reproduced here.

use crate::{bail, Result};

/// How the clean and noised logits are combined.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum DecodeMode {
    /// Noised-image logits only; the clean pass is not needed.
    #[default]
    Noisy,
    /// `(1 + a) * noisy - a * clean`, `a >= 0`.
    PriorContrast { a: f32 },
    /// `(1 + alpha) * clean - alpha * noisy` where `clean >= ln(beta) + max(clean)`, else `-inf`;
    /// `alpha >= 0`, `0 < beta <= 1`.
    Vcd { alpha: f32, beta: f32 },
}

impl DecodeMode {
    /// The released BPO script's setting (VCD, alpha 1, cut-off 0.2).
    pub const RELEASED: DecodeMode = DecodeMode::Vcd { alpha: 1.0, beta: 0.2 };

    /// Whether the clean-image logits are needed (so the generator can skip that forward pass).
    pub fn needs_clean(&self) -> bool {
        !matches!(self, DecodeMode::Noisy)
    }

    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<()> {
        match *self {
            DecodeMode::Noisy => {}
            DecodeMode::PriorContrast { a } if !(a >= 0.0 && a.is_finite()) => {
                bail!("prior contrast: a = {a}, need a >= 0")
            }
            DecodeMode::Vcd { alpha, .. } if !(alpha >= 0.0 && alpha.is_finite()) => {
                bail!("vcd: alpha = {alpha}, need alpha >= 0")
            }
            DecodeMode::Vcd { beta, .. } if !(beta > 0.0 && beta <= 1.0) => {
                bail!("vcd: beta = {beta}, need 0 < beta <= 1")
            }
            _ => {}
        }
        Ok(())
    }

    /// The logits to sample from. `clean` is ignored (may be empty) in `Noisy` mode.
    pub fn combine(&self, clean: &[f32], noisy: &[f32]) -> Result<Vec<f32>> {
        self.validate()?;
        if self.needs_clean() && clean.len() != noisy.len() {
            bail!("clean logits have {} entries, noisy {}", clean.len(), noisy.len());
        }
        Ok(self.mix(clean, noisy))
    }

    /// [`DecodeMode::combine`] without the checks, for the generator's per-token loop: call
    /// [`DecodeMode::validate`] once first. Slices of unequal length are cut to the shorter.
    pub fn mix(&self, clean: &[f32], noisy: &[f32]) -> Vec<f32> {
        match *self {
            DecodeMode::Noisy => noisy.to_vec(),
            DecodeMode::PriorContrast { a } => prior_contrast(clean, noisy, a),
            DecodeMode::Vcd { alpha, beta } => vcd(clean, noisy, alpha, beta),
        }
    }
}

/// `(1 + a) * noisy - a * clean`, element-wise (slices of equal length).
pub fn prior_contrast(clean: &[f32], noisy: &[f32], a: f32) -> Vec<f32> {
    clean.iter().zip(noisy).map(|(&c, &n)| (1.0 + a) * n - a * c).collect()
}

/// VCD: `(1 + alpha) * clean - alpha * noisy`, with every token whose clean logit is below
/// `ln(beta) + max(clean)` set to `-inf`. On raw logits this is the same cut as VCD's
/// `p_clean >= beta * max p_clean`, since the softmax normaliser cancels on both sides.
pub fn vcd(clean: &[f32], noisy: &[f32], alpha: f32, beta: f32) -> Vec<f32> {
    let max = clean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let cutoff = beta.ln() + max;
    clean
        .iter()
        .zip(noisy)
        .map(|(&c, &n)| if c < cutoff { f32::NEG_INFINITY } else { (1.0 + alpha) * c - alpha * n })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: [f32; 4] = [2.0, 1.0, 0.0, -3.0];
    const NOISY: [f32; 4] = [0.0, 1.5, 1.0, 4.0];

    #[test]
    fn prior_contrast_by_hand() {
        // a = 1: 2*noisy - clean
        assert_eq!(prior_contrast(&CLEAN, &NOISY, 1.0), vec![-2.0, 2.0, 2.0, 11.0]);
        assert_eq!(prior_contrast(&CLEAN, &NOISY, 0.0), NOISY.to_vec());
    }

    #[test]
    fn vcd_by_hand() {
        // beta = 0.2: cutoff = ln 0.2 + 2 = 0.3906; tokens 2 (0.0) and 3 (-3.0) fall below.
        let out = vcd(&CLEAN, &NOISY, 1.0, 0.2);
        assert_eq!(&out[..2], &[4.0, 0.5]);
        assert!(out[2] == f32::NEG_INFINITY && out[3] == f32::NEG_INFINITY);
        // beta = 1 keeps only the argmax of clean.
        let out = vcd(&CLEAN, &NOISY, 0.5, 1.0);
        assert_eq!(out[0], 3.0);
        assert!(out[1..].iter().all(|&x| x == f32::NEG_INFINITY));
        // The cut equals the probability rule p >= beta * max p.
        let z: f32 = CLEAN.iter().map(|c| c.exp()).sum();
        let p: Vec<f32> = CLEAN.iter().map(|c| c.exp() / z).collect();
        let kept: Vec<bool> = vcd(&CLEAN, &NOISY, 1.0, 0.3).iter().map(|x| x.is_finite()).collect();
        assert_eq!(kept, p.iter().map(|&q| q >= 0.3 * p[0]).collect::<Vec<_>>());
    }

    #[test]
    fn combine_dispatches_and_validates() {
        assert_eq!(DecodeMode::Noisy.combine(&[], &NOISY).unwrap(), NOISY.to_vec());
        assert_eq!(DecodeMode::PriorContrast { a: 1.0 }.combine(&CLEAN, &NOISY).unwrap()[3], 11.0);
        assert_eq!(DecodeMode::RELEASED.combine(&CLEAN, &NOISY).unwrap()[0], 4.0);
        assert!(DecodeMode::PriorContrast { a: 1.0 }.combine(&CLEAN[..3], &NOISY).is_err());
        assert!(DecodeMode::Vcd { alpha: 1.0, beta: 0.0 }.combine(&CLEAN, &NOISY).is_err());
        assert!(DecodeMode::PriorContrast { a: -1.0 }.validate().is_err());
        assert!(!DecodeMode::Noisy.needs_clean() && DecodeMode::RELEASED.needs_clean());
    }
}
