//! Image files to pixels, bounded before any allocation. The width and height are read from the file's header and
//! checked against a pixel limit, together with the square that [`AspectMode::Pad`] will make, before anything is
//! decoded or padded: a PNG of a few hundred bytes that claims 100000x1 pixels is one error line, not a 10 GB
//! canvas. JPEGs are decoded by libjpeg-turbo (`jpeg.rs`, Pillow's pixels), PNG and WebP by the `image` crate.

use std::path::Path;

use image::DynamicImage;

use crate::{Error, Result};

/// Default [`super::ImageProcessor::max_pixels`]: Pillow's `Image.MAX_IMAGE_PIXELS` (89.5 Mpx, about 270 MB as 8-bit
/// RGB), above which Pillow warns of a decompression bomb. A 9459x9459 padded square still fits.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// How a non-square image becomes square before the resize.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum AspectMode {
    /// LLaVA-1.5's `image_aspect_ratio: pad` (`expand2square`): paste the image centred on a square canvas filled
    /// with the mean colour `int(mean * 255)` = (122, 116, 104), so nothing is cropped away.
    #[default]
    Pad,
    /// Plain CLIP: resize the shortest edge and centre-crop (the released BPO training script's setting).
    Square,
}

impl std::fmt::Display for AspectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AspectMode::Pad => "pad",
            AspectMode::Square => "square",
        })
    }
}

/// Decodes an image file (JPEG, PNG or WebP, recognised by content) of at most [`DEFAULT_MAX_PIXELS`] pixels;
/// failures are [`Error::Image`]. JPEGs go through libjpeg-turbo so their pixels are exactly Pillow's; other
/// formats through the `image` crate.
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    load_image_within(path, DEFAULT_MAX_PIXELS, AspectMode::Square)
}

/// [`load_image`] with a size limit: the width and height are read from the file's header and refused (before
/// anything is decoded) when the image, or in `pad` mode the square it will be padded to, has more than
/// `max_pixels` pixels.
pub fn load_image_within(path: impl AsRef<Path>, max_pixels: u64, mode: AspectMode) -> Result<DynamicImage> {
    let path = path.as_ref();
    let err = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    decode_image(&bytes, max_pixels, mode).map_err(err)
}

/// Decodes the bytes of an image file (JPEG, PNG or WebP) after checking the size its header gives, as
/// [`load_image_within`] does; errors are plain messages.
pub fn decode_image(bytes: &[u8], max_pixels: u64, mode: AspectMode) -> std::result::Result<DynamicImage, String> {
    let check = |w, h| check_size(w, h, max_pixels, mode);
    if super::jpeg::is_jpeg(bytes) {
        return super::jpeg::decode(bytes, check);
    }
    let reader =
        || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string());
    let (w, h) = reader()?.into_dimensions().map_err(|e| e.to_string())?;
    check(w, h)?;
    reader()?.decode().map_err(|e| e.to_string())
}

/// Refuses an empty image, or one whose pixels (in `pad` mode: the pixels of the square it is padded to) are
/// more than `max_pixels`, saying the sizes.
pub(super) fn check_size(w: u32, h: u32, max_pixels: u64, mode: AspectMode) -> std::result::Result<(), String> {
    let (w64, h64) = (u64::from(w), u64::from(h));
    let side = w64.max(h64);
    if w == 0 || h == 0 {
        Err(format!("empty image ({w}x{h})"))
    } else if w64 * h64 > max_pixels {
        Err(format!("{w}x{h} is {} pixels, over the limit of {max_pixels} (--max-image-pixels)", w64 * h64))
    } else if mode == AspectMode::Pad && side * side > max_pixels {
        Err(format!(
            "{w}x{h} pads to a {side}x{side} square of {} pixels, over the limit of {max_pixels} (--max-image-pixels)",
            side * side
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit_covers_the_padded_square() {
        assert!(check_size(300, 200, 90_000, AspectMode::Pad).is_ok());
        assert!(check_size(300, 200, 60_000, AspectMode::Square).is_ok());
        let padded = check_size(300, 200, 60_000, AspectMode::Pad).unwrap_err();
        assert!(padded.contains("300x300") && padded.contains("90000") && padded.contains("60000"), "{padded}");
        assert!(check_size(300, 200, 59_999, AspectMode::Square).unwrap_err().contains("60000 pixels"));
        assert!(check_size(0, 5, 100, AspectMode::Square).unwrap_err().contains("empty"));
        // u32::MAX sides do not overflow.
        assert!(check_size(u32::MAX, u32::MAX, u64::MAX / 2, AspectMode::Pad).is_err());
    }

    #[cfg(feature = "clap")]
    #[test]
    fn aspect_mode_parses_as_displayed() {
        use clap::ValueEnum;
        for mode in AspectMode::value_variants() {
            assert_eq!(AspectMode::from_str(&mode.to_string(), false).unwrap(), *mode);
        }
        assert!(AspectMode::from_str("crop", false).is_err());
    }
}
