//! CLIP image preprocessing, matching transformers' `CLIPImageProcessor` (PIL backend) to the last bit, plus
//! LLaVA-1.5's `pad` aspect mode. Pipeline: convert to RGB, (pad to a square), resize the shortest edge with
//! Pillow's resampling, centre-crop, rescale, normalise. The result is an f32 `(3, H, W)` tensor on the CPU.
//!
//! Settings come from a checkpoint's `preprocessor_config.json`; fields it leaves out take transformers'
//! `CLIPImageProcessor` defaults (224 px), while [`ImageProcessor::default`] is LLaVA-1.5's CLIP-336 setup.
//!
//! The output is bit-identical to transformers for PNG, WebP and JPEG alike: JPEGs are decoded by the same
//! libjpeg-turbo code as Pillow's (see `jpeg.rs`), the others by the `image` crate, which agrees with Pillow.

use std::borrow::Cow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

use super::decode::{check_size, load_image_within, AspectMode};
use super::resample::{resize_window, Filter, RgbView};
use crate::{bail, Error, Result};

/// The resize target of `preprocessor_config.json`'s `size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// `{"shortest_edge": n}` or a bare `n`: scale so the shorter side is `n`, keeping the aspect ratio.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`: resize to exactly this size.
    Exact { height: usize, width: usize },
}

/// CLIP image preprocessing settings (the fields of transformers' `CLIPImageProcessor`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub do_resize: bool,
    pub size: Size,
    /// `resample`: 3 (bicubic) or 2 (bilinear).
    pub resample: Filter,
    pub do_center_crop: bool,
    /// `crop_size` as (height, width).
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Composite transparency onto white as transformers does (without it, alpha is simply dropped).
    pub do_convert_rgb: bool,
    /// Largest image accepted, in pixels of the square it is padded to (`pad`) or of the image itself
    /// (`square`); checked from the file's header before anything is decoded or padded. Not a
    /// `preprocessor_config.json` field; default [`super::DEFAULT_MAX_PIXELS`].
    pub max_pixels: u64,
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for ImageProcessor {
    /// LLaVA-1.5's processor (`openai/clip-vit-large-patch14-336`): shortest edge 336, crop 336x336, bicubic.
    fn default() -> Self {
        ImageProcessor { size: Size::ShortestEdge(336), crop_size: (336, 336), ..Self::clip_defaults() }
    }
}

impl ImageProcessor {
    /// transformers' `CLIPImageProcessor` class defaults (224 px), used for fields a config file leaves out.
    fn clip_defaults() -> Self {
        ImageProcessor {
            do_resize: true,
            size: Size::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
            max_pixels: super::DEFAULT_MAX_PIXELS,
        }
    }

    /// Reads a `preprocessor_config.json` (or any JSON object with its fields).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_text(path, &crate::jsonl::read_folder_file_required(path)?)
    }

    /// Reads the text of a `preprocessor_config.json` read from `path`.
    fn from_text(path: &Path, text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::parse(path, None, e))?;
        Self::from_json(&value).map_err(|msg| Error::parse(path, None, msg))
    }

    /// [`from_model_dir`](Self::from_model_dir) for a vision tower that takes `side` x `side` images: a
    /// processor whose output has another size (or, with no processor file, a tower other than 336 px) is
    /// refused with one line naming the file and both sizes, instead of a tensor-shape error at the first image.
    pub fn for_tower(dir: impl AsRef<Path>, side: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let p = Self::from_model_dir(dir)?;
        let Some((h, w)) = p.output_size().filter(|&s| s != (side, side)) else { return Ok(p) };
        let pre = dir.join("preprocessor_config.json");
        let nested = dir.join("processor_config.json");
        if let Some(file) = [&pre, &nested].into_iter().find(|f| f.is_file()) {
            bail!(
                "{}: the image processor makes {h}x{w} images but the vision tower takes {side}x{side} \
                 (vision_config.image_size in config.json)",
                file.display()
            );
        }
        bail!(
            "{}: not found; without it images are made {h}x{w} (LLaVA-1.5's CLIP-336) but this vision tower takes \
             {side}x{side}: add the model's preprocessor_config.json",
            pre.display()
        )
    }

    /// The size of every output, when it does not depend on the image: the crop, or an exact resize.
    fn output_size(&self) -> Option<(usize, usize)> {
        match (self.do_center_crop, self.do_resize, self.size) {
            (true, ..) => Some(self.crop_size),
            (false, true, Size::Exact { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// The processor of a model folder: its `preprocessor_config.json`, else the `image_processor` entry of the
    /// `processor_config.json` that transformers 5 writes instead. Only when neither file exists does it fall
    /// back to [`ImageProcessor::default`] (LLaVA-1.5, 336 px), which is wrong for other vision towers (see
    /// [`for_tower`](Self::for_tower)).
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found");
            return Err(Error::io(dir, e));
        }
        let pre = dir.join("preprocessor_config.json");
        if let Some(text) = crate::jsonl::read_folder_file(&pre)? {
            return Self::from_text(&pre, &text);
        }
        let proc = dir.join("processor_config.json");
        if let Some(text) = crate::jsonl::read_folder_file(&proc)? {
            let value: Value = serde_json::from_str(&text).map_err(|e| Error::parse(&proc, None, e))?;
            if let Some(ip) = value.get("image_processor") {
                return Self::from_json(ip).map_err(|msg| Error::parse(&proc, None, format!("image_processor: {msg}")));
            }
        }
        Ok(Self::default())
    }

    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let mut p = Self::clip_defaults();
        let flag = |key: &str, default: bool| match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or(format!("{key}: expected true or false")),
        };
        p.do_resize = flag("do_resize", p.do_resize)?;
        p.do_center_crop = flag("do_center_crop", p.do_center_crop)?;
        p.do_rescale = flag("do_rescale", p.do_rescale)?;
        p.do_normalize = flag("do_normalize", p.do_normalize)?;
        p.do_convert_rgb = flag("do_convert_rgb", p.do_convert_rgb)?;
        if let Some(x) = present(obj.get("size")) {
            p.size = parse_size(x)?;
        }
        if let Some(x) = present(obj.get("crop_size")) {
            p.crop_size = match parse_size(x)? {
                Size::Exact { height, width } => (height, width),
                Size::ShortestEdge(n) if x.is_u64() => (n, n),
                Size::ShortestEdge(_) => return Err("crop_size: expected {\"height\", \"width\"} or an integer".into()),
            };
        }
        if let Some(x) = present(obj.get("resample")) {
            let code = x.as_i64().ok_or("resample: expected an integer")?;
            p.resample = Filter::from_pil(code)
                .ok_or(format!("resample: PIL filter {code} is not supported (use 3 = bicubic or 2 = bilinear)"))?;
        }
        if let Some(x) = present(obj.get("rescale_factor")) {
            p.rescale_factor = x.as_f64().ok_or("rescale_factor: expected a number")?;
        }
        if let Some(x) = present(obj.get("image_mean")) {
            p.image_mean = parse_triple(x, "image_mean")?;
        }
        if let Some(x) = present(obj.get("image_std")) {
            p.image_std = parse_triple(x, "image_std")?;
        }
        if p.image_std.contains(&0.0) {
            return Err("image_std: must not contain 0".into());
        }
        Ok(p)
    }

    /// Preprocesses a decoded image into the f32 `(3, H, W)` CPU tensor a CLIP tower takes. An image over
    /// [`max_pixels`](Self::max_pixels) (padded, in `pad` mode) is refused before any pixel is copied.
    pub fn preprocess(&self, img: &DynamicImage, mode: AspectMode) -> Result<Tensor> {
        check_size(img.width(), img.height(), self.max_pixels, mode).map_err(Error::invalid)?;
        let (pixels, h, w) = self.pixels(img, mode)?;
        let luts = self.lookup_tables();
        let n = h * w;
        let mut data = vec![0f32; 3 * n];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * n + i] = luts[c][usize::from(px[c])];
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
    }

    /// Decodes a JPEG, PNG or WebP file and preprocesses it; a missing, undecodable or too large file (see
    /// [`max_pixels`](Self::max_pixels)) is an [`Error::Image`] naming the path.
    pub fn load(&self, path: impl AsRef<Path>, mode: AspectMode) -> Result<Tensor> {
        self.preprocess(&load_image_within(path, self.max_pixels, mode)?, mode)
    }

    /// Turns a `(3, H, W)` tensor made by [`preprocess`](Self::preprocess) (possibly noised) back into an 8-bit
    /// picture: undo normalisation and rescaling, clamp to 0..=255, round.
    pub fn denormalize(&self, t: &Tensor) -> Result<RgbImage> {
        let (c, h, w) = t.dims3()?;
        if c != 3 {
            bail!("denormalize: expected 3 channels, got a tensor of shape {:?}", t.shape());
        }
        let data = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = h * w;
        let scale = if self.do_rescale { self.rescale_factor } else { 1.0 };
        let mut out = RgbImage::new(w as u32, h as u32);
        for (i, px) in out.pixels_mut().enumerate() {
            for ch in 0..3 {
                let mut v = f64::from(data[ch * n + i]);
                if self.do_normalize {
                    v = v * self.image_std[ch] + self.image_mean[ch];
                }
                px[ch] = (v / scale).round().clamp(0.0, 255.0) as u8;
            }
        }
        Ok(out)
    }

    /// The 8-bit RGB crop (interleaved, with its height and width) before rescaling and normalisation.
    fn pixels(&self, img: &DynamicImage, mode: AspectMode) -> Result<(Vec<u8>, usize, usize)> {
        let rgb = to_rgb(img, self.do_convert_rgb);
        let rgb = match mode {
            AspectMode::Pad => expand_to_square(rgb, self.pad_colour()),
            AspectMode::Square => rgb,
        };
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        if w == 0 || h == 0 {
            bail!("cannot preprocess an empty ({w}x{h}) image");
        }
        let (oh, ow) = if self.do_resize { self.resized_size(h, w) } else { (h, w) };
        let (ch, cw) = if self.do_center_crop { self.crop_size } else { (oh, ow) };
        // transformers: top = (H - crop_h) // 2 (floor); crops larger than the image are zero-padded around it.
        let (top, left) = ((oh as i64 - ch as i64).div_euclid(2), (ow as i64 - cw as i64).div_euclid(2));
        let rows = clamp_range(top, ch, oh);
        let cols = clamp_range(left, cw, ow);
        let view = RgbView { data: rgb.as_raw(), width: w, height: h };
        let window = resize_window(view, (ow, oh), rows.clone(), cols.clone(), self.resample);
        if rows.len() == ch && cols.len() == cw {
            return Ok((window, ch, cw));
        }
        let mut out = vec![0u8; ch * cw * 3];
        let (dy, dx) = ((rows.start as i64 - top) as usize, (cols.start as i64 - left) as usize);
        for (y, src) in window.chunks_exact(cols.len() * 3).enumerate() {
            let at = ((y + dy) * cw + dx) * 3;
            out[at..at + src.len()].copy_from_slice(src);
        }
        Ok((out, ch, cw))
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`: (height, width).
    fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.size {
            Size::Exact { height, width } => (height, width),
            Size::ShortestEdge(s) => {
                let (short, long) = (w.min(h), w.max(h));
                // Python's int(s * long / short): exact product, correctly rounded division, truncation.
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// LLaVA's `tuple(int(x * 255) for x in image_mean)`: truncated, so (122, 116, 104) for CLIP's mean.
    fn pad_colour(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Per-channel value of each byte after rescale and normalise, computed as numpy does in transformers:
    /// `float32(float64(v) * rescale_factor)`, then `(x - float32(mean)) / float32(std)` in float32.
    fn lookup_tables(&self) -> [[f32; 256]; 3] {
        let mut luts = [[0f32; 256]; 3];
        for (c, lut) in luts.iter_mut().enumerate() {
            for (v, out) in lut.iter_mut().enumerate() {
                let x = if self.do_rescale { (v as f64 * self.rescale_factor) as f32 } else { v as f32 };
                *out = if self.do_normalize { (x - self.image_mean[c] as f32) / self.image_std[c] as f32 } else { x };
            }
        }
        luts
    }
}

fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|x| !x.is_null())
}

fn parse_size(v: &Value) -> std::result::Result<Size, String> {
    let dim = |x: Option<&Value>, key: &str| -> std::result::Result<usize, String> {
        match x.and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(format!("size: {key} must be a positive integer")),
        }
    };
    if v.is_number() {
        return Ok(Size::ShortestEdge(dim(Some(v), "size")?));
    }
    let obj = v.as_object().ok_or("size: expected an integer or an object")?;
    match (obj.get("shortest_edge"), obj.get("longest_edge"), obj.get("height"), obj.get("width")) {
        (Some(s), None, None, None) => Ok(Size::ShortestEdge(dim(Some(s), "shortest_edge")?)),
        (None, None, Some(h), Some(w)) => {
            Ok(Size::Exact { height: dim(Some(h), "height")?, width: dim(Some(w), "width")? })
        }
        _ => Err(format!("size: unsupported form {v} (use {{\"shortest_edge\"}} or {{\"height\", \"width\"}})")),
    }
}

fn parse_triple(v: &Value, key: &str) -> std::result::Result<[f64; 3], String> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let items: Option<Vec<f64>> = v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect());
    match items {
        Some(x) if x.len() == 3 && v.as_array().is_some_and(|a| a.len() == 3) => Ok([x[0], x[1], x[2]]),
        _ => Err(format!("{key}: expected a number or a list of 3 numbers")),
    }
}

/// `[start, start + len)` intersected with `[0, limit)`.
fn clamp_range(start: i64, len: usize, limit: usize) -> std::ops::Range<usize> {
    let lo = start.clamp(0, limit as i64) as usize;
    let hi = (start + len as i64).clamp(0, limit as i64) as usize;
    lo..hi.max(lo)
}

/// transformers' `convert_to_rgb`: images with alpha are composited onto white (as Pillow's `alpha_composite`
/// rounds: `round((c * a + 255 * (255 - a)) / 255)`); others are converted, borrowing 8-bit RGB as is.
fn to_rgb(img: &DynamicImage, composite_alpha: bool) -> Cow<'_, RgbImage> {
    if let Some(rgb) = img.as_rgb8() {
        return Cow::Borrowed(rgb);
    }
    if !(composite_alpha && img.color().has_alpha()) {
        return Cow::Owned(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            o[c] = ((u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    Cow::Owned(out)
}

/// LLaVA's `expand2square`: centre the image on a square canvas of `fill` (offset `(side - short) // 2`).
fn expand_to_square(img: Cow<'_, RgbImage>, fill: [u8; 3]) -> Cow<'_, RgbImage> {
    let (w, h) = img.dimensions();
    if w == h {
        return img;
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (dx, dy) = ((side - w) / 2, (side - h) / 2);
    let row = w as usize * 3;
    for (y, src) in img.as_raw().chunks_exact(row).enumerate() {
        let at = ((y + dy as usize) * side as usize + dx as usize) * 3;
        out.as_mut()[at..at + row].copy_from_slice(src);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<ImageProcessor, String> {
        ImageProcessor::from_json(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn missing_fields_take_clip_defaults_and_ints_are_accepted() {
        let p = parse(r#"{"size": 36, "crop_size": 36}"#).unwrap();
        assert_eq!(p.size, Size::ShortestEdge(36));
        assert_eq!(p.crop_size, (36, 36));
        let clip = ImageProcessor::clip_defaults();
        assert_eq!(p, ImageProcessor { size: Size::ShortestEdge(36), crop_size: (36, 36), ..clip });
        assert_eq!(parse("{}").unwrap().size, Size::ShortestEdge(224));
        let q = parse(r#"{"size": {"height": 20, "width": 30}, "resample": 2, "image_mean": 0.5}"#).unwrap();
        assert_eq!(q.size, Size::Exact { height: 20, width: 30 });
        assert_eq!(q.resample, Filter::Bilinear);
        assert_eq!(q.image_mean, [0.5; 3]);
    }

    #[test]
    fn bad_configs_are_rejected() {
        assert!(parse(r#"{"resample": 1}"#).unwrap_err().contains("not supported"));
        assert!(parse(r#"{"size": {"shortest_edge": 10, "longest_edge": 20}}"#).is_err());
        assert!(parse(r#"{"image_std": [1, 0, 1]}"#).is_err());
        assert!(parse(r#"{"image_mean": [1, 2]}"#).is_err());
        assert!(parse(r#"{"do_resize": "yes"}"#).is_err());
        assert!(parse(r#"{"size": 0}"#).is_err());
    }

    #[test]
    fn resize_rounding_matches_transformers() {
        let p = ImageProcessor::default();
        // int(336 * 451 / 300) = 505, int(336 * 640 / 427) = 503; portrait images swap.
        assert_eq!(p.resized_size(300, 451), (336, 505));
        assert_eq!(p.resized_size(640, 427), (503, 336));
        assert_eq!(p.resized_size(336, 336), (336, 336));
    }

    #[test]
    fn pad_colour_truncates_like_llava() {
        assert_eq!(ImageProcessor::default().pad_colour(), [122, 116, 104]);
    }

    #[test]
    fn pad_centres_the_image_and_odd_margins_go_below() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 1, image::Rgb([9, 9, 9])));
        let sq = expand_to_square(Cow::Owned(img.to_rgb8()), [1, 2, 3]);
        assert_eq!(sq.dimensions(), (4, 4));
        let rows: Vec<u8> = (0..4).map(|y| sq.get_pixel(0, y)[0]).collect();
        assert_eq!(rows, [1, 9, 1, 1]); // (4 - 1) // 2 = 1 row above
    }

    #[test]
    fn crop_larger_than_image_is_zero_padded() {
        let raw = ImageProcessor { do_normalize: false, do_rescale: false, ..ImageProcessor::default() };
        let p = ImageProcessor { do_resize: false, crop_size: (4, 4), ..raw };
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 3, image::Rgb([200, 200, 200])));
        let t = p.preprocess(&img, AspectMode::Square).unwrap();
        assert_eq!(t.dims(), &[3, 4, 4]);
        let ch0: Vec<Vec<f32>> = t.get(0).unwrap().to_vec2().unwrap();
        // ceil((4 - 3) / 2) = 1 row and ceil((4 - 2) / 2) = 1 column of zeros before the image.
        assert_eq!(ch0[0], [0.0; 4]);
        assert_eq!(ch0[1], [0.0, 200.0, 200.0, 0.0]);
        assert_eq!(ch0[3], [0.0, 200.0, 200.0, 0.0]);
    }

    #[test]
    fn alpha_is_composited_on_white() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(1, 1, image::Rgba([0, 100, 255, 128])));
        // PIL alpha_composite on white: round((c * 128 + 255 * 127) / 255).
        assert_eq!(to_rgb(&img, true).get_pixel(0, 0).0, [127, 177, 255]);
        assert_eq!(to_rgb(&img, false).get_pixel(0, 0).0, [0, 100, 255]);
    }

    #[test]
    fn denormalize_inverts_preprocess() {
        let p = ImageProcessor { size: Size::ShortestEdge(8), crop_size: (8, 8), ..ImageProcessor::default() };
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 77]));
        let t = p.preprocess(&DynamicImage::ImageRgb8(img.clone()), AspectMode::Square).unwrap();
        assert_eq!(p.denormalize(&t).unwrap(), img);
        assert!(p.denormalize(&t.get(0).unwrap()).is_err());
    }

    #[test]
    fn preprocess_refuses_an_image_whose_padded_square_is_over_the_limit() {
        let p = ImageProcessor { max_pixels: 1000, ..ImageProcessor::default() };
        let wide = DynamicImage::ImageRgb8(RgbImage::new(100, 2));
        assert!(p.preprocess(&wide, AspectMode::Pad).unwrap_err().to_string().contains("100x100"));
    }
}
