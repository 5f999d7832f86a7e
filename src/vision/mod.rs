//! Image preprocessing (CLIPImageProcessor) and diffusion-noise weakening.
