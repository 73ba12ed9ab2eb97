//! Decoding user image files into 8-bit RGB, the way transformers' `load_image` sees them.
//!
//! transformers loads images with PIL, applies `ImageOps.exif_transpose` and `convert("RGB")`:
//! alpha is dropped (not composited on white; only the `do_convert_rgb` path composites, and
//! LFM2-VL's configs leave it off), grayscale is replicated, palettes are expanded. PIL reads
//! 16-bit RGB PNGs by keeping the high byte, which we match for every 16-bit image. A file that
//! cannot be decoded is a per-sample [`ImageError`], never a panic.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

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

/// Decodes image file bytes to RGB8 with EXIF orientation applied.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    let mut decoder = reader.into_decoder()?;
    // A malformed EXIF block should not cost the image; PIL ignores it too.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::ZeroSize {
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(to_rgb8(img))
}

/// `convert("RGB")`: drop alpha, replicate gray, keep the high byte of 16-bit samples.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let high_byte = |v: u16| (v >> 8) as u8;
    let pixels: Option<Vec<u8>> = match &img {
        DynamicImage::ImageRgb16(b) => Some(b.as_raw().iter().map(|&v| high_byte(v)).collect()),
        DynamicImage::ImageRgba16(b) => Some(
            b.as_raw()
                .chunks_exact(4)
                .flat_map(|p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])])
                .collect(),
        ),
        DynamicImage::ImageLuma16(b) => {
            Some(b.as_raw().iter().flat_map(|&v| [high_byte(v); 3]).collect())
        }
        DynamicImage::ImageLumaA16(b) => Some(
            b.as_raw()
                .chunks_exact(2)
                .flat_map(|p| [high_byte(p[0]); 3])
                .collect(),
        ),
        _ => None,
    };
    match pixels.and_then(|raw| RgbImage::from_raw(w, h, raw)) {
        Some(rgb) => rgb,
        // 8-bit and float images: the image crate's conversion drops alpha as PIL does.
        None => match img {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        },
    }
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
    fn alpha_is_dropped_and_gray_replicated() -> Result<(), ImageError> {
        let rgba = image::RgbaImage::from_pixel(3, 2, Rgba([10, 20, 30, 0]));
        let out = decode_image(&encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png))?;
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        let gray = image::GrayImage::from_pixel(2, 2, Luma([77]));
        let out = decode_image(&encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png))?;
        assert_eq!(out.get_pixel(1, 1).0, [77, 77, 77]);
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
}
