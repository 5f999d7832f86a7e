//! `bpo distort`: show what the model sees when BPO weakens an image with diffusion noise.

use std::path::PathBuf;

use bpo::vision::{weakened_view, AspectMode, ImageProcessor, NoiseSchedule};

/// Arguments of `bpo distort` (its help text is on `Command::Distort`).
#[derive(clap::Args)]
pub struct Args {
    /// Image to weaken (JPEG, PNG or WebP).
    #[arg(long)]
    image: PathBuf,
    /// Diffusion step t in 0..=999; larger is noisier.
    #[arg(long, default_value_t = 900)]
    noise_step: usize,
    /// Seed of the noise: the same seed gives the same picture.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `pad` (LLaVA-1.5: centre on a mean-colour square) or `square` (resize and centre-crop).
    #[arg(long, default_value = "pad")]
    mode: AspectMode,
    /// preprocessor_config.json, or a model folder holding one [default: LLaVA-1.5's CLIP-336 settings].
    #[arg(long)]
    preprocessor: Option<PathBuf>,
    /// Where to write the PNG (replaced atomically; a link is followed).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let proc = match &args.preprocessor {
        Some(p) if p.is_dir() => ImageProcessor::from_model_dir(p)?,
        Some(p) => ImageProcessor::from_file(p)?,
        None => ImageProcessor::default(),
    };
    let view = weakened_view(&proc, &args.image, args.mode, args.noise_step, args.seed)?;
    bpo::output::write_with(&args.out, |tmp| {
        view.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| bpo::Error::invalid(format!("writing {}: {e}", args.out.display())))
    })?;
    let schedule = NoiseSchedule::default();
    let (keep, noise) = (schedule.sqrt_abar(args.noise_step)?, schedule.sqrt_one_minus_abar(args.noise_step)?);
    outln!(
        "wrote {} ({}x{}, {} mode, step {}: {keep:.3} x image + {noise:.3} x noise, seed {})",
        args.out.display(),
        view.width(),
        view.height(),
        args.mode,
        args.noise_step,
        args.seed
    );
    Ok(())
}
