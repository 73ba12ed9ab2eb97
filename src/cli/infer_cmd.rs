//! `vlmpipe infer`: answer one question about one image, the way the LFM2-VL tutorial does.
//!
//! Resolve the model reference, decode the image, build the conversation (optional system turn,
//! then a user turn with the image first and the text second), render it with the model's chat
//! template and the generation prompt, run vision + projector + decoder, and generate. Decoding
//! settings follow flag > `generation_config.json` > greedy. A bad image or model is an error
//! (exit 1) naming the file.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::cli::Outcome;
use crate::cli::args::InferArgs;
use crate::model::chat::Conversation;
use crate::model::checkpoint::{Checkpoint, LoadOptions};
use crate::model::generate::{self, FinishReason, GenerateConfig, Prompt, Sampling};
use crate::model::generation_config::GenerationConfig;
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::processor::{Processor, PromptInputs, decode_image};
use crate::model::resolve::resolve_model_dir;

/// Generated tokens when neither the flag nor `generation_config.json` says.
const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct InferReport {
    text: String,
    /// Generated ids only (the EOS id included when it ended the answer).
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    image_tokens: usize,
    finish_reason: &'static str,
    timings: Timings,
}

/// Milliseconds per step.
#[derive(Debug, Serialize)]
struct Timings {
    load_ms: f64,
    preprocess_ms: f64,
    vision_ms: f64,
    prefill_ms: f64,
    decode_ms_per_token: Option<f64>,
    total_ms: f64,
}

/// A model directory loaded for inference: processor, network and decoding defaults.
pub(crate) struct LoadedModel {
    pub processor: Processor,
    pub model: Lfm2VlModel,
    pub generation: GenerationConfig,
}

impl LoadedModel {
    /// Loads processor files, generation defaults and weights (`dtype`, CPU) from `dir`.
    pub fn load(dir: &Path, dtype: DType) -> anyhow::Result<Self> {
        let processor = Processor::from_model_dir(dir)
            .with_context(|| format!("cannot load the processor files of `{}`", dir.display()))?;
        let generation = GenerationConfig::from_model_dir(dir)?;
        let opts = LoadOptions {
            dtype,
            device: Device::Cpu,
        };
        let model = Checkpoint::open(dir)
            .and_then(|ckpt| ckpt.load(&opts))
            .with_context(|| format!("cannot load the model in `{}`", dir.display()))?;
        Ok(Self {
            processor,
            model,
            generation,
        })
    }

    /// Reads and decodes `path`, then renders and tokenises the image question.
    pub fn prepare(
        &self,
        path: &Path,
        system: Option<&str>,
        question: &str,
    ) -> anyhow::Result<PromptInputs> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read image `{}`", path.display()))?;
        let image =
            decode_image(&bytes).with_context(|| format!("bad image `{}`", path.display()))?;
        let conversation = Conversation::image_question(system, question);
        self.processor
            .prepare(&conversation, &[image], true)
            .with_context(|| format!("cannot prepare the prompt for `{}`", path.display()))
    }

    /// Image features `[image tokens, D]` of every image in `inputs`, or `None` without images.
    pub fn image_features(&self, inputs: &PromptInputs) -> anyhow::Result<Option<Tensor>> {
        let mut features = Vec::with_capacity(inputs.images.len());
        for image in &inputs.images {
            let t = image.to_tensors(self.model.device())?;
            let f = self.model.image_features(
                &t.pixel_values,
                &t.pixel_attention_mask,
                &image.spatial_shapes,
            )?;
            features.push(f);
        }
        Ok(match features.len() {
            0 => None,
            1 => features.pop(),
            _ => Some(Tensor::cat(&features, 0)?),
        })
    }

    /// EOS ids: `generation_config.json`, else the model config.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.generation
            .eos_token_ids(&self.model.config().text.eos_token_ids)
    }

    /// The pad id for batches: `generation_config.json`, else the model config, else 0.
    pub fn pad_token_id(&self) -> u32 {
        self.generation
            .pad_token_id
            .or(self.model.config().text.pad_token_id)
            .unwrap_or(0)
    }
}

/// Runs `vlmpipe infer`.
pub(crate) fn run(args: &InferArgs) -> anyhow::Result<Outcome> {
    let total = Instant::now();
    let dir = resolve_model_dir(&args.model)?;
    let t = Instant::now();
    let loaded = LoadedModel::load(&dir, args.dtype.to_candle())?;
    let load = t.elapsed();

    let t = Instant::now();
    let inputs = loaded.prepare(&args.image, args.system.as_deref(), &args.prompt)?;
    let preprocess = t.elapsed();

    let t = Instant::now();
    let features = loaded.image_features(&inputs)?;
    let vision = t.elapsed();

    let cfg = generate_config(args, &loaded);
    let prompt = Prompt {
        input_ids: &inputs.input_ids,
        image_features: features.as_ref(),
    };
    let out =
        generate::generate(&loaded.model, &[prompt], &cfg, None).context("generation failed")?;
    let Some(sequence) = out.sequences.first() else {
        anyhow::bail!("generation returned no sequence");
    };

    if let Some(path) = &args.dump_logits {
        dump_logits(&out.prompt_logits, path)?;
    }

    let text = loaded
        .processor
        .tokenizer()
        .decode(&sequence.tokens, true)
        .map_err(|e| anyhow::anyhow!("cannot decode the generated ids: {e}"))?;
    if args.json {
        let report = InferReport {
            text,
            token_ids: sequence.tokens.clone(),
            prompt_tokens: inputs.input_ids.len(),
            image_tokens: inputs.num_image_tokens(),
            finish_reason: match sequence.finish {
                FinishReason::Eos => "eos",
                FinishReason::Length => "length",
            },
            timings: Timings {
                load_ms: ms(load),
                preprocess_ms: ms(preprocess),
                vision_ms: ms(vision),
                prefill_ms: ms(out.prefill),
                decode_ms_per_token: mean_ms(&out.step_times),
                total_ms: ms(total.elapsed()),
            },
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", text.trim());
    }
    Ok(Outcome::Success)
}

/// Flag > `generation_config.json` > greedy with [`DEFAULT_MAX_NEW_TOKENS`].
fn generate_config(args: &InferArgs, loaded: &LoadedModel) -> GenerateConfig {
    let file = &loaded.generation;
    // transformers samples only with `do_sample: true`; a bare temperature in the file is inert.
    let file_temperature = match file.do_sample {
        Some(true) => file.temperature.unwrap_or(1.0),
        _ => 0.0,
    };
    GenerateConfig {
        max_new_tokens: args
            .max_new_tokens
            .or(file.max_new_tokens)
            .unwrap_or(DEFAULT_MAX_NEW_TOKENS),
        eos_token_ids: loaded.eos_token_ids(),
        pad_token_id: loaded.pad_token_id(),
        sampling: Sampling {
            temperature: args.temperature.unwrap_or(file_temperature),
            top_p: args.top_p.or(file.top_p),
            min_p: args.min_p.or(file.min_p),
            repetition_penalty: args.repetition_penalty.or(file.repetition_penalty),
            seed: args.seed,
        },
    }
}

/// Writes `[1, vocab]` (or `[vocab]`) logits as safetensors tensor `logits`, f32 `[vocab]`.
fn dump_logits(logits: &Tensor, path: &Path) -> anyhow::Result<()> {
    let logits = logits.to_dtype(DType::F32)?.flatten_all()?;
    let tensors = HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write logits to `{}`", path.display()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean_ms(steps: &[Duration]) -> Option<f64> {
    (!steps.is_empty()).then(|| steps.iter().map(|d| ms(*d)).sum::<f64>() / steps.len() as f64)
}
