//! Training-step benchmark (`vlmpipe bench`): one LoRA step (vision forward, decoder forward and
//! backward, AdamW) on a random-weight model of any configuration, with peak memory; then the
//! fine-tune's steady step, the same without the vision tower (features cached per image).
//!
//! `tests/reference/bench_peft_train.py` times the same step in PyTorch + peft, with the same
//! shapes, so the two can be run back to back and compared as a ratio.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::model::config::Config;
use crate::model::kernels::backward::profile;
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::load::checkpoint::LoadOptions;
use crate::model::load::random_checkpoint::random_model;
use crate::rng::SeededRng;
use crate::train::batch::{Batch, Example, LossOn};
use crate::train::error::TrainError;
use crate::train::lora::{LoraConfig, Trainable, TrainableSpec};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::trainer::{backward, batch_loss_on};

/// The shape of the benchmarked step.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSpec {
    /// Patch grid of the single image view (32x32 is a 512x512 image: 256 image tokens).
    pub patch_rows: usize,
    pub patch_cols: usize,
    /// Text tokens before the image, and after it up to the answer.
    pub prompt_tokens: usize,
    /// Labelled answer tokens (end-of-turn included).
    pub answer_tokens: usize,
    pub lora: LoraConfig,
    /// Timed steps after one warm-up step.
    pub steps: usize,
}

impl Default for BenchSpec {
    /// The cats-vs-dogs step: one 512x384 image (192 image tokens), a ~270-token conversation,
    /// a one-word answer, LoRA r 8 on every LFM2 projection.
    fn default() -> Self {
        Self {
            patch_rows: 24,
            patch_cols: 32,
            prompt_tokens: 76,
            answer_tokens: 2,
            lora: LoraConfig {
                dropout: 0.0,
                ..LoraConfig::default()
            },
            steps: 3,
        }
    }
}

/// Timings and memory of [`bench_train_step`].
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub sequence_tokens: usize,
    pub image_tokens: usize,
    pub trained_parameters: usize,
    /// Each timed step, milliseconds.
    pub step_ms: Vec<f64>,
    pub median_step_ms: f64,
    /// Median parts of a step: vision tower + projector, decoder forward + loss, backward,
    /// optimizer, milliseconds.
    pub vision_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// The fine-tune's steady step: the same step with the image features computed once
    /// beforehand, as `finetune` runs after its first epoch (a frozen vision tower's features
    /// are cached per image). Each timed step, and medians of the whole step and its parts
    /// (decoder forward + loss, backward, optimizer), milliseconds.
    pub steady_step_ms: Vec<f64>,
    pub median_steady_step_ms: f64,
    pub steady_forward_ms: f64,
    pub steady_backward_ms: f64,
    pub steady_optimizer_ms: f64,
    /// With `VLMPIPE_TRAIN_PROFILE=1`: milliseconds per step in each kind of fused training
    /// kernel over all timed steps (both kinds), the rest of a part being candle's own ops.
    pub kernel_ms_per_step: Vec<(String, f64)>,
    /// Process peak resident memory (VmHWM) after the steps, MiB.
    pub peak_rss_mib: f64,
    /// Resident memory after building the model, MiB.
    pub rss_after_load_mib: f64,
}

/// The benchmarked example: token ids (an image placeholder run inside the prompt, then the
/// answer) and the image view's patches, seeded, so another implementation can be given the same.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchInputs {
    pub input_ids: Vec<u32>,
    /// First labelled position of `input_ids`.
    pub answer_start: usize,
    /// `[patch_rows * patch_cols, patch_dim]`, uniform in [-1, 1).
    pub pixels: Vec<f32>,
    pub patch_dim: usize,
    pub image_tokens: usize,
}

impl BenchInputs {
    /// The inputs of `spec` for `cfg` (seed 0).
    pub fn new(cfg: &Config, spec: &BenchSpec) -> Self {
        let factor = cfg.projector.factor;
        let image_tokens = spec.patch_rows.div_ceil(factor) * spec.patch_cols.div_ceil(factor);
        let mut rng = SeededRng::new(0);
        let vocab = cfg.text.vocab_size as u32;
        let word = |rng: &mut SeededRng| {
            rng.in_range(u64::from(1000.min(vocab - 1))..u64::from(vocab)) as u32
        };
        let before = spec.prompt_tokens / 4;
        let mut ids: Vec<u32> = (0..before).map(|_| word(&mut rng)).collect();
        ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
        ids.extend((before..spec.prompt_tokens).map(|_| word(&mut rng)));
        let answer_start = ids.len();
        ids.extend((0..spec.answer_tokens).map(|_| word(&mut rng)));
        let patches = spec.patch_rows * spec.patch_cols;
        let patch_dim = cfg.vision.patch_dim();
        let pixels = (0..patches * patch_dim)
            .map(|_| rng.uniform_f32() * 2.0 - 1.0)
            .collect();
        Self {
            input_ids: ids,
            answer_start,
            pixels,
            patch_dim,
            image_tokens,
        }
    }
}

/// Builds a random-weight model of `cfg` and times LoRA training steps on one synthetic example.
pub fn bench_train_step(cfg: &Config, spec: &BenchSpec) -> Result<BenchReport, TrainError> {
    let model = random_model(cfg, &LoadOptions::default(), 0)?;
    bench_train_step_on(model, spec, &BenchInputs::new(cfg, spec))
}

/// Times LoRA training steps of `model` (no adapters attached yet) on `inputs`.
pub fn bench_train_step_on(
    mut model: Lfm2VlModel,
    spec: &BenchSpec,
    inputs: &BenchInputs,
) -> Result<BenchReport, TrainError> {
    // Batches go where the weights are, so only `LoadOptions` decides the device.
    let dev = model.device().clone();
    let rss_after_load_mib = proc_status_mib("VmRSS");
    let trainable = Trainable::attach(
        &mut model,
        &TrainableSpec {
            lora: Some(spec.lora.clone()),
            full: Vec::new(),
        },
    )?;
    let vars: Vec<_> = trainable.named_vars().into_iter().map(|v| v.var).collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default());

    let example = Example {
        answer_end: inputs.input_ids.len(),
        input_ids: inputs.input_ids.clone(),
        answer_start: inputs.answer_start,
        images: Vec::new(),
    };
    let batch = Batch::collate(&[&example], LossOn::Answer, 0, &dev)?;
    let patches = spec.patch_rows * spec.patch_cols;
    let pixels = Tensor::from_vec(inputs.pixels.clone(), (1, patches, inputs.patch_dim), &dev)?
        .to_dtype(model.dtype())?;
    let mask = Tensor::ones((1, patches), DType::U32, &dev)?;

    let mode = trainable.mode().clone();
    let vision = |model: &Lfm2VlModel| {
        model.image_features(&pixels, &mask, &[(spec.patch_rows, spec.patch_cols)])
    };
    // Each step's parts: vision, decoder forward + loss, backward, optimizer (ms).
    let mut step = |cached: Option<&Tensor>| -> Result<[f64; 4], TrainError> {
        let t = Instant::now();
        mode.set_training(true);
        let computed;
        let features = match cached {
            Some(f) => f,
            None => {
                computed = vision(&model)?;
                &computed
            }
        };
        let t_vision = t.elapsed();
        let loss = batch_loss_on(&model, &batch, Some(features))?;
        loss.to_scalar::<f32>()?;
        let t_forward = t.elapsed();
        let grads = backward(&loss)?;
        let t_backward = t.elapsed();
        mode.set_training(false);
        let grads = vars
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        opt.step(&grads, 1e-4)?;
        let total = t.elapsed();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        Ok([
            ms(t_vision),
            ms(t_forward - t_vision),
            ms(t_backward - t_forward),
            ms(total - t_backward),
        ])
    };
    // One warm-up step, then the like-for-like steps (vision every step, as PyTorch + peft
    // runs it), then the steady steps on features computed once.
    step(None)?;
    profile::take();
    let mut parts: [Vec<f64>; 4] = Default::default();
    for _ in 0..spec.steps {
        for (all, p) in parts.iter_mut().zip(step(None)?) {
            all.push(p);
        }
    }
    mode.set_training(true);
    let features = vision(&model)?.detach();
    mode.set_training(false);
    let mut steady: [Vec<f64>; 4] = Default::default();
    for _ in 0..spec.steps {
        for (all, p) in steady.iter_mut().zip(step(Some(&features))?) {
            all.push(p);
        }
    }
    let timed_steps = (2 * spec.steps).max(1) as f64;
    let kernel_ms_per_step = profile::take()
        .into_iter()
        .map(|(kind, _, secs)| (kind.to_owned(), secs * 1e3 / timed_steps))
        .collect();
    let totals = |parts: &[Vec<f64>; 4]| -> Vec<f64> {
        (0..spec.steps)
            .map(|i| parts.iter().map(|p| p[i]).sum())
            .collect()
    };
    let step_ms = totals(&parts);
    let steady_step_ms = totals(&steady);
    let [
        _,
        steady_forward_ms,
        steady_backward_ms,
        steady_optimizer_ms,
    ] = steady.map(|p| median(&p));
    let [vision_ms, forward_ms, backward_ms, optimizer_ms] = parts.map(|p| median(&p));
    Ok(BenchReport {
        sequence_tokens: batch.seq_len,
        image_tokens: inputs.image_tokens,
        trained_parameters: trainable.num_parameters(),
        median_step_ms: median(&step_ms),
        step_ms,
        median_steady_step_ms: median(&steady_step_ms),
        steady_step_ms,
        steady_forward_ms,
        steady_backward_ms,
        steady_optimizer_ms,
        kernel_ms_per_step,
        vision_ms,
        forward_ms,
        backward_ms,
        optimizer_ms,
        peak_rss_mib: proc_status_mib("VmHWM"),
        rss_after_load_mib,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A `kB` field of `/proc/self/status` in MiB (NaN where unavailable).
fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
