//! Image weakening for BPO's `mllm-hal` negatives: forward diffusion applied to the *normalised* CLIP pixel
//! tensor, `x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`, with VCD's schedule (T = 1000,
//! `beta = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5`, `abar_t = prod_{s <= t} (1 - beta_s)`).
//! The noise comes from a seeded ChaCha generator (`rand`'s `StdRng` + `rand_distr::StandardNormal`), so a seed
//! gives the same picture on every run and platform.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::RgbImage;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::{AspectMode, ImageProcessor};
use crate::{bail, Result};

/// The forward-diffusion noise schedule, precomputed in f64 (VCD computes it in f32; they agree to ~1e-6).
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    sqrt_abar: Vec<f64>,
    sqrt_one_minus_abar: Vec<f64>,
}

impl Default for NoiseSchedule {
    /// VCD's schedule with T = 1000, as used by BPO (step 900) and POVID (step 500).
    fn default() -> Self {
        Self::sigmoid(Self::STEPS)
    }
}

impl NoiseSchedule {
    /// Number of steps of the default schedule; valid steps are `0..STEPS`.
    pub const STEPS: usize = 1000;

    fn sigmoid(steps: usize) -> Self {
        let mut abar = 1.0;
        let (mut sqrt_abar, mut sqrt_one_minus_abar) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
        for i in 0..steps {
            let x = -6.0 + 12.0 * i as f64 / (steps - 1) as f64;
            let beta = 1.0 / (1.0 + (-x).exp()) * (5e-3 - 1e-5) + 1e-5;
            abar *= 1.0 - beta;
            sqrt_abar.push(f64::sqrt(abar));
            sqrt_one_minus_abar.push(f64::sqrt(1.0 - abar));
        }
        NoiseSchedule { sqrt_abar, sqrt_one_minus_abar }
    }

    /// Number of steps (T).
    pub fn steps(&self) -> usize {
        self.sqrt_abar.len()
    }

    /// `sqrt(abar_t)`: how much of the image survives step `t`.
    pub fn sqrt_abar(&self, t: usize) -> Result<f64> {
        self.check(t)?;
        Ok(self.sqrt_abar[t])
    }

    /// `sqrt(1 - abar_t)`: the standard deviation of the noise at step `t`.
    pub fn sqrt_one_minus_abar(&self, t: usize) -> Result<f64> {
        self.check(t)?;
        Ok(self.sqrt_one_minus_abar[t])
    }

    /// `sqrt(abar_t) x + sqrt(1 - abar_t) eps` for a normalised pixel tensor `x` of any shape, device and float
    /// dtype (computed in f32). `eps ~ N(0, I)` is drawn from `seed` in `x`'s row-major order, so a batch gets
    /// different noise per image only if each image is weakened with its own seed or the batch is weakened at once.
    pub fn weaken(&self, x: &Tensor, t: usize, seed: u64) -> Result<Tensor> {
        let (a, b) = (self.sqrt_abar(t)?, self.sqrt_one_minus_abar(t)?);
        let mut rng = StdRng::seed_from_u64(seed);
        let eps: Vec<f32> = (0..x.elem_count()).map(|_| rng.sample(StandardNormal)).collect();
        let eps = Tensor::from_vec(eps, x.shape(), x.device())?;
        let noised = (x.to_dtype(DType::F32)?.affine(a, 0.0)? + eps.affine(b, 0.0)?)?;
        Ok(noised.to_dtype(x.dtype())?)
    }

    fn check(&self, t: usize) -> Result<()> {
        if t >= self.steps() {
            bail!("noise step {t} is out of range: the schedule has steps 0..={}", self.steps() - 1);
        }
        Ok(())
    }
}

/// [`NoiseSchedule::weaken`] with the default (VCD, T = 1000) schedule.
pub fn weaken(x: &Tensor, t: usize, seed: u64) -> Result<Tensor> {
    NoiseSchedule::default().weaken(x, t, seed)
}

/// What the model sees when shown a weakened image, as a viewable picture: load and preprocess `path`, weaken
/// it at step `t` with `seed`, and de-normalise the result (values outside the pixel range are clamped).
pub fn weakened_view(
    proc: &ImageProcessor,
    path: impl AsRef<Path>,
    mode: AspectMode,
    t: usize,
    seed: u64,
) -> Result<RgbImage> {
    let x = proc.load(path, mode)?;
    proc.denormalize(&weaken(&x, t, seed)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_matches_published_test_vectors() {
        let s = NoiseSchedule::default();
        let table = [
            (0, 1.0000, 0.0047),
            (100, 0.9983, 0.0584),
            (250, 0.9891, 0.1470),
            (500, 0.8630, 0.5052),
            (700, 0.5927, 0.8054),
            (900, 0.3649, 0.9311),
            (999, 0.2850, 0.9585),
        ];
        for (t, a, b) in table {
            assert!((s.sqrt_abar(t).unwrap() - a).abs() < 1e-4, "sqrt_abar({t})");
            assert!((s.sqrt_one_minus_abar(t).unwrap() - b).abs() < 1e-4, "sqrt_one_minus_abar({t})");
        }
        assert!(s.sqrt_abar(1000).is_err());
    }

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let x = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let a = weaken(&x, 500, 7).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = weaken(&x, 500, 7).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = weaken(&x, 500, 8).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().zip(&c).filter(|(p, q)| p != q).count() > 190);
    }

    #[test]
    fn noise_stream_is_pinned() {
        // Pins rand's StdRng (ChaCha12) + StandardNormal stream: if a dependency update changes it, weakened
        // images stop being reproducible across versions and this test says so.
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let b = NoiseSchedule::default().sqrt_one_minus_abar(999).unwrap() as f32;
        let eps: Vec<f32> = weaken(&x, 999, 0).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v / b).collect();
        for (e, p) in eps.iter().zip([0.712813, 0.85833144, -2.4362438, 0.16334426]) {
            assert!((e - p).abs() < 1e-5, "{eps:?}");
        }
    }

    #[test]
    fn noise_statistics_at_the_last_step() {
        let x = Tensor::zeros((3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let v = weaken(&x, 999, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n).sqrt();
        // 12288 samples: the standard error of the mean is about 0.009, of the std about 0.006.
        assert!(mean.abs() < 0.04, "mean {mean}");
        assert!((std - 0.9585).abs() < 0.03, "std {std}");
    }

    #[test]
    fn weakening_keeps_shape_dtype_and_blends_the_image() {
        let x = Tensor::ones((2, 3), DType::F16, &Device::Cpu).unwrap();
        let y = weaken(&x, 0, 3).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[2usize, 3][..], DType::F16));
        let v = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&x| (x - 1.0).abs() < 0.03), "{v:?}"); // t = 0: noise std 0.0047
    }
}
