//! The processor on whatever users have: every format, odd colour types, EXIF rotation, extreme
//! sizes and broken files. Each input either processes or returns a typed error; none panics.

use std::io::Cursor;

use crate::support::shared_path;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use proptest::prelude::*;
use vlmpipe::model::processor::{
    ImageError, ImageLayout, ImageProcessor, ProcessorConfig, decode_image,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn encode(img: &DynamicImage, format: ImageFormat) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn processor() -> Result<ImageProcessor, Box<dyn std::error::Error>> {
    Ok(ImageProcessor::new(ProcessorConfig::default())?)
}

/// Decodes and processes; checks the invariants every processed image must hold.
fn decode_and_process(bytes: &[u8]) -> Result<(u32, u32), Box<dyn std::error::Error>> {
    let img = decode_image(bytes)?;
    let out = processor()?.process(&img)?;
    let views = out.num_views();
    assert_eq!(
        out.pixel_values.len(),
        views * out.max_num_patches * out.patch_dim
    );
    assert_eq!(out.pixel_attention_mask.len(), views * out.max_num_patches);
    for (v, &(r, c)) in out.spatial_shapes.iter().enumerate() {
        assert!(r * c <= out.max_num_patches && r > 0 && c > 0);
        let real: usize = out.pixel_attention_mask
            [v * out.max_num_patches..(v + 1) * out.max_num_patches]
            .iter()
            .map(|&m| usize::from(m))
            .sum();
        assert_eq!(real, r * c);
    }
    assert!(
        out.pixel_values
            .iter()
            .all(|v| v.is_finite() && (-1.0..=1.0).contains(v))
    );
    Ok((img.width(), img.height()))
}

#[test]
fn every_format_and_colour_type_decodes() -> TestResult {
    let rgb = DynamicImage::ImageRgb8(gradient(40, 30));
    let cases: Vec<(DynamicImage, ImageFormat)> = vec![
        (rgb.clone(), ImageFormat::Png),
        (rgb.clone(), ImageFormat::Jpeg),
        (rgb.clone(), ImageFormat::WebP),
        (rgb.clone(), ImageFormat::Gif),
        (rgb.clone(), ImageFormat::Bmp),
        (rgb.clone(), ImageFormat::Tiff),
        (DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Png),
        (DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Jpeg),
        (
            DynamicImage::ImageLumaA8(rgb.to_luma_alpha8()),
            ImageFormat::Png,
        ),
        (DynamicImage::ImageRgba8(rgb.to_rgba8()), ImageFormat::Png),
        (DynamicImage::ImageRgba8(rgb.to_rgba8()), ImageFormat::WebP),
        (DynamicImage::ImageRgb16(rgb.to_rgb16()), ImageFormat::Png),
        (DynamicImage::ImageLuma16(rgb.to_luma16()), ImageFormat::Png),
        (
            DynamicImage::ImageRgba16(rgb.to_rgba16()),
            ImageFormat::Tiff,
        ),
    ];
    for (img, format) in cases {
        let bytes = encode(&img, format)?;
        let size =
            decode_and_process(&bytes).map_err(|e| format!("{format:?} {:?}: {e}", img.color()))?;
        assert_eq!(size, (40, 30), "{format:?} {:?}", img.color());
    }
    Ok(())
}

#[test]
fn sixteen_bit_png_matches_its_eight_bit_high_bytes() -> TestResult {
    let rgb = gradient(33, 17);
    let wide = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(33, 17, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        // Low bytes that would round up under scaling must not change the result.
        Rgb([
            u16::from(p[0]) << 8 | 0xff,
            u16::from(p[1]) << 8 | 0x80,
            u16::from(p[2]) << 8,
        ])
    }));
    let decoded = decode_image(&encode(&wide, ImageFormat::Png)?)?;
    assert_eq!(decoded, rgb);
    Ok(())
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`, spliced in after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // big-endian TIFF, first IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() -> TestResult {
    // Left half black, right half white, 64x32.
    let img = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let jpeg = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)?;
    // 6 = rotate 90 degrees clockwise to display: the image becomes 32 wide, 64 high, and the
    // left (black) half ends up on top.
    let rotated = decode_image(&with_exif_orientation(&jpeg, 6))?;
    assert_eq!(rotated.dimensions(), (32, 64));
    assert!(rotated.get_pixel(16, 8).0[0] < 30);
    assert!(rotated.get_pixel(16, 56).0[0] > 225);
    // 1 = as stored.
    assert_eq!(
        decode_image(&with_exif_orientation(&jpeg, 1))?.dimensions(),
        (64, 32)
    );
    decode_and_process(&with_exif_orientation(&jpeg, 8))?;
    Ok(())
}

/// A minimal baseline CMYK JPEG (Adobe APP14, no colour transform): one 8x8 block per
/// component, every coefficient zero, so each channel decodes to the mid-level 128.
fn tiny_cmyk_jpeg() -> Vec<u8> {
    let mut j = vec![0xff, 0xd8];
    let mut segment = |marker: u8, body: &[u8]| {
        j.extend_from_slice(&[0xff, marker]);
        j.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        j.extend_from_slice(body);
    };
    // APP14 Adobe: version 100, flags 0, transform 0 (CMYK as stored).
    segment(0xee, b"Adobe\x00\x64\x00\x00\x00\x00\x00");
    // One quantisation table of ones.
    let mut dqt = vec![0u8];
    dqt.extend_from_slice(&[1u8; 64]);
    segment(0xdb, &dqt);
    // SOF0: 8-bit, 8x8, four components, no subsampling, table 0.
    segment(
        0xc0,
        &[
            8, 0, 8, 0, 8, 4, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0, 4, 0x11, 0,
        ],
    );
    // Huffman tables with a single one-bit code each: DC category 0, AC end-of-block.
    let mut dht = Vec::new();
    for class in [0x00u8, 0x10] {
        dht.push(class);
        let mut counts = [0u8; 16];
        counts[0] = 1;
        dht.extend_from_slice(&counts);
        dht.push(0);
    }
    segment(0xc4, &dht);
    segment(0xda, &[4, 1, 0x00, 2, 0x00, 3, 0x00, 4, 0x00, 0, 63, 0]);
    // Four components x (DC "0" + EOB "0") = eight zero bits.
    j.extend_from_slice(&[0x00, 0xff, 0xd9]);
    j
}

#[test]
fn cmyk_jpeg_decodes() -> TestResult {
    let img = decode_image(&tiny_cmyk_jpeg())?;
    assert_eq!(img.dimensions(), (8, 8));
    let first = *img.get_pixel(0, 0);
    assert!(
        img.pixels().all(|p| *p == first),
        "a flat CMYK block decodes flat"
    );
    decode_and_process(&tiny_cmyk_jpeg())?;
    Ok(())
}

#[test]
fn extreme_sizes_process() -> TestResult {
    let p = processor()?;
    let one = p.process(&gradient(1, 1))?;
    assert_eq!(
        one.layout,
        ImageLayout::Single {
            height: 256,
            width: 256
        }
    );
    let strip = p.process(&gradient(5000, 20))?;
    assert_eq!(
        strip.layout,
        ImageLayout::Single {
            height: 32,
            width: 4992
        }
    );
    assert_eq!(strip.num_image_tokens(), 156);
    let tall = p.process(&gradient(3, 4000))?;
    assert!(tall.spatial_shapes[0].0 * tall.spatial_shapes[0].1 <= tall.max_num_patches);
    let huge_thin = p.process(&gradient(20_000, 8))?;
    assert!(huge_thin.num_image_tokens() <= 256);
    Ok(())
}

#[test]
fn broken_files_are_typed_errors() -> TestResult {
    let jpeg = encode(
        &DynamicImage::ImageRgb8(gradient(64, 48)),
        ImageFormat::Jpeg,
    )?;
    assert!(matches!(decode_image(&[]), Err(ImageError::Empty)));
    assert!(decode_image(&jpeg[..3]).is_err());
    // A truncated JPEG is an error, as in PIL, even when only its end marker is missing; the
    // whole file, and one with bytes after its end marker, decode.
    for cut in [jpeg.len() / 4, jpeg.len() / 2] {
        assert!(decode_image(&jpeg[..cut]).is_err(), "cut at {cut}");
    }
    for cut in [jpeg.len() - 2, jpeg.len() - 1] {
        assert!(
            matches!(decode_image(&jpeg[..cut]), Err(ImageError::Truncated)),
            "cut at {cut} of {}",
            jpeg.len()
        );
    }
    decode_image(&jpeg)?;
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"trailing bytes some cameras append");
    decode_image(&trailing)?;
    // Random bytes, with and without a valid magic number in front.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = vec![0u8; 4096];
    for b in noise.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    assert!(matches!(
        decode_image(&noise),
        Err(ImageError::UnknownFormat)
    ));
    for magic in [
        &b"\xff\xd8\xff"[..],
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"BM",
        b"RIFF\0\0\0\0WEBP",
        b"II*\0",
    ] {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&noise);
        let _ = decode_image(&bytes);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_image(&bytes);
    }

    #[test]
    fn arbitrary_sizes_fit_the_patch_budget(w in 1u32..1400, h in 1u32..1400) {
        let p = ImageProcessor::new(ProcessorConfig::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let layout = p.layout(h as usize, w as usize);
        for (vh, vw) in layout.view_sizes() {
            prop_assert!(vh % 16 == 0 && vw % 16 == 0);
            prop_assert!((vh / 16) * (vw / 16) <= p.config().max_num_patches());
        }
    }
}

#[test]
fn all_cats_vs_dogs_photos_process() -> TestResult {
    let (Some(dir), Some(model)) = (
        shared_path("data/cats_vs_dogs"),
        shared_path("models/LFM2-VL-450M"),
    ) else {
        return Ok(());
    };
    let p = ImageProcessor::new(ProcessorConfig::from_model_dir(&model)?)?;
    let mut count = 0;
    for entry in walkdir::WalkDir::new(&dir) {
        let entry = entry?;
        let path = entry.path();
        let is_jpeg = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
        if !is_jpeg {
            continue;
        }
        let img =
            decode_image(&std::fs::read(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = p.process(&img)?;
        assert!(out.num_image_tokens() >= 64, "{}", path.display());
        count += 1;
    }
    assert!(count >= 300, "expected 300 photos, found {count}");
    Ok(())
}

/// Processor speed (prints; run with `--ignored --nocapture`, ideally with `--release`).
#[test]
#[ignore = "timing, not a check"]
fn timing_single_and_tiled() -> TestResult {
    let p = processor()?;
    for (w, h) in [(512u32, 512u32), (512, 384), (640, 480), (1024, 768)] {
        let img = gradient(w, h);
        p.process(&img)?;
        let runs = 20;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            std::hint::black_box(p.process(&img)?);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
        eprintln!("process {w}x{h}: {ms:.2} ms");
    }
    Ok(())
}
