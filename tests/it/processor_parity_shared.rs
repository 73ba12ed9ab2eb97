//! The processor against what transformers 5.x computed (`../shared/reference/`), and against
//! the real LFM2-VL-450M tokenizer, template and configs (`../shared/models/LFM2-VL-450M/`).
//! Every test skips with a message when `../shared` is absent.

use std::path::Path;

use crate::support::shared_path;
use safetensors::SafeTensors;
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::processor::{ImageLayout, Processor, decode_image};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn i64s(st: &SafeTensors, name: &str) -> Result<Vec<i64>, Box<dyn std::error::Error>> {
    let t = st.tensor(name)?;
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    Ok(t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect())
}

fn f32s(st: &SafeTensors, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let t = st.tensor(name)?;
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Compares our processor's output for `synthetic_<size>.png` with `ref_tiny_<size>.safetensors`.
fn check_reference(size: &str) -> TestResult {
    let (Some(model_dir), Some(png), Some(reference)) = (
        shared_path("reference/tiny-lfm2vl"),
        shared_path(&format!("reference/synthetic_{size}.png")),
        shared_path(&format!("reference/ref_tiny_{size}.safetensors")),
    ) else {
        return Ok(());
    };
    let bytes = std::fs::read(&reference)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let harness: serde_json::Value = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("harness"))
            .ok_or("reference has no `harness` metadata")?,
    )?;

    let processor = Processor::from_model_dir(&model_dir)?;
    let image = decode_image(&std::fs::read(&png)?)?;
    let conversation = Conversation::new().user_image("What is in this image?");
    let inputs = processor.prepare(&conversation, std::slice::from_ref(&image), true)?;

    // Text: the template's rendering and the expansion, character for character.
    let rendered = processor.template().render(&conversation, true)?;
    assert_eq!(Some(rendered.as_str()), harness["prompt_text"].as_str());
    assert_eq!(
        Some(inputs.text.as_str()),
        harness["expanded_text"].as_str()
    );

    // Token ids and mask.
    let ids: Vec<i64> = inputs.input_ids.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(ids, i64s(&st, "input_ids")?);
    let mask: Vec<i64> = inputs
        .attention_mask()
        .iter()
        .map(|&m| i64::from(m))
        .collect();
    assert_eq!(mask, i64s(&st, "attention_mask")?);
    assert_eq!(
        Some(inputs.num_image_tokens() as u64),
        harness["n_image_tokens"].as_u64()
    );

    // Vision inputs.
    let img = &inputs.images[0];
    assert_eq!(Some(img.num_views() as u64), harness["n_tiles"].as_u64());
    let shapes: Vec<i64> = img
        .spatial_shapes
        .iter()
        .flat_map(|&(r, c)| [r as i64, c as i64])
        .collect();
    assert_eq!(shapes, i64s(&st, "spatial_shapes")?);
    let pmask: Vec<i64> = img
        .pixel_attention_mask
        .iter()
        .map(|&m| i64::from(m))
        .collect();
    assert_eq!(pmask, i64s(&st, "pixel_attention_mask")?);
    let expected = f32s(&st, "pixel_values")?;
    assert_eq!(img.pixel_values.len(), expected.len());
    let max_diff = img
        .pixel_values
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Resized views too: torchvision-identical resizing makes every byte equal.
    assert!(max_diff <= 1e-6, "pixel_values differ by up to {max_diff}");
    Ok(())
}

#[test]
fn reference_512x512_single_view() -> TestResult {
    check_reference("512x512")
}

#[test]
fn reference_1024x768_tiled_with_thumbnail() -> TestResult {
    check_reference("1024x768")
}

fn real_processor() -> Result<Option<Processor>, Box<dyn std::error::Error>> {
    let Some(dir) = shared_path("models/LFM2-VL-450M") else {
        return Ok(None);
    };
    Ok(Some(Processor::from_model_dir(Path::new(&dir))?))
}

#[test]
fn real_lfm2_vl_450m_tutorial_prompt() -> TestResult {
    let Some(processor) = real_processor()? else {
        return Ok(());
    };
    let cfg = processor.image_processor().config();
    // The Hub's 4.55-era files: thumbnail off, splitting on.
    assert!(!cfg.use_thumbnail && cfg.do_image_splitting);

    let tok = processor.tokenizer();
    let id = |s: &str| tok.token_to_id(s).ok_or(format!("{s} missing"));
    let (bos, im_start, im_end, image, img_start, img_end) = (
        id("<|startoftext|>")?,
        id("<|im_start|>")?,
        id("<|im_end|>")?,
        id("<image>")?,
        id("<|image_start|>")?,
        id("<|image_end|>")?,
    );
    assert_eq!((bos, im_end, image), (1, 7, 396));
    assert_eq!(processor.image_token_id(), 396);

    let conversation = Conversation::image_question(
        Some("You are a veterinarian. Answer with the animal's species."),
        "Is this a cat or a dog?",
    );
    // 512x384 photo: single view, no resize, 16 x 12 = 192 tokens, no markers.
    let photo = image::RgbImage::from_fn(512, 384, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let inputs = processor.prepare(&conversation, &[photo], true)?;
    let ids = &inputs.input_ids;
    assert_eq!(ids[0], bos, "BOS comes from the template, once");
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1);
    assert_eq!(ids[1], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == image).count(), 192);
    let start = ids
        .iter()
        .position(|&i| i == img_start)
        .ok_or("no image start")?;
    let end = ids
        .iter()
        .position(|&i| i == img_end)
        .ok_or("no image end")?;
    assert_eq!(
        end - start - 1,
        192,
        "only image tokens between start and end"
    );
    assert!(inputs.text.starts_with(
        "<|startoftext|><|im_start|>system\nYou are a veterinarian. Answer with the animal's species.<|im_end|>\n<|im_start|>user\n<|image_start|><image>"
    ));
    assert!(
        inputs
            .text
            .ends_with("<|image_end|>Is this a cat or a dog?<|im_end|>\n<|im_start|>assistant\n")
    );
    // The last prompt tokens: "<|im_start|>" "assistant" "\n".
    assert_eq!(ids[ids.len() - 3], im_start);

    // 1600x1000 photo: tiled 3x2 (1.6 -> 1.5), no thumbnail on this checkpoint: 6 x 256 tokens.
    let big = image::RgbImage::from_pixel(1600, 1000, image::Rgb([90, 120, 150]));
    let tiled = processor.prepare(&conversation, &[big], true)?;
    assert_eq!(
        tiled.images[0].layout,
        ImageLayout::Tiled {
            rows: 2,
            cols: 3,
            tile: 512,
            thumbnail: None
        }
    );
    assert_eq!(tiled.num_image_tokens(), 6 * 256);
    let ids = &tiled.input_ids;
    assert_eq!(ids.iter().filter(|&&i| i == image).count(), 1536);
    assert!(!ids.contains(&id("<|img_thumbnail|>")?));
    // Markers in rows-then-cols order, each followed by its 256 tokens.
    let mut pos = ids
        .iter()
        .position(|&i| i == img_start)
        .ok_or("no image start")?
        + 1;
    for r in 1..=2 {
        for c in 1..=3 {
            assert_eq!(ids[pos], id(&format!("<|img_row_{r}_col_{c}|>"))?);
            assert!(ids[pos + 1..pos + 257].iter().all(|&i| i == image));
            pos += 257;
        }
    }
    assert_eq!(ids[pos], img_end);
    Ok(())
}

#[test]
fn training_form_marks_the_answer() -> TestResult {
    let Some(processor) = real_processor()? else {
        return Ok(());
    };
    let conversation = Conversation::image_question(None, "Cat or dog?");
    let photo = image::RgbImage::from_pixel(256, 256, image::Rgb([1, 2, 3]));
    let prompt = processor.prepare(&conversation, std::slice::from_ref(&photo), true)?;
    let train = processor.prepare_training(&conversation, &[photo], "dog")?;
    let ids = &train.inputs.input_ids;
    assert_eq!(train.answer_start, prompt.input_ids.len());
    assert_eq!(&ids[..train.answer_start], prompt.input_ids.as_slice());
    let answer = processor
        .tokenizer()
        .decode(&ids[train.answer_start..], false)
        .map_err(|e| e.to_string())?;
    assert_eq!(answer, "dog<|im_end|>\n");
    Ok(())
}
