//! Image preprocessing (CLIPImageProcessor with LLaVA-1.5's `pad` mode, Pillow-exact resizing) and the
//! diffusion-noise image weakening that BPO uses to bootstrap `mllm-hal` negatives.
//!
//! ```no_run
//! use bpo::vision::{AspectMode, ImageProcessor, NoiseSchedule};
//! # fn main() -> bpo::Result<()> {
//! let proc = ImageProcessor::from_model_dir("llava-1.5-7b-hf")?;
//! let pixels = proc.load("coco/000000000009.jpg", AspectMode::Pad)?; // f32 (3, 336, 336)
//! let noised = NoiseSchedule::default().weaken(&pixels, 900, 42)?;
//! proc.denormalize(&noised)?.save("what-the-model-sees.png").ok();
//! # Ok(()) }
//! ```

mod decode;
mod distort;
mod jpeg;
mod preprocess;
mod resample;

pub use decode::{decode_image, load_image, load_image_within, AspectMode, DEFAULT_MAX_PIXELS};
pub use distort::{weaken, weakened_view, NoiseSchedule};
pub use preprocess::{ImageProcessor, Size};
pub use resample::Filter;
