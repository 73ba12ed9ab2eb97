//! Processor parity with transformers 5.24's `Lfm2VlProcessor` over the committed fixtures
//! (`tests/fixtures/reference/`, described in `tests/reference/README.md`).
//!
//! - `processor/<image>.json`: 16 images at the real LFM2-VL-450M settings, thumbnail on and off:
//!   layout, spatial shapes, masks, the resized u8 views byte for byte, `pixel_values`
//!   bit for bit (rebuilt from the views) and their per-view sums. With `../shared` also the real
//!   tokenizer's `input_ids` and expanded text of the bare `<image>` prompt.
//! - `model/<case>.safetensors`: the 15 model cases' inputs through our [`Processor`] on the
//!   fixture checkpoints: rendered and expanded text, `input_ids`, image token counts, tile
//!   markers, views, `pixel_values`, `pixel_attention_mask` and `spatial_shapes`.
//! - `jpeg/<case>.jpg`: JPEGs of every layout PIL reads (chroma 4:2:0, 4:2:2, 4:4:4,
//!   progressive, restart intervals, grayscale, Adobe CMYK) must decode to PIL's pixels
//!   (`<case>.png`, from `Image.open(..).convert("RGB")`) exactly.
//!
//! One test per fixture; each records every mismatch of its case before failing.

use crate::reference_support;

use std::path::Path;

use crate::support::shared_path;
use candle_core::{Device, Tensor};
use image::RgbImage;
use reference_support::{
    Checks, ModelFixture, TestResult, VisionInputs, checkpoint_dir, compare_views, fixtures,
    json_strings, json_usize, pixel_values_from_views, read,
};
use serde_json::Value;
use tokenizers::Tokenizer;
use vlmpipe::model::chat::{ChatTemplate, Conversation};
use vlmpipe::model::processor::{
    ImageLayout, ImageProcessor, ImageTokenStrings, ProcessedImage, Processor, ProcessorConfig,
    decode_image, smart_resize,
};

/// The fixtures' input image (path relative to the fixtures folder), decoded like a user's file.
fn load_image(rel: &str) -> TestResult<RgbImage> {
    Ok(decode_image(&read(&fixtures().join(rel))?)?)
}

/// Grid (rows, cols) as transformers reports it: 1x1 for a single view.
fn grid(layout: &ImageLayout) -> (usize, usize) {
    match *layout {
        ImageLayout::Single { .. } => (1, 1),
        ImageLayout::Tiled { rows, cols, .. } => (rows, cols),
    }
}

/// The smart-resized size transformers records: the single view, or the thumbnail's size.
fn resized_size(cfg: &ProcessorConfig, layout: &ImageLayout, image: &RgbImage) -> (usize, usize) {
    match *layout {
        ImageLayout::Single { height, width } => (height, width),
        ImageLayout::Tiled {
            thumbnail: Some(size),
            ..
        } => size,
        ImageLayout::Tiled {
            thumbnail: None, ..
        } => smart_resize(cfg, image.height() as usize, image.width() as usize),
    }
}

fn pairs(v: &Value) -> Vec<(usize, usize)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((json_usize(&p[0])?, json_usize(&p[1])?)))
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(json_usize)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect()
}

/// Checks our processed image against transformers' padded inputs, rebuilt from its views.
fn compare_pixel_inputs(
    checks: &mut Checks,
    what: &str,
    ours: &ProcessedImage,
    reference_views: &[RgbImage],
    patch: usize,
) -> TestResult<()> {
    let VisionInputs {
        pixel_values: values,
        pixel_attention_mask: mask,
        spatial_shapes: shapes,
    } = pixel_values_from_views(reference_views, patch, ours.max_num_patches)?;
    checks.eq(
        &format!("{what}: spatial_shapes"),
        &ours.spatial_shapes,
        &shapes,
    );
    let our_mask: Vec<u8> = ours.pixel_attention_mask.clone();
    checks.eq(
        &format!("{what}: pixel_attention_mask"),
        &our_mask,
        &mask.flatten_all()?.to_vec1::<u8>()?,
    );
    if ours.pixel_values.len() == values.elem_count() {
        let our_values = Tensor::from_slice(&ours.pixel_values, values.dims(), &Device::Cpu)?;
        // The README's formula reproduces transformers bit for bit, so any difference is ours.
        checks.close(&format!("{what}: pixel_values"), &our_values, &values, 0.0);
    } else {
        checks.fail(format!(
            "{what}: pixel_values has {} values, reference {}",
            ours.pixel_values.len(),
            values.elem_count()
        ));
    }
    Ok(())
}

/// The real LFM2-VL-450M tokenizer, template and marker strings, when `../shared` has them.
struct RealText {
    dir: std::path::PathBuf,
    tokenizer: Tokenizer,
    strings: ImageTokenStrings,
}

fn real_text() -> TestResult<Option<RealText>> {
    let Some(dir) = shared_path("models/LFM2-VL-450M") else {
        return Ok(None);
    };
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| format!("real tokenizer: {e}"))?;
    Ok(Some(RealText {
        tokenizer,
        strings: ImageTokenStrings::from_model_dir(&dir)?,
        dir,
    }))
}

/// One `processor/<image>.json`, thumbnail on and off.
fn check_processor_reference(name: &str) {
    let mut checks = Checks::new(format!("processor/{name}"));
    if let Err(e) = processor_reference(name, &mut checks) {
        checks.fail(format!("could not run: {e}"));
    }
    checks.finish();
}

fn processor_reference(name: &str, checks: &mut Checks) -> TestResult<()> {
    let path = fixtures().join(format!("processor/{name}.json"));
    let record: Value = serde_json::from_slice(&read(&path)?)?;
    let image_rel = record["image"].as_str().ok_or("no `image`")?;
    let image = load_image(image_rel)?;
    checks.eq(
        "image size",
        &vec![image.width() as usize, image.height() as usize],
        &usizes(&record["image_size"]),
    );
    let settings = record["settings"].as_object().ok_or("no `settings`")?;
    let real = real_text()?;
    for (key, thumbnail) in [("thumbnail_on", true), ("thumbnail_off", false)] {
        let expected = &record[key];
        let mut cfg = ProcessorConfig::default();
        cfg.apply_json(settings, &path)?;
        cfg.use_thumbnail = thumbnail;
        checks.eq(
            &format!("{key}: max_num_patches"),
            &Some(cfg.max_num_patches()),
            &json_usize(&settings["max_num_patches"]),
        );
        let processor = ImageProcessor::new(cfg.clone())?;
        let Some(ours) = checks.step(&format!("{key}: process"), processor.process(&image)) else {
            continue;
        };
        let Some(our_views) = checks.step(&format!("{key}: views"), processor.views(&image)) else {
            continue;
        };

        // Layout and shapes.
        let (rows, cols) = grid(&ours.layout);
        checks.eq(
            &format!("{key}: grid rows x cols"),
            &(Some(rows), Some(cols)),
            &(
                json_usize(&expected["grid_rows"]),
                json_usize(&expected["grid_cols"]),
            ),
        );
        let (h, w) = resized_size(&cfg, &ours.layout, &image);
        checks.eq(
            &format!("{key}: resized_size_hw"),
            &vec![h, w],
            &usizes(&expected["resized_size_hw"]),
        );
        checks.eq(
            &format!("{key}: spatial_shapes"),
            &ours.spatial_shapes,
            &pairs(&expected["spatial_shapes"]),
        );
        let valid: Vec<usize> = ours
            .pixel_attention_mask
            .chunks(ours.max_num_patches)
            .map(|m| m.iter().map(|&b| usize::from(b)).sum())
            .collect();
        checks.eq(
            &format!("{key}: num_valid_patches"),
            &valid,
            &usizes(&expected["num_valid_patches"]),
        );
        checks.eq(
            &format!("{key}: pixel_values_shape"),
            &vec![ours.num_views(), ours.max_num_patches, ours.patch_dim],
            &usizes(&expected["pixel_values_shape"]),
        );
        checks.eq(
            &format!("{key}: num_image_tokens"),
            &Some(ours.num_image_tokens()),
            &json_usize(&expected["num_image_tokens"]),
        );

        // Pixels: the resized views byte for byte, then the normalised, patchified tensor.
        let reference_views: Vec<RgbImage> = json_strings(&expected["views"])?
            .iter()
            .map(|v| reference_support::read_view(v))
            .collect::<TestResult<_>>()?;
        compare_views(checks, key, &our_views, &reference_views);
        compare_pixel_inputs(checks, key, &ours, &reference_views, cfg.encoder_patch_size)?;
        // Per-view f64 sums cover the whole tensor, padding included.
        for (stat, abs) in [("pixel_values_sum", false), ("pixel_values_abs_sum", true)] {
            let sums: Vec<f64> = ours
                .pixel_values
                .chunks(ours.max_num_patches * ours.patch_dim)
                .map(|v| {
                    v.iter()
                        .map(|&x| f64::from(if abs { x.abs() } else { x }))
                        .sum()
                })
                .collect();
            let theirs: Vec<f64> = expected[stat]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            checks.eq(&format!("{key}: {stat} count"), &sums.len(), &theirs.len());
            for (v, (a, b)) in sums.iter().zip(&theirs).enumerate() {
                // Only summation order differs: relative 1e-9 of the view's magnitude.
                checks.check((a - b).abs() <= 1e-9 * b.abs().max(1.0), || {
                    format!("{key}: {stat}[{v}] = {a}, reference {b}")
                });
            }
        }

        // Token ids with the real tokenizer: the bare `<image>` prompt expanded.
        if let Some(real) = &real {
            let processor = Processor::new(
                cfg.clone(),
                real.tokenizer.clone(),
                ChatTemplate::from_model_dir(&real.dir)?,
                real.strings.clone(),
            )?;
            if let Some((text, input_ids)) = checks.step(
                &format!("{key}: expand and tokenize"),
                processor.expand_and_tokenize("<image>", std::slice::from_ref(&ours)),
            ) {
                checks.eq(
                    &format!("{key}: expanded_text"),
                    &Some(text.as_str()),
                    &expected["expanded_text"].as_str(),
                );
                checks.eq(
                    &format!("{key}: input_ids"),
                    &input_ids,
                    &ids(&expected["input_ids"]),
                );
            }
        }
    }
    Ok(())
}

/// One model case's inputs through our processor on the fixture checkpoint.
fn check_model_inputs(case: &str) {
    let mut checks = Checks::new(format!("model inputs/{case}"));
    if let Err(e) = model_inputs(case, &mut checks) {
        checks.fail(format!("could not run: {e}"));
    }
    checks.finish();
}

fn model_inputs(case: &str, checks: &mut Checks) -> TestResult<()> {
    let fx = ModelFixture::load(case)?;
    let Some(ckpt) = checkpoint_dir(fx.str("checkpoint")?)? else {
        return Ok(());
    };
    let processor = Processor::from_model_dir(&ckpt.path)?;
    let conversation =
        Conversation::image_question(fx.harness["system"].as_str(), fx.str("prompt")?);
    let image = load_image(fx.str("image")?)?;

    let rendered = processor.template().render(&conversation, true)?;
    checks.eq("rendered text", &rendered.as_str(), &fx.str("text")?);
    let Some(inputs) = checks.step(
        "prepare",
        processor.prepare(&conversation, std::slice::from_ref(&image), true),
    ) else {
        return Ok(());
    };
    checks.eq(
        "expanded text",
        &inputs.text.as_str(),
        &fx.str("expanded_text")?,
    );
    checks.eq("input_ids", &inputs.input_ids, &fx.u32s("input_ids")?);
    checks.eq(
        "attention_mask",
        &inputs.attention_mask(),
        &fx.u32s("attention_mask")?,
    );
    checks.eq(
        "num_tokens",
        &inputs.input_ids.len(),
        &fx.usize("num_tokens")?,
    );
    checks.eq(
        "num_image_tokens",
        &inputs.num_image_tokens(),
        &fx.usize("num_image_tokens")?,
    );
    let markers: Vec<String> = inputs
        .input_ids
        .iter()
        .filter_map(|&id| processor.tokenizer().id_to_token(id))
        .filter(|t| t.starts_with("<|img_"))
        .collect();
    checks.eq(
        "tile markers",
        &markers,
        &json_strings(&fx.harness["tile_markers"])?,
    );

    let [ours] = inputs.images.as_slice() else {
        checks.fail(format!(
            "{} processed images, expected 1",
            inputs.images.len()
        ));
        return Ok(());
    };
    let (rows, cols) = grid(&ours.layout);
    checks.eq(
        "grid rows x cols",
        &(rows, cols),
        &(fx.usize("grid_rows")?, fx.usize("grid_cols")?),
    );
    checks.eq("num_views", &ours.num_views(), &fx.usize("num_views")?);
    checks.eq(
        "spatial_shapes",
        &ours.spatial_shapes,
        &fx.spatial_shapes()?,
    );
    checks.eq(
        "pixel_attention_mask",
        &ours
            .pixel_attention_mask
            .iter()
            .map(|&m| u32::from(m))
            .collect::<Vec<_>>(),
        &fx.u32s("pixel_attention_mask")?,
    );
    let our_views = processor.image_processor().views(&image)?;
    let reference_views = fx.views()?;
    compare_views(checks, "views", &our_views, &reference_views);
    compare_pixel_inputs(
        checks,
        "inputs",
        ours,
        &reference_views,
        processor.image_processor().config().encoder_patch_size,
    )?;
    Ok(())
}

/// One `#[test]` per fixture, plus the list the completeness test compares with the folder.
macro_rules! reference_tests {
    ($list:ident, $check:ident: $($name:ident),* $(,)?) => {
        const $list: &[&str] = &[$(stringify!($name)),*];
        $( #[test] fn $name() { $check(stringify!($name)); } )*
    };
}

mod processor {
    use super::check_processor_reference;

    reference_tests!(IMAGES, check_processor_reference:
        pixel_1x1, thin_17x9, tiny_40x30, alpha_200x150, tallthin_100x333, gray_300x200,
        odd_333x251, strip_60x2000, strip_2000x60, square_400x400, photo_512x384, vga_640x480,
        wide_1500x500, square_1000x1000, tall_800x1400, hd_1920x1080,
    );

    pub(super) fn names() -> &'static [&'static str] {
        IMAGES
    }
}

mod model_inputs {
    use super::check_model_inputs;

    reference_tests!(CASES, check_model_inputs:
        thumb_tiny_40x30, thumb_photo_512x384, thumb_wide_1500x500, thumb_strip_2000x60,
        thumb_gray_300x200, thumb_system_333x251, nothumb_tall_800x1400, nothumb_photo_512x384,
        nothumb_tiny_40x30, nothumb_alpha_200x150, realtok_system_512x384, realtok_wide_1500x500,
        thumb_eos_512x384, variant_photo_512x384, variant_wide_1500x500,
    );

    pub(super) fn names() -> &'static [&'static str] {
        CASES
    }
}

/// Fixture stems with `extension` in `dir`, sorted.
fn stems(dir: &Path, extension: &str) -> TestResult<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some(extension)
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            out.push(stem.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn every_fixture_has_a_test() -> TestResult<()> {
    let sorted = |names: &[&str]| {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        stems(&fixtures().join("processor"), "json")?,
        sorted(processor::names())
    );
    assert_eq!(
        stems(&fixtures().join("model"), "safetensors")?,
        sorted(model_inputs::names())
    );
    Ok(())
}

/// The fixtures' settings are what our config reader gets from the real files (thumbnail off,
/// as the Hub's LFM2-VL-450M says), `processor_config.json` winning over the Siglip2
/// `preprocessor_config.json`.
#[test]
fn real_450m_files_give_the_fixture_settings() -> TestResult<()> {
    let Some(dir) = shared_path("models/LFM2-VL-450M") else {
        return Ok(());
    };
    let path = fixtures().join("processor/photo_512x384.json");
    let record: Value = serde_json::from_slice(&read(&path)?)?;
    let mut expected = ProcessorConfig::default();
    expected.apply_json(record["settings"].as_object().ok_or("no settings")?, &path)?;
    expected.use_thumbnail = false;
    let ours = ProcessorConfig::from_model_dir(&dir)?;
    assert_eq!(ours, expected);
    Ok(())
}

mod jpeg_pixels {
    use super::*;

    /// Our decode of `jpeg/<case>.jpg` against PIL's, sample for sample.
    fn check_jpeg(case: &str) {
        let mut checks = Checks::new(format!("jpeg {case}"));
        let result = (|| -> TestResult<()> {
            let ours = load_image(&format!("jpeg/{case}.jpg"))?;
            let pil = image::open(fixtures().join(format!("jpeg/{case}.png")))?.to_rgb8();
            checks.eq("size", &ours.dimensions(), &pil.dimensions());
            let (differing, worst) = ours
                .as_raw()
                .iter()
                .zip(pil.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .filter(|&d| d > 0)
                .fold((0usize, 0u8), |(n, worst), d| (n + 1, worst.max(d)));
            checks.check(differing == 0, || {
                format!("{differing} samples differ from PIL's (by up to {worst})")
            });
            Ok(())
        })();
        if let Err(e) = result {
            checks.fail(format!("could not run: {e}"));
        }
        checks.finish();
    }

    macro_rules! jpeg_cases {
        ($($name:ident),* $(,)?) => {
            $( #[test] fn $name() { check_jpeg(stringify!($name)); } )*
        };
    }

    jpeg_cases!(
        ycc420_67x45,
        ycc422_50x33,
        ycc444_41x29,
        progressive_73x52,
        restarts_64x40,
        gray_39x27,
        cmyk_35x21,
    );
}
