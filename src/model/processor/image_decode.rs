//! Decoding user image files into 8-bit RGB, the way transformers' `load_image` sees them.
//!
//! transformers gets PIL images with `ImageOps.exif_transpose` applied, and its processor's
//! `do_convert_rgb` path (`image_transforms.convert_to_rgb`) turns them into RGB: grayscale is
//! replicated, palettes are expanded, and alpha is composited onto an opaque **white**
//! background with `Image.alpha_composite`, not dropped. LFM2-VL's configs say
//! `do_convert_rgb: null`, but without it transformers fails on grayscale and RGBA input, so
//! the reference fixtures (`tests/fixtures/reference/`) are computed with it on and we always
//! convert that way. PIL reads 16-bit colour and gray-with-alpha PNGs by keeping the high byte,
//! but plain 16-bit gray as mode `I;16`, whose conversion to RGB clips at 255 (Pillow 12,
//! `Convert.c`); we match both. JPEGs are decoded with libjpeg's algorithms, as PIL's are, so
//! their pixels match PIL's exactly (see [`decode_jpeg`]). A file that cannot be decoded is a
//! per-sample [`ImageError`], never a panic.
//!
//! Like PIL's `Image.MAX_IMAGE_PIXELS`, an image whose header declares more than a pixel cap
//! ([`DEFAULT_MAX_IMAGE_PIXELS`] unless the dataset says `max_image_pixels`) is refused before
//! any pixel buffer is allocated: a few hundred KB of PNG can otherwise decode to gigabytes.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage, RgbaImage};

/// Why an image file could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file has no bytes.
    #[error("image file is empty")]
    Empty,
    /// The bytes match no supported format (JPEG, PNG, WebP, GIF, BMP, TIFF).
    #[error("unrecognised image format (expected JPEG, PNG, WebP, GIF, BMP or TIFF)")]
    UnknownFormat,
    /// The format was recognised but the data is truncated or corrupt.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// Decoding would exceed the memory limit (the image is implausibly large).
    #[error("image too large to decode: {0}")]
    TooLarge(String),
    /// A JPEG whose data stops before its end-of-image marker. Decoders would fill the missing
    /// part with grey; PIL (so transformers) refuses it, and so do we.
    #[error("image file is truncated (the JPEG data ends before its end-of-image marker)")]
    Truncated,
    /// The image decoded to zero pixels.
    #[error("image has zero width or height ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
}

impl From<image::ImageError> for ImageError {
    fn from(err: image::ImageError) -> Self {
        match err {
            image::ImageError::Limits(e) => ImageError::TooLarge(e.to_string()),
            image::ImageError::Unsupported(e) => match e.kind() {
                image::error::UnsupportedErrorKind::Format(_) => ImageError::UnknownFormat,
                _ => ImageError::Decode(e.to_string()),
            },
            other => ImageError::Decode(other.to_string()),
        }
    }
}

/// PIL's `Image.MAX_IMAGE_PIXELS` (about 9459 x 9459): 268 MB as 8-bit RGB.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Decodes image file bytes to RGB8 with EXIF orientation applied, refusing images over
/// [`DEFAULT_MAX_IMAGE_PIXELS`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_image_capped(bytes, DEFAULT_MAX_IMAGE_PIXELS)
}

/// The error for an image whose header declares more than `max_pixels` pixels.
fn too_many_pixels(width: u64, height: u64, max_pixels: u64) -> ImageError {
    ImageError::TooLarge(format!(
        "{width}x{height} is {} pixels, more than the limit of {max_pixels} \
         (set `max_image_pixels` on the dataset to allow larger images)",
        width.saturating_mul(height)
    ))
}

/// [`decode_image`] with another pixel cap. The size is read from the header and checked
/// before decoding, so a decompression bomb costs no allocation.
pub fn decode_image_capped(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let is_jpeg = match reader.format() {
        None => return Err(ImageError::UnknownFormat),
        Some(image::ImageFormat::Jpeg) if jpeg_is_truncated(bytes) => {
            return Err(ImageError::Truncated);
        }
        Some(format) => format == image::ImageFormat::Jpeg,
    };
    let (orientation, mut img) = if is_jpeg {
        // The image crate's decoder only reads the EXIF orientation here; the pixels come from
        // libjpeg, as PIL's do. A JPEG it cannot parse keeps its stored orientation.
        let orientation = reader
            .into_decoder()
            .ok()
            .and_then(|mut d| d.orientation().ok());
        (orientation, decode_jpeg(bytes, max_pixels)?)
    } else {
        let mut decoder = reader.into_decoder()?;
        let (w, h) = decoder.dimensions();
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(too_many_pixels(w.into(), h.into(), max_pixels));
        }
        // A malformed EXIF block should not cost the image; PIL ignores it too.
        (
            decoder.orientation().ok(),
            DynamicImage::from_decoder(decoder)?,
        )
    };
    img.apply_orientation(orientation.unwrap_or(image::metadata::Orientation::NoTransforms));
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::ZeroSize {
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(to_rgb8(img))
}

/// Decodes a JPEG with libjpeg's algorithms and PIL's settings (accurate integer IDCT, fancy
/// upsampling), so the pixels equal PIL's exactly. The `image` crate's decoder (zune-jpeg)
/// differs from PIL by up to 6 levels in about 12% of the samples of the cats-vs-dogs photos.
///
/// PIL reads every 4-channel JPEG as Adobe-inverted CMYK (`CMYK;I`) and converts it to RGB with
/// `cmyk2rgb`; [`cmyk_to_rgb`] repeats that.
fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ImageError> {
    // libjpeg reports fatal errors by unwinding (without the panic hook), caught here.
    let decoded = std::panic::catch_unwind(|| -> Result<DynamicImage, ImageError> {
        let io = |e: std::io::Error| ImageError::Decode(e.to_string());
        let decompress = mozjpeg::Decompress::new_mem(bytes).map_err(io)?;
        let (w, h) = (decompress.width(), decompress.height());
        if (w as u64).saturating_mul(h as u64) > max_pixels {
            return Err(too_many_pixels(w as u64, h as u64, max_pixels));
        }
        let (w32, h32) = (
            u32::try_from(w).map_err(|e| ImageError::TooLarge(e.to_string()))?,
            u32::try_from(h).map_err(|e| ImageError::TooLarge(e.to_string()))?,
        );
        // Every layout is read the same way; only what its samples mean differs.
        let (format, mut started) = match decompress.image().map_err(io)? {
            mozjpeg::Format::RGB(started) => (JpegSamples::Rgb, started),
            mozjpeg::Format::Gray(started) => (JpegSamples::Gray, started),
            mozjpeg::Format::CMYK(started) => (JpegSamples::Cmyk, started),
        };
        let samples: Vec<u8> = started.read_scanlines::<u8>().map_err(io)?;
        // A warning at the end (e.g. junk after the image) does not cost the pixels.
        let _ = started.finish();
        let img = match format {
            JpegSamples::Rgb => RgbImage::from_raw(w32, h32, samples).map(DynamicImage::ImageRgb8),
            JpegSamples::Gray => {
                image::GrayImage::from_raw(w32, h32, samples).map(DynamicImage::ImageLuma8)
            }
            JpegSamples::Cmyk => {
                RgbImage::from_raw(w32, h32, cmyk_to_rgb(&samples)).map(DynamicImage::ImageRgb8)
            }
        }
        .ok_or_else(|| ImageError::Decode("libjpeg returned fewer pixels than the size".into()))?;
        Ok(img)
    });
    match decoded {
        Ok(result) => result,
        Err(payload) => Err(ImageError::Decode(
            payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "libjpeg failed".into()),
        )),
    }
}

/// What libjpeg's output samples are.
enum JpegSamples {
    Rgb,
    Gray,
    Cmyk,
}

/// PIL's `CMYK;I` unpacking followed by `Convert.c`'s `cmyk2rgb`: with `nk = 255 - k` and the
/// stored (inverted) samples, each channel is `nk - nk * c / 255` in its rounding.
fn cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    stored
        .chunks_exact(4)
        .flat_map(|p| {
            let [c, m, y, k] = [p[0], p[1], p[2], p[3]].map(|v| 255 - u32::from(v));
            let nk = 255 - k;
            [c, m, y].map(|v| (nk - muldiv255(v, nk)) as u8)
        })
        .collect()
}

/// Whether the last scan of a JPEG has no end-of-image marker after it. Inside entropy-coded
/// data a 0xFF byte is always followed by 0x00 or a restart marker, so the last `FF DA` is a
/// real start of scan (an EXIF thumbnail's markers all come before it) and `FF D9` after it can
/// only be the end of the image. No scan at all is left to the decoder to report.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    !bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// transformers' `convert_to_rgb`: replicate gray, keep the high byte of 16-bit samples (16-bit
/// gray clips instead, as PIL's `I;16` does), and composite any alpha channel onto white.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let high_byte = |v: u16| (v >> 8) as u8;
    if !img.color().has_alpha() {
        let pixels: Option<Vec<u8>> = match &img {
            DynamicImage::ImageRgb16(b) => Some(b.as_raw().iter().map(|&v| high_byte(v)).collect()),
            DynamicImage::ImageLuma16(b) => Some(
                b.as_raw()
                    .iter()
                    .flat_map(|&v| [v.min(255) as u8; 3])
                    .collect(),
            ),
            _ => None,
        };
        return match pixels.and_then(|raw| RgbImage::from_raw(w, h, raw)) {
            Some(rgb) => rgb,
            None => match img {
                DynamicImage::ImageRgb8(rgb) => rgb,
                other => other.to_rgb8(),
            },
        };
    }
    let pixels: Option<Vec<u8>> = match &img {
        DynamicImage::ImageRgba16(b) => Some(b.as_raw().iter().map(|&v| high_byte(v)).collect()),
        DynamicImage::ImageLumaA16(b) => Some(
            b.as_raw()
                .chunks_exact(2)
                .flat_map(|p| {
                    let (l, a) = (high_byte(p[0]), high_byte(p[1]));
                    [l, l, l, a]
                })
                .collect(),
        ),
        _ => None,
    };
    let rgba = match pixels.and_then(|raw| RgbaImage::from_raw(w, h, raw)) {
        Some(rgba) => rgba,
        None => match img {
            DynamicImage::ImageRgba8(rgba) => rgba,
            other => other.to_rgba8(),
        },
    };
    let raw: Vec<u8> = rgba
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| {
            [
                over_white(p[0], p[3]),
                over_white(p[1], p[3]),
                over_white(p[2], p[3]),
            ]
        })
        .collect();
    // Same dimensions as `rgba`, so the buffer length always matches.
    RgbImage::from_raw(w, h, raw).unwrap_or_else(|| RgbImage::new(w, h))
}

/// One channel of PIL's `Image.alpha_composite(white, src)` (`libImaging/AlphaComposite.c`).
/// With an opaque destination its 7-bit fixed-point coefficients are exact, `a * 128` and
/// `(255 - a) * 128`, and the division by 255 is its shift-based rounding; a float formula
/// would differ by one step on some values.
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    let tmp =
        c * (a << PRECISION_BITS) + 255 * ((255 - a) << PRECISION_BITS) + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma, Rgba};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format)
            .unwrap_or_else(|e| panic!("test image encodes: {e}"));
        out.into_inner()
    }

    #[test]
    fn garbage_empty_and_truncated_are_errors() {
        assert!(matches!(decode_image(&[]), Err(ImageError::Empty)));
        assert!(matches!(
            decode_image(b"definitely not an image"),
            Err(ImageError::UnknownFormat)
        ));
        let png = encode(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))),
            ImageFormat::Png,
        );
        assert!(decode_image(&png[..png.len() / 2]).is_err());
        assert!(decode_image(&png[..8]).is_err());
    }

    #[test]
    fn alpha_is_composited_on_white_and_gray_replicated() -> Result<(), ImageError> {
        let rgba = image::RgbaImage::from_fn(4, 1, |x, _| {
            Rgba([10, 20, 30, [0, 128, 255, 1][x as usize]])
        });
        let out = decode_image(&encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png))?;
        // Transparent is white, opaque is unchanged; half alpha mixes (PIL gives 132/137/142).
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [132, 137, 142]);
        assert_eq!(out.get_pixel(2, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(3, 0).0, [254, 254, 254]);
        let gray_alpha = image::GrayAlphaImage::from_pixel(1, 1, image::LumaA([0, 64]));
        let out = decode_image(&encode(
            &DynamicImage::ImageLumaA8(gray_alpha),
            ImageFormat::Png,
        ))?;
        assert_eq!(out.get_pixel(0, 0).0, [191, 191, 191]);
        let gray = image::GrayImage::from_pixel(2, 2, Luma([77]));
        let out = decode_image(&encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png))?;
        assert_eq!(out.get_pixel(1, 1).0, [77, 77, 77]);
        Ok(())
    }

    #[test]
    fn sixteen_bit_alpha_composites_high_bytes() -> Result<(), ImageError> {
        // PIL reads 16-bit RGBA as 8-bit RGBA (high bytes), then composites onto white.
        let img = image::ImageBuffer::<Rgba<u16>, _>::from_pixel(
            2,
            1,
            Rgba([0x0aff, 0x1400, 0x1e80, 0x80ff]),
        );
        let out = decode_image(&encode(&DynamicImage::ImageRgba16(img), ImageFormat::Png))?;
        assert_eq!(out.get_pixel(1, 0).0, [132, 137, 142]);
        Ok(())
    }

    #[test]
    fn sixteen_bit_keeps_high_byte() -> Result<(), ImageError> {
        let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            2,
            2,
            image::Rgb([0x12ff, 0xff00, 0x0080]),
        );
        let out = decode_image(&encode(&DynamicImage::ImageRgb16(img), ImageFormat::Png))?;
        assert_eq!(out.get_pixel(0, 0).0, [0x12, 0xff, 0x00]);
        Ok(())
    }

    #[test]
    fn sixteen_bit_gray_clips_like_pil() -> Result<(), ImageError> {
        // Pillow 12: `Image.open` gives mode `I;16`, `convert("RGB")` clips at 255.
        let values = [0u16, 100, 255, 256, 1000, 40000, 65535];
        let img =
            image::ImageBuffer::<image::Luma<u16>, _>::from_fn(values.len() as u32, 1, |x, _| {
                image::Luma([values[x as usize]])
            });
        let out = decode_image(&encode(&DynamicImage::ImageLuma16(img), ImageFormat::Png))?;
        let gray: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(gray, [0, 100, 255, 255, 255, 255, 255]);
        assert!(out.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        Ok(())
    }
}
