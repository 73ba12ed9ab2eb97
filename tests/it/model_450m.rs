//! Loading the real LFM2-VL-450M file set (`../shared/models/LFM2-VL-450M`: every file but the
//! weights) with random weights of the right shapes and names, written by the test in the Hub
//! layout (bf16, like the real `model.safetensors`), then classifying one real photo.
//!
//! The full-size test writes 0.9 GB to a temp dir and runs the 450M network (~30 s); the narrow
//! one keeps the real tokenizer, chat template, processor files, vocabulary and tensor names with
//! narrow layers (under a second), so a failure there points at names or files, not size.

use std::path::{Path, PathBuf};

use crate::support::shared_path;
use candle_core::DType;
use serde_json::Value;
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::{Checkpoint, LoadOptions};
use vlmpipe::model::generate::{GenerateConfig, Prompt, generate};
use vlmpipe::model::generation_config::GenerationConfig;
use vlmpipe::model::processor::{Processor, decode_image};
use vlmpipe::model::random_checkpoint::write_random_checkpoint;
use vlmpipe::model::resolve::ModelRef;

use crate::support::narrow_450m_config;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PHOTO: &str = "data/cats_vs_dogs/cat/0008.jpg";

/// Writes random weights for `source`'s config into `out`, resolves `out` as a model reference
/// and generates two greedy tokens for the cats-vs-dogs question about `photo`.
fn load_and_generate(
    source: &Path,
    out: &Path,
    photo: &Path,
    expected_params: usize,
) -> TestResult {
    let written = write_random_checkpoint(source, out, DType::BF16, 7)?;
    assert_eq!(written, expected_params, "parameters written");
    let dir = ModelRef::parse(&out.to_string_lossy())?.resolve(&vlmpipe::hub::Hub::from_env())?;

    let ckpt = Checkpoint::open(&dir)?;
    assert_eq!(ckpt.config.checkpoint_dtype, Some(DType::BF16));
    let model = ckpt.load(&LoadOptions::default())?;
    let processor = Processor::from_model_dir(&dir)?;
    let image = decode_image(&std::fs::read(photo)?)?;
    let conversation = Conversation::image_question(
        Some("You are a veterinarian specialized in analyzing pictures of cats and dogs"),
        "What animal in the following list is the one you see in the picture?\n- cat\n- dog",
    );
    let inputs = processor.prepare(&conversation, &[image], true)?;
    // 500x374 resizes to one 512x384 view: 32x24 patches, 16x12 = 192 image tokens.
    assert_eq!(inputs.images[0].spatial_shapes, vec![(24, 32)]);
    assert_eq!(inputs.num_image_tokens(), 192);
    assert_eq!(inputs.input_ids.first(), Some(&1), "BOS from the template");

    let tensors = inputs.images[0].to_tensors(model.device())?;
    let features = model.image_features(
        &tensors.pixel_values,
        &tensors.pixel_attention_mask,
        &inputs.images[0].spatial_shapes,
    )?;
    assert_eq!(features.dims(), [192, ckpt.config.text.hidden_size]);

    let generation = GenerationConfig::from_model_dir(&dir)?;
    let cfg = GenerateConfig {
        max_new_tokens: 2,
        eos_token_ids: Vec::new(),
        ..GenerateConfig::greedy(generation.eos_token_ids(&ckpt.config.text.eos_token_ids))
    };
    let prompt = Prompt {
        input_ids: &inputs.input_ids,
        image_features: Some(&features),
        seed: None,
    };
    let out = generate(&model, &[prompt], &cfg, None)?;
    let tokens = &out.sequences[0].tokens;
    assert_eq!(tokens.len(), 2);
    let vocab = ckpt.config.text.vocab_size as u32;
    assert!(tokens.iter().all(|&t| t < vocab), "{tokens:?}");
    let logits = out.prompt_logits.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(logits.len(), vocab as usize);
    assert!(logits.iter().all(|v| v.is_finite()), "finite logits");
    let spread = logits.iter().fold(f32::MIN, |m, &v| m.max(v))
        - logits.iter().fold(f32::MAX, |m, &v| m.min(v));
    assert!(
        spread > 1e-3,
        "random weights give varied logits, spread {spread}"
    );
    Ok(())
}

fn inputs() -> Option<(PathBuf, PathBuf)> {
    Some((shared_path("models/LFM2-VL-450M")?, shared_path(PHOTO)?))
}

#[test]
fn real_file_set_with_narrow_layers_loads_and_generates() -> TestResult {
    let Some((real, photo)) = inputs() else {
        return Ok(());
    };
    let source = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&real)? {
        let entry = entry?;
        std::fs::copy(entry.path(), source.path().join(entry.file_name()))?;
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(real.join("config.json"))?)?;
    std::fs::write(
        source.path().join("config.json"),
        serde_json::to_string_pretty(&narrow_450m_config(&config, 2))?,
    )?;
    let out = tempfile::tempdir()?;
    // Counted by hand: vision 132,672 + projector 31,392 + decoder 4,387,680 (the 65536x64
    // embedding is 4,194,304 of it; FFN width 2*192/3 rounds up to 256).
    load_and_generate(source.path(), out.path(), &photo, 4_551_744)
}

/// About 30 s in the dev profile (measured at load average 6-9 on 2 cores): writing 0.9 GB,
/// loading it as f32 and the vision tower at 768 patches dominate.
#[test]
fn real_450m_file_set_loads_and_generates() -> TestResult {
    let Some((real, photo)) = inputs() else {
        return Ok(());
    };
    let out = tempfile::tempdir()?;
    // transformers counts 450,822,656 parameters for LFM2-VL-450M (tests/reference/README.md).
    load_and_generate(&real, out.path(), &photo, 450_822_656)
}
