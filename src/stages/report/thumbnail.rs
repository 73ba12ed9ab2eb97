//! Small JPEG thumbnails as data URLs, made in parallel (decoding full-size photos dominates the
//! time of a 10,000-sample report).

use std::collections::HashMap;
use std::io::Cursor;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use image::codecs::jpeg::JpegEncoder;

use crate::stages::eval::ImageSource;

/// JPEG quality of thumbnails: photos stay recognisable at a few KB each.
const JPEG_QUALITY: u8 = 80;

/// A `data:image/jpeg;base64,…` URL of the image scaled to fit `max_px` × `max_px`, or `None` when
/// the bytes do not decode (the report then shows a placeholder rather than failing).
pub fn thumbnail_data_url(bytes: &[u8], max_px: u32) -> Option<String> {
    let decoded = image::load_from_memory(bytes).ok()?;
    let small = if decoded.width() > max_px || decoded.height() > max_px {
        decoded.thumbnail(max_px, max_px)
    } else {
        decoded
    };
    let rgb = small.to_rgb8();
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut Cursor::new(&mut jpeg), JPEG_QUALITY)
        .encode_image(&rgb)
        .ok()?;
    Some(format!("data:image/jpeg;base64,{}", STANDARD.encode(jpeg)))
}

/// Thumbnails of every id the source knows and can decode, keyed by id.
pub fn thumbnails(ids: &[&str], images: &dyn ImageSource, max_px: u32) -> HashMap<String, String> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunk = ids.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|id| {
                            let bytes = images.image_bytes(id)?;
                            Some((id.to_string(), thumbnail_data_url(&bytes, max_px)?))
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let thumbs = thumbnails(&["wide", "tiny", "broken", "absent"], &source, 160);
        assert_eq!(thumbs.len(), 2);
        let decode = |id: &str| {
            let url = &thumbs[id];
            let b64 = url.strip_prefix("data:image/jpeg;base64,").expect("prefix");
            image::load_from_memory(&STANDARD.decode(b64).expect("base64")).expect("jpeg")
        };
        let wide = decode("wide");
        assert_eq!((wide.width(), wide.height()), (160, 80));
        let tiny = decode("tiny");
        assert_eq!((tiny.width(), tiny.height()), (20, 10));
    }
}
