//! Running a model over samples to produce [`EvalRecord`]s: batched generation (free or
//! grammar-constrained) or exact label scoring, answers parsed against the label set.
//!
//! A sample whose image cannot be read or decoded still gets a record (invalid, with the reason as
//! its raw output, and no `image_id`, so no export or report shows its content), so it counts in
//! the denominator rather than vanishing.
//!
//! Images arrive encoded and are decoded one at a time, right before their sample is prepared;
//! the full-size pixels are dropped as soon as the processor has resized them. A batch therefore
//! holds at most one full-size image (bounded by the pixel cap) plus its samples' resized views.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use super::EvalRecord;
use crate::decode::{Answer, AnswerParser, CompiledGrammar, LabelScorer};
use crate::model::chat::Conversation;
use crate::runner::{DecodeOptions, ModelRunner, PreparedPrompt, RunnerError};

/// A sample's image as handed to the job.
pub enum SampleImage {
    /// Encoded file bytes, decoded with this pixel cap when the sample is prepared.
    Encoded { bytes: Vec<u8>, max_pixels: u64 },
    /// Pixels decoded by the caller.
    Decoded(RgbImage),
    /// Why no image could be read.
    Failed(String),
}

impl SampleImage {
    /// The pixels, decoding them if needed, or why there are none.
    fn pixels(&self) -> Result<Cow<'_, RgbImage>, String> {
        match self {
            SampleImage::Encoded { bytes, max_pixels } => {
                crate::model::processor::decode_image_capped(bytes, *max_pixels)
                    .map(Cow::Owned)
                    .map_err(|e| e.to_string())
            }
            SampleImage::Decoded(image) => Ok(Cow::Borrowed(image)),
            SampleImage::Failed(reason) => Err(reason.clone()),
        }
    }
}

/// One sample to evaluate.
pub struct EvalSample {
    pub row_id: String,
    pub image_id: String,
    pub ground_truth: String,
    /// The image, or why it could not be read.
    pub image: SampleImage,
    /// Time spent reading the image, in milliseconds (part of the sample's latency; decoding is
    /// timed with the preparation).
    pub decode_ms: f64,
    pub conversation: Conversation,
}

/// How answers are produced.
pub enum AnswerMode {
    /// Decode (constrained when a grammar is given) and parse.
    Generate {
        options: DecodeOptions,
        grammar: Option<Arc<CompiledGrammar>>,
    },
    /// Score every label exactly; the prediction is the most probable label.
    ScoreLabels { scorer: LabelScorer },
}

/// Everything fixed across the samples of one evaluation.
pub struct EvalJob<'a> {
    pub runner: &'a ModelRunner,
    /// The label set, in the order of `class_probs`.
    pub labels: &'a [String],
    pub parser: AnswerParser,
    pub mode: AnswerMode,
    /// Samples prepared and generated together.
    pub batch_size: usize,
}

impl EvalJob<'_> {
    /// Evaluates `samples`, calling `on_done(n)` after each batch with the number finished.
    pub fn run(
        &self,
        samples: Vec<EvalSample>,
        mut on_done: impl FnMut(usize),
    ) -> Result<Vec<EvalRecord>, RunnerError> {
        let mut records = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(self.batch_size.max(1)) {
            records.extend(self.run_batch(chunk)?);
            on_done(chunk.len());
        }
        Ok(records)
    }

    /// A sample's sampling seed: the decode seed and its row id, so a sampled answer does not
    /// change with the batch size or the sample's place in the eval.
    fn sample_seed(&self, row_id: &str) -> u64 {
        let base = match &self.mode {
            AnswerMode::Generate { options, .. } => options.sampling.seed,
            AnswerMode::ScoreLabels { .. } => 0,
        };
        let hash = blake3::hash(row_id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first) ^ base
    }

    /// Runs one batch. A record's `latency_ms` is what that sample cost: its own preparation
    /// (image decoding, template, image processing, tokenising, vision tower, timed alone) plus
    /// its own label scoring, or its equal share of the batched generation it took part in
    /// (`batch_size` says how many shared it; the batch decodes in lockstep, so its time is not
    /// separable further).
    fn run_batch(&self, samples: &[EvalSample]) -> Result<Vec<EvalRecord>, RunnerError> {
        // Prepare each sample; a bad image or prompt becomes an invalid record, not an error.
        let mut prepared: Vec<Result<PreparedPrompt, String>> = Vec::with_capacity(samples.len());
        let mut own_ms: Vec<f64> = Vec::with_capacity(samples.len());
        let mut image_failed: Vec<bool> = Vec::with_capacity(samples.len());
        for sample in samples {
            let started = Instant::now();
            let pixels = sample.image.pixels();
            image_failed.push(pixels.is_err());
            prepared.push(match pixels {
                Ok(image) => self
                    .runner
                    .prepare(&sample.conversation, std::slice::from_ref(image.as_ref()))
                    .map(|mut prompt| {
                        prompt.sample_seed = Some(self.sample_seed(&sample.row_id));
                        prompt
                    })
                    .map_err(|e| e.to_string()),
                Err(reason) => Err(format!("image error: {reason}")),
            });
            own_ms.push(sample.decode_ms + millis(started));
        }
        let ready: Vec<&PreparedPrompt> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();

        let outputs: Vec<Output> = match &self.mode {
            AnswerMode::Generate { options, grammar } if !ready.is_empty() => {
                let started = Instant::now();
                let generated = self.runner.generate(&ready, options, grammar.as_ref())?;
                let share_ms = millis(started) / ready.len() as f64;
                generated
                    .into_iter()
                    .map(|g| Output {
                        raw: g.text,
                        tokens: g.tokens.len() as u32,
                        probs: None,
                        scored_label: None,
                        model_ms: share_ms,
                        batch_size: ready.len() as u32,
                    })
                    .collect()
            }
            AnswerMode::ScoreLabels { scorer } => ready
                .iter()
                .map(|prompt| {
                    let started = Instant::now();
                    let scores = self.runner.score_labels(prompt, scorer)?;
                    let best = scores.labels[scores.best].clone();
                    Ok(Output {
                        raw: best.clone(),
                        tokens: 0,
                        probs: Some(self.align_probs(&scores.labels, &scores.probs)),
                        // Scoring picks among the labels themselves: nothing to parse.
                        scored_label: Some(best),
                        // Each prompt is scored on its own: nothing shared.
                        model_ms: millis(started),
                        batch_size: 1,
                    })
                })
                .collect::<Result<_, RunnerError>>()?,
            AnswerMode::Generate { .. } => Vec::new(),
        };

        let mut outputs = outputs.into_iter();
        let mut records = Vec::with_capacity(samples.len());
        for (((sample, prep), own_ms), image_failed) in
            samples.iter().zip(&prepared).zip(own_ms).zip(image_failed)
        {
            let record = match prep {
                Ok(_) => {
                    let Some(output) = outputs.next() else {
                        return Err(RunnerError::Generate(
                            "fewer answers than prompts".to_owned(),
                        ));
                    };
                    self.record(sample, output, own_ms)
                }
                Err(reason) => EvalRecord {
                    row_id: sample.row_id.clone(),
                    // An image that failed is not shown anywhere (a bomb, a private file).
                    image_id: if image_failed {
                        String::new()
                    } else {
                        sample.image_id.clone()
                    },
                    ground_truth: sample.ground_truth.clone(),
                    raw_output: format!("<{reason}>"),
                    parsed_label: None,
                    valid: false,
                    correct: false,
                    latency_ms: own_ms,
                    // The model never saw it.
                    batch_size: 0,
                    tokens_generated: 0,
                    class_probs: None,
                },
            };
            records.push(record);
        }
        Ok(records)
    }

    fn record(&self, sample: &EvalSample, output: Output, prepare_ms: f64) -> EvalRecord {
        let parsed = match output.scored_label.clone() {
            Some(label) => Some(label),
            None => self.parse(&output.raw),
        };
        let valid = parsed.is_some();
        let correct = parsed.as_deref() == Some(sample.ground_truth.as_str());
        EvalRecord {
            row_id: sample.row_id.clone(),
            image_id: sample.image_id.clone(),
            ground_truth: sample.ground_truth.clone(),
            raw_output: output.raw,
            parsed_label: parsed,
            valid,
            correct,
            latency_ms: prepare_ms + output.model_ms,
            batch_size: output.batch_size,
            tokens_generated: output.tokens,
            class_probs: output.probs,
        }
    }

    /// The label an answer names, if it names one of the labels.
    fn parse(&self, raw: &str) -> Option<String> {
        match self.parser.parse(raw) {
            Answer::Label { label, .. } => Some(label),
            // A free-text parser has no labels: an exact match is still a valid answer.
            Answer::Text(text) => {
                let text = text.trim();
                self.labels.iter().find(|l| l.as_str() == text).cloned()
            }
            Answer::Json(_) | Answer::Invalid { .. } => None,
        }
    }

    /// Scores come in the grammar's label order; records use the evaluation's label order.
    fn align_probs(&self, scored: &[String], probs: &[f64]) -> Vec<f32> {
        self.labels
            .iter()
            .map(|label| {
                scored
                    .iter()
                    .position(|s| s == label)
                    .and_then(|i| probs.get(i))
                    .map_or(0.0, |&p| p as f32)
            })
            .collect()
    }
}

struct Output {
    raw: String,
    tokens: u32,
    probs: Option<Vec<f32>>,
    /// The label chosen by label scoring (generation leaves it to the parser).
    scored_label: Option<String>,
    /// This sample's part of the model's time: its own scoring, or its share of the batch.
    model_ms: f64,
    /// Samples that shared the model call (1 when it ran alone).
    batch_size: u32,
}

/// Milliseconds since `started`.
fn millis(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}
