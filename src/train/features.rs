//! Vision-tower features for training batches. The CLIP tower never trains in BPO, so its output for an image is a
//! constant: each distinct image of a batch is encoded once (chosen and rejected rows share it), and features are
//! kept across steps and epochs up to a memory budget. When the tower itself trains (full fine-tuning with
//! `--train-vision`), features are encoded afresh every step and keep their graph.
//!
//! mDPO's corrupted images ([`Noise`]) are cached the same way: the noise is a function of (image, seed, step), so
//! the features of a corrupted image are as constant as the clean image's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::model::Vlm;
use crate::Result;

/// Diffusion noise on an image's normalised pixels, as `bpo distort` and image weakening apply it
/// ([`crate::vision::NoiseSchedule::weaken`]): step `step` (0..1000), noise drawn from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Noise {
    pub step: usize,
    pub seed: u64,
}

/// An image as the tower sees it: the file, maybe noised.
type Key = (PathBuf, Option<Noise>);

pub struct FeatureCache {
    cache: HashMap<Key, Tensor>,
    bytes: usize,
    budget: usize,
    /// Images run through the tower so far (cache misses).
    pub encoded: usize,
    /// The tower trains: never cache, never detach.
    live: bool,
}

impl FeatureCache {
    /// Keeps at most `budget_mb` MiB of features (0: encode every time).
    pub fn new(budget_mb: usize) -> Self {
        FeatureCache { cache: HashMap::new(), bytes: 0, budget: budget_mb << 20, encoded: 0, live: false }
    }

    /// For a training vision tower: features with their graph, encoded every time.
    pub fn live() -> Self {
        FeatureCache { live: true, ..Self::new(0) }
    }

    /// Features of `paths` (distinct images), stacked in order: (n, tokens, tower hidden). Images not in the cache
    /// are decoded, preprocessed and encoded together in one tower call.
    pub fn features(&mut self, vlm: &Vlm, paths: &[&Path]) -> Result<Tensor> {
        self.features_checkpointed(vlm, paths, None)
    }

    /// [`FeatureCache::features`]; with `tape`, a training tower's layers are checkpointed.
    pub fn features_checkpointed<'a>(
        &mut self,
        vlm: &'a Vlm,
        paths: &[&Path],
        tape: Option<&mut crate::model::checkpoint::Tape<'a>>,
    ) -> Result<Tensor> {
        let keys: Vec<Key> = paths.iter().map(|p| (p.to_path_buf(), None)).collect();
        self.encode(vlm, &keys, tape)
    }

    /// Features of distinct images after diffusion noise (mDPO's corrupted images): (n, tokens, tower hidden).
    pub fn noised_features(&mut self, vlm: &Vlm, images: &[(&Path, Noise)]) -> Result<Tensor> {
        let keys: Vec<Key> = images.iter().map(|(p, n)| (p.to_path_buf(), Some(*n))).collect();
        self.encode(vlm, &keys, None)
    }

    fn encode<'a>(
        &mut self,
        vlm: &'a Vlm,
        keys: &[Key],
        tape: Option<&mut crate::model::checkpoint::Tape<'a>>,
    ) -> Result<Tensor> {
        let missing: Vec<&Key> = keys.iter().filter(|k| !self.cache.contains_key(*k)).collect();
        let mut fresh: HashMap<&Key, Tensor> = HashMap::new();
        if !missing.is_empty() {
            let schedule = crate::vision::NoiseSchedule::default();
            let pixels = missing
                .iter()
                .map(|(p, noise)| {
                    let x = vlm.load_image(p)?;
                    match noise {
                        Some(n) => schedule.weaken(&x, n.step, n.seed),
                        None => Ok(x),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let pixels = Tensor::stack(&pixels, 0)?;
            let feats = match tape {
                Some(tape) if self.live => vlm.model.encode_images_checkpointed(&pixels, Some(tape))?,
                _ => vlm.model.encode_images(&pixels)?,
            };
            let feats = if self.live { feats } else { feats.detach() };
            self.encoded += missing.len();
            for (i, k) in missing.iter().enumerate() {
                let f = feats.get(i)?.contiguous()?;
                let size = f.elem_count() * f.dtype().size_in_bytes();
                if !self.live && self.bytes + size <= self.budget {
                    self.bytes += size;
                    self.cache.insert((*k).clone(), f.clone());
                }
                fresh.insert(k, f);
            }
        }
        let rows: Vec<Tensor> = keys
            .iter()
            .map(|k| {
                fresh
                    .get(k)
                    .or_else(|| self.cache.get(k))
                    .cloned()
                    .ok_or_else(|| crate::Error::invalid("feature cache lost an image"))
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// The distinct images of a batch in first-seen order, and for each image given, its index among them: a batch
/// encodes each image once (a pair's chosen and rejected rows share theirs). An image is anything comparable: a
/// path, or a path with its noise.
pub fn distinct_images<T: PartialEq + Copy>(images: impl IntoIterator<Item = T>) -> (Vec<T>, Vec<u32>) {
    let (mut distinct, mut index) = (Vec::<T>::new(), Vec::new());
    for img in images {
        let at = distinct.iter().position(|d| *d == img).unwrap_or_else(|| {
            distinct.push(img);
            distinct.len() - 1
        });
        index.push(at as u32);
    }
    (distinct, index)
}
