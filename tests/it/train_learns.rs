//! A random-init tiny LFM2-VL learns a synthetic colour-and-shape task (6 classes, chance 17%)
//! to at least 95% held-out accuracy, judged by greedy generation of the answer text.
//!
//! Random weights carry no knowledge, so the recipe trains the projector fully (it must learn to
//! map random vision features to something the decoder can read) plus LoRA r 8 on every decoder
//! projection, with a high learning rate (1e-2). The vision tower stays frozen, so its outputs are
//! computed once and cached. Measured: 240 steps in 45 s, accuracy 0.00 -> 1.00; the same recipe
//! with 144 steps reached 0.94, and with LoRA on the vision tower too 0.98 (but 2x slower).

use crate::train_support;

use candle_core::Device;
use vlmpipe::model::generate::{GenerateConfig, LogitsProcessor, Prompt, TokenSet, generate};
use vlmpipe::model::lfm2_vl::Lfm2VlModel;
use vlmpipe::model::processor::{Processor, stack_images};
use vlmpipe::train::LossOn;
use vlmpipe::train::lora::{LFM2_TARGETS, LoraConfig, TrainableSpec};
use vlmpipe::train::optim::{AdamWConfig, Decay};
use vlmpipe::train::trainer::{TrainConfig, train};

use train_support::{
    AnyResult, TestResult, conversation, dataset, examples, processor, tiny_model,
};

/// Allows text tokens and the end of turn only: an untrained model may otherwise emit `<image>`,
/// which has no features to splice in.
struct TextOnly(TokenSet);

impl LogitsProcessor for TextOnly {
    fn allowed(
        &mut self,
        _seq: usize,
    ) -> Result<Option<TokenSet>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Some(self.0.clone()))
    }

    fn advance(
        &mut self,
        _seq: usize,
        _token: u32,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// Greedy answers for held-out images, compared with their labels.
fn accuracy(
    model: &Lfm2VlModel,
    processor: &Processor,
    data: &[(image::RgbImage, String)],
) -> AnyResult<f64> {
    let eos = vec![
        processor
            .tokenizer()
            .token_to_id("<|im_end|>")
            .ok_or("no <|im_end|>")?,
    ];
    // The synthetic tokenizer's ids 0..511 are special tokens; 512.. are bytes and merges.
    let vocab = processor.tokenizer().get_vocab_size(true) as u32;
    let allowed: Vec<u32> = eos.iter().copied().chain(512..vocab).collect();
    let mut mask = TextOnly(TokenSet::from_ids(&allowed));
    let mut correct = 0;
    for (img, label) in data {
        let inputs = processor.prepare(&conversation(), std::slice::from_ref(img), true)?;
        let t = stack_images(&inputs.images, &Device::Cpu)?;
        let shapes: Vec<(usize, usize)> = inputs.images[0].spatial_shapes.clone();
        let features = model.image_features(&t.pixel_values, &t.pixel_attention_mask, &shapes)?;
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            ..GenerateConfig::greedy(eos.clone())
        };
        let out = generate(
            model,
            &[Prompt {
                input_ids: &inputs.input_ids,
                image_features: Some(&features),
                seed: None,
            }],
            &cfg,
            Some(&mut mask),
        )?;
        let tokens: Vec<u32> = out.sequences[0]
            .tokens
            .iter()
            .copied()
            .filter(|t| !eos.contains(t))
            .collect();
        let text = processor
            .tokenizer()
            .decode(&tokens, true)
            .map_err(|e| e.to_string())?;
        if text.trim() == label {
            correct += 1;
        }
    }
    Ok(correct as f64 / data.len() as f64)
}

#[test]
fn tiny_random_model_learns_shapes_and_colours() -> TestResult {
    let processor = processor()?;
    let train_data = dataset(192, 1);
    let held_out = dataset(48, 2);
    let train_examples = examples(&processor, &train_data)?;
    let eval_examples = examples(&processor, &held_out[..16])?;
    let mut model = tiny_model(3)?;

    let before = accuracy(&model, &processor, &held_out)?;
    let cfg = TrainConfig {
        trainable: TrainableSpec {
            lora: Some(LoraConfig {
                rank: 8,
                alpha: 16.0,
                dropout: 0.0,
                // The LFM2 names also match SigLIP2's q/k/v/out_proj; with fc1/fc2 every vision
                // projection is adapted too.
                targets: LFM2_TARGETS.iter().map(|s| s.to_string()).collect(),
                include_vision: false,
                seed: 5,
                ..LoraConfig::default()
            }),
            full: vec!["linear_1".into(), "linear_2".into()],
        },
        optimizer: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        batch_size: 8,
        grad_accum: 1,
        warmup_ratio: 0.05,
        decay: Decay::Linear,
        max_grad_norm: Some(1.0),
        epochs: 10,
        max_steps: None,
        seed: 11,
        loss_on: LossOn::Answer,
        eval_every: Some(16),
        checkpoint_every: None,
        checkpoint_interval: None,
        pad_id: 0,
        progress: false,
        feature_cache_bytes: 1 << 28,
    };
    let run = tempfile::tempdir()?;
    let started = std::time::Instant::now();
    let outcome = train(
        &mut model,
        &train_examples,
        &eval_examples,
        &cfg,
        Some(run.path()),
        None,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let after = accuracy(&model, &processor, &held_out)?;
    let first = outcome.metrics.first().map_or(f64::NAN, |r| r.train_loss);
    let last = outcome.metrics.last().map_or(f64::NAN, |r| r.train_loss);
    eprintln!(
        "trained {} parameters, {} steps in {secs:.1} s: loss {first:.3} -> {last:.3}, best eval \
         {:?}; held-out accuracy {before:.2} -> {after:.2}",
        outcome.num_parameters, outcome.total_steps, outcome.best_eval_loss
    );
    assert!(
        before <= 0.5,
        "an untrained model should be near chance, got {before}"
    );
    assert!(after >= 0.95, "held-out accuracy {after} < 0.95");
    assert!(run.path().join("metrics.parquet").is_file());
    assert!(
        run.path()
            .join("adapter/adapter_model.safetensors")
            .is_file()
    );
    assert!(run.path().join("best/adapter_config.json").is_file());
    Ok(())
}
