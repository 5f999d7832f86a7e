//! JPEG decoding with libjpeg-turbo's decoder (as vendored by the `mozjpeg` crate, built from C by `cc`), so
//! decoded pixels are bit-identical to Pillow's, which bundles libjpeg-turbo: same integer IDCT (`JDCT_ISLOW`),
//! same fancy chroma upsampling, same YCbCr->RGB tables. The `image` crate's decoder (zune-jpeg) rounds
//! differently and leaves up to 25% of a 4:2:0 photo's pixels 1-4 levels off Pillow's.
//!
//! libjpeg reports fatal errors through a callback that must not return; ours unwinds (the C code is built with
//! unwind tables for this) and [`decode`] catches it, so a corrupt file is an error message, never an abort.
//! Like Pillow, data that ends early is an error, while other recoverable damage (libjpeg's warnings) is decoded.

use std::io;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg::decompress::DecompressStarted;
use mozjpeg::{ColorSpace, DctMethod, Decompress};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

/// Whether `bytes` start like a JPEG file (SOI marker followed by another marker).
pub(super) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG file's bytes as Pillow's `Image.open(f).convert("RGB")` would: grayscale files come back as
/// `Luma8`, everything else as `Rgb8`. `check` sees the header's width and height before anything is decoded and
/// may refuse them. Errors are libjpeg's messages, or `check`'s.
pub(super) fn decode(bytes: &[u8], check: impl Fn(u32, u32) -> Result<(), String>) -> Result<DynamicImage, String> {
    guarded(|| decode_unguarded(bytes, &check))
}

/// Runs `f`, turning a libjpeg error (an unwind from [`error_exit`]) into `Err` with its message.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload.downcast_ref::<String>().cloned();
        Err(msg.or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())
    })
}

fn decode_unguarded(bytes: &[u8], check: &dyn Fn(u32, u32) -> Result<(), String>) -> Result<DynamicImage, String> {
    let mut d = Decompress::with_err(error_mgr()).from_mem(bytes).map_err(|e| e.to_string())?;
    let (w, h) = d.size();
    check(w as u32, h as u32)?;
    // Pillow's settings, which are also libjpeg's defaults: say them so a changed default cannot creep in.
    d.dct_method(DctMethod::IntegerSlow);
    d.do_fancy_upsampling(true);
    let (w, h) = (w as u32, h as u32); // libjpeg caps each side at 65500
    let mismatch = || "decoder returned a buffer of the wrong size".to_string();
    match d.color_space() {
        ColorSpace::JCS_GRAYSCALE => {
            let px = read_all(d.grayscale())?;
            GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8).ok_or_else(mismatch)
        }
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let px = read_all(d.to_colorspace(ColorSpace::JCS_CMYK))?;
            RgbImage::from_raw(w, h, adobe_cmyk_to_rgb(&px)).map(DynamicImage::ImageRgb8).ok_or_else(mismatch)
        }
        _ => {
            let px = read_all(d.rgb())?;
            RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8).ok_or_else(mismatch)
        }
    }
}

/// Reads every scanline, then the rest of the file up to its end marker (a missing one is an error, as in Pillow).
fn read_all(started: io::Result<DecompressStarted<&[u8]>>) -> Result<Vec<u8>, String> {
    let mut started = started.map_err(|e| e.to_string())?;
    let px = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
    started.finish().map_err(|e| e.to_string())?;
    Ok(px)
}

/// Pillow's route from a 4-channel JPEG to RGB: it reads the channels inverted (rawmode `CMYK;I`, Adobe's
/// convention), then converts with `cmyk2rgb`: `(255 - k) - round((255 - k) * c / 255)` per channel.
fn adobe_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mul_div_255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = u32::from(px[3]); // 255 - inverted k
        rgb.extend(px[..3].iter().map(|&c| (nk - mul_div_255(255 - u32::from(c), nk)) as u8));
    }
    rgb
}

/// libjpeg's standard error manager with its two exits replaced: errors unwind instead of calling `exit()`, and
/// warnings are ignored except "premature end of file", which is an error.
fn error_mgr() -> jpeg_error_mgr {
    // SAFETY: all-zero is a valid jpeg_error_mgr (null pointers, `None` callbacks); jpeg_std_error fills it in.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    resume_unwind(Box::new(message(cinfo))) // resume_unwind skips the panic hook: nothing is printed
}

extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: libjpeg always sets `err` before it reports anything.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == JWRN_JPEG_EOF as std::os::raw::c_int {
        error_exit(cinfo);
    }
}

/// libjpeg's text for the message being reported.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: as above; `format_message` writes a NUL-terminated string of at most JMSG_LENGTH_MAX (200) bytes.
    // The binding declares its buffer `&[u8; 80]`, so it is called through a pointer type instead.
    let Some(format) = (unsafe { (*cinfo.err).format_message }) else {
        return format!("libjpeg error {}", unsafe { (*cinfo.err).msg_code });
    };
    let mut buf = [0u8; 200];
    type Format = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
    unsafe {
        let format: Format = std::mem::transmute(format);
        format(cinfo, buf.as_mut_ptr());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_follows_pillow() {
        // Inverted storage: 255 is no ink. White, black (k only), pure cyan, and a mixed value.
        let got = adobe_cmyk_to_rgb(&[255, 255, 255, 255, 255, 255, 255, 0, 0, 255, 255, 255, 155, 55, 205, 205]);
        assert_eq!(got, [255, 255, 255, 0, 0, 0, 0, 255, 255, 125, 44, 165]);
    }

    #[test]
    fn garbage_is_an_error_not_an_abort() {
        assert!(is_jpeg(&[0xFF, 0xD8, 0xFF, 0xE0]) && !is_jpeg(b"\x89PNG"));
        let ok = |_, _| Ok(());
        let err = decode(&[0xFF, 0xD8, 0xFF, 0xC0, 0, 3, 1, 2, 3, 4], ok).unwrap_err();
        assert!(!err.is_empty());
        assert!(decode(&[0xFF, 0xD8], ok).is_err());
        let refuse = |w, h| Err(format!("{w}x{h} refused"));
        let tiny = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/jpeg/gray.jpg")).unwrap();
        assert!(decode(&tiny, refuse).unwrap_err().ends_with("refused"), "the check sees the header first");
        assert!(decode(&tiny, ok).is_ok());
    }
}
