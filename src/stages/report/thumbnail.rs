//! Small JPEG thumbnails as data URLs, made in parallel (decoding full-size photos dominates the
//! time of a 10,000-sample report).
//!
//! Images are decoded as the model decodes them ([`decode_image_capped`]: the pixel cap checked
//! from the header before anything is allocated, EXIF orientation applied), so a decompression
//! bomb that reaches a report is an error placeholder, never a decode. Images larger than
//! [`BIG_PIXELS`] are decoded one at a time, so a report holds at most one full-size large image
//! (at most the pixel cap) beside a few small ones, whatever the number of threads.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use image::codecs::jpeg::JpegEncoder;

use crate::model::processor::decode_image_capped;
use crate::stages::eval::ImageSource;

/// JPEG quality of thumbnails: photos stay recognisable at a few KB each.
const JPEG_QUALITY: u8 = 80;

/// Above this many pixels (12 MB of RGB) an image is decoded while holding [`BIG`].
const BIG_PIXELS: u64 = 4_000_000;

/// Held while a large image is decoded: one at a time.
static BIG: Mutex<()> = Mutex::new(());

/// Thumbnails of the images of a report, and why the others have none.
#[derive(Debug, Default)]
pub struct Thumbnails {
    /// `data:image/jpeg;base64,…` URLs by image id.
    pub urls: HashMap<String, String>,
    /// Why an image the source has is not shown (over the pixel cap, undecodable), by image id.
    pub errors: HashMap<String, String>,
}

/// A `data:image/jpeg;base64,…` URL of the image scaled to fit `max_px` × `max_px`, or why there
/// is none (the report then shows a placeholder rather than failing). An image whose header
/// declares more than `max_pixels` pixels is refused before decoding.
pub fn thumbnail_data_url(bytes: &[u8], max_px: u32, max_pixels: u64) -> Result<String, String> {
    let declared = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .map_or(0, |(w, h)| u64::from(w) * u64::from(h));
    let decoded = if declared > BIG_PIXELS && declared <= max_pixels {
        // A poisoned lock only means another decode panicked; the guard protects nothing else.
        let _one_at_a_time = BIG
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        decode_image_capped(bytes, max_pixels)
    } else {
        decode_image_capped(bytes, max_pixels)
    }
    .map_err(|e| e.to_string())?;
    let decoded = image::DynamicImage::ImageRgb8(decoded);
    let small = if decoded.width() > max_px || decoded.height() > max_px {
        decoded.thumbnail(max_px, max_px).into_rgb8()
    } else {
        decoded.into_rgb8()
    };
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut Cursor::new(&mut jpeg), JPEG_QUALITY)
        .encode_image(&small)
        .map_err(|e| format!("cannot encode the thumbnail: {e}"))?;
    Ok(format!("data:image/jpeg;base64,{}", STANDARD.encode(jpeg)))
}

/// Thumbnails of every id the source knows, keyed by id; what does not decode under
/// `max_pixels` is in [`Thumbnails::errors`] instead.
pub fn thumbnails(
    ids: &[&str],
    images: &dyn ImageSource,
    max_px: u32,
    max_pixels: u64,
) -> Thumbnails {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunk = ids.len().div_ceil(threads).max(1);
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|id| {
                            let bytes = images.image_bytes(id)?;
                            Some((
                                id.to_string(),
                                thumbnail_data_url(&bytes, max_px, max_pixels),
                            ))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // A worker only panics on a bug in an image decoder; losing its thumbnails beats aborting.
        workers
            .into_iter()
            .filter_map(|w| w.join().ok())
            .flatten()
            .collect()
    });
    let mut out = Thumbnails::default();
    for (id, result) in results {
        match result {
            Ok(url) => out.urls.insert(id, url),
            Err(reason) => out.errors.insert(id, reason),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::processor::DEFAULT_MAX_IMAGE_PIXELS;
    use crate::stages::eval::MapImageSource;
    use image::{ImageFormat, RgbImage};

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encode");
        out
    }

    #[test]
    fn thumbnails_fit_the_box_and_skip_bad_images() {
        let mut source = MapImageSource::new();
        source.insert("wide", png(640, 320));
        source.insert("tiny", png(20, 10));
        source.insert("broken", b"nope".to_vec());
        let thumbs = thumbnails(
            &["wide", "tiny", "broken", "absent"],
            &source,
            160,
            DEFAULT_MAX_IMAGE_PIXELS,
        );
        assert_eq!(thumbs.urls.len(), 2);
        assert_eq!(thumbs.errors.len(), 1, "{:?}", thumbs.errors);
        assert!(thumbs.errors.contains_key("broken"));
        let decode = |id: &str| {
            let url = &thumbs.urls[id];
            let b64 = url.strip_prefix("data:image/jpeg;base64,").expect("prefix");
            image::load_from_memory(&STANDARD.decode(b64).expect("base64")).expect("jpeg")
        };
        let wide = decode("wide");
        assert_eq!((wide.width(), wide.height()), (160, 80));
        let tiny = decode("tiny");
        assert_eq!((tiny.width(), tiny.height()), (20, 10));
    }

    #[test]
    fn an_image_over_the_cap_is_an_error_not_a_thumbnail() {
        let err = thumbnail_data_url(&png(100, 100), 160, 9_999).expect_err("over the cap");
        assert!(err.contains("more than the limit of 9999"), "{err}");
        assert!(thumbnail_data_url(&png(100, 100), 160, 10_000).is_ok());
    }
}
