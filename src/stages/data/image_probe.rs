//! Reading an image's size and mode without decoding its pixels.
//!
//! Modes follow PIL's names (what the tutorial's `image.mode == "RGB"` filter sees): a JPEG with
//! 1/3/4 components is `L`/`RGB`/`CMYK`; a PNG's IHDR colour type gives `1`/`L`/`I;16`/`RGB`/`P`/
//! `LA`/`RGBA`; GIF is `P`. Other formats ask the `image` crate's decoder for its colour type
//! (header only). JPEG and PNG are also checked for their end marker, which catches the common
//! truncated download without decoding; [`ImageCheck::Full`] decodes every image instead.

use std::io::Cursor;

use image::{ColorType, ImageDecoder, ImageFormat, ImageReader};

/// How thoroughly ingest checks each image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageCheck {
    /// Header (size, mode) and, for JPEG/PNG, the end marker. Fast.
    #[default]
    Header,
    /// Decode every image fully (catches corrupt pixel data; several times slower).
    Full,
}

/// What the header says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Lower-case format name: `jpeg`, `png`, `gif`, `webp`, `bmp`, `tiff`.
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// PIL-style mode name (`RGB`, `L`, `RGBA`, `P`, `CMYK`, …).
    pub mode: String,
}

/// Reads size and mode of an encoded image; the error is a human reason for `errors.parquet`.
pub fn probe_image(bytes: &[u8], check: ImageCheck) -> Result<ImageInfo, String> {
    if bytes.is_empty() {
        return Err("empty file".to_owned());
    }
    let format = image::guess_format(bytes).map_err(|_| "unrecognised image format".to_owned())?;
    let info = match format {
        ImageFormat::Jpeg => probe_jpeg(bytes)?,
        ImageFormat::Png => probe_png(bytes)?,
        other => probe_with_decoder(bytes, other)?,
    };
    if info.width == 0 || info.height == 0 {
        return Err(format!("zero-sized image ({}x{})", info.width, info.height));
    }
    if check == ImageCheck::Full {
        image::load_from_memory_with_format(bytes, format)
            .map_err(|e| format!("decode failed: {e}"))?;
    }
    Ok(info)
}

fn probe_jpeg(bytes: &[u8]) -> Result<ImageInfo, String> {
    // JPEG is a sequence of marker segments: FF xx, then a big-endian length that includes itself.
    let mut pos = 2;
    let (width, height, components) = loop {
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return Err("truncated jpeg header (no frame header)".to_owned());
        };
        pos += 1;
        // Standalone markers carry no length.
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            continue;
        }
        if marker == 0xD9 || marker == 0xDA {
            return Err("jpeg has no frame header before its scan".to_owned());
        }
        let len = read_u16(bytes, pos).ok_or("truncated jpeg segment")? as usize;
        if len < 2 {
            return Err("corrupt jpeg segment length".to_owned());
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let height = read_u16(bytes, pos + 3).ok_or("truncated jpeg frame header")?;
            let width = read_u16(bytes, pos + 5).ok_or("truncated jpeg frame header")?;
            let components = *bytes.get(pos + 7).ok_or("truncated jpeg frame header")?;
            break (width, height, components);
        }
        pos += len;
    };
    let mode = match components {
        1 => "L",
        3 => "RGB",
        4 => "CMYK",
        n => return Err(format!("jpeg with {n} colour components")),
    };
    // After the frame header, `FF D9` can only be the end-of-image marker: entropy-coded data
    // stuffs every `FF` as `FF 00`, and embedded EXIF thumbnails sit before the frame header.
    // Searching the rest (not just the tail) accepts files with trailing vendor data.
    if !bytes[pos..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err("truncated jpeg (no end-of-image marker)".to_owned());
    }
    Ok(ImageInfo {
        format: "jpeg".to_owned(),
        width: u32::from(width),
        height: u32::from(height),
        mode: mode.to_owned(),
    })
}

fn probe_png(bytes: &[u8]) -> Result<ImageInfo, String> {
    // 8-byte signature, then the IHDR chunk: length, "IHDR", width, height, depth, colour type.
    if bytes.len() < 33 || &bytes[12..16] != b"IHDR" {
        return Err("truncated png header".to_owned());
    }
    let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    let depth = bytes[24];
    let mode = match (bytes[25], depth) {
        (0, 1) => "1",
        (0, 16) => "I;16",
        (0, _) => "L",
        (2, _) => "RGB",
        (3, _) => "P",
        (4, _) => "LA",
        (6, _) => "RGBA",
        (t, _) => return Err(format!("png with invalid colour type {t}")),
    };
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if !tail.windows(4).any(|w| w == b"IEND") {
        return Err("truncated png (no IEND chunk)".to_owned());
    }
    Ok(ImageInfo {
        format: "png".to_owned(),
        width,
        height,
        mode: mode.to_owned(),
    })
}

fn probe_with_decoder(bytes: &[u8], format: ImageFormat) -> Result<ImageInfo, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("unreadable {format:?} header: {e}"))?;
    let (width, height) = decoder.dimensions();
    let mode = if format == ImageFormat::Gif {
        // PIL opens GIFs as palette images.
        "P"
    } else {
        match decoder.color_type() {
            ColorType::L8 => "L",
            ColorType::L16 => "I;16",
            ColorType::La8 | ColorType::La16 => "LA",
            ColorType::Rgb8 | ColorType::Rgb16 | ColorType::Rgb32F => "RGB",
            ColorType::Rgba8 | ColorType::Rgba16 | ColorType::Rgba32F => "RGBA",
            _ => "unknown",
        }
    };
    Ok(ImageInfo {
        format: format!("{format:?}").to_ascii_lowercase(),
        width,
        height,
        mode: mode.to_owned(),
    })
}

fn read_u16(bytes: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(pos)?, *bytes.get(pos + 1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn modes_and_sizes_without_decoding() {
        let rgb = image::DynamicImage::new_rgb8(7, 5);
        let gray = image::DynamicImage::new_luma8(3, 4);
        let rgba = image::DynamicImage::new_rgba8(2, 9);
        let cases = [
            (encode(rgb.clone(), ImageFormat::Jpeg), "jpeg", 7, 5, "RGB"),
            (encode(gray.clone(), ImageFormat::Jpeg), "jpeg", 3, 4, "L"),
            (encode(rgb.clone(), ImageFormat::Png), "png", 7, 5, "RGB"),
            (encode(gray, ImageFormat::Png), "png", 3, 4, "L"),
            (encode(rgba.clone(), ImageFormat::Png), "png", 2, 9, "RGBA"),
            (encode(rgb, ImageFormat::Bmp), "bmp", 7, 5, "RGB"),
            (encode(rgba, ImageFormat::Gif), "gif", 2, 9, "P"),
        ];
        for (bytes, format, w, h, mode) in cases {
            let info = probe_image(&bytes, ImageCheck::Full).unwrap();
            assert_eq!(
                (
                    info.format.as_str(),
                    info.width,
                    info.height,
                    info.mode.as_str()
                ),
                (format, w, h, mode)
            );
        }
    }

    #[test]
    fn truncated_and_garbage_are_reasons_not_panics() {
        let jpeg = encode(image::DynamicImage::new_rgb8(16, 16), ImageFormat::Jpeg);
        let png = encode(image::DynamicImage::new_rgb8(16, 16), ImageFormat::Png);
        for bytes in [
            &jpeg[..jpeg.len() / 2],
            &png[..png.len() - 20],
            &jpeg[..3],
            b"hello",
        ] {
            assert!(probe_image(bytes, ImageCheck::Header).is_err());
        }
        assert_eq!(
            probe_image(b"", ImageCheck::Header).unwrap_err(),
            "empty file"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        // Damaged files come from users: probing must answer, never panic.
        #[test]
        fn damaged_images_never_panic(
            cut in 0usize..2000,
            flips in proptest::collection::vec((0usize..2000, proptest::num::u8::ANY), 0..8),
            png in proptest::bool::ANY,
        ) {
            let format = if png { ImageFormat::Png } else { ImageFormat::Jpeg };
            let mut bytes = encode(image::DynamicImage::new_rgb8(20, 10), format);
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            bytes.truncate(cut.max(1));
            let _ = probe_image(&bytes, ImageCheck::Header);
            let _ = probe_image(&bytes, ImageCheck::Full);
        }
    }
}
