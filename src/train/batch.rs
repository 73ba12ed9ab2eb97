//! Training examples, right-padded batches with labels, and the answer-token cross-entropy.
//!
//! Labels follow the recipe transformers and TRL use: the model at position `t` predicts token
//! `t + 1`, and only labelled targets count. By default the labels are the answer plus the
//! template's end-of-turn token (the assistant must learn to stop); with [`LossOn::AllTokens`]
//! every real token after the first is a target, as in the tutorial's original notebook.

use candle_core::{D, DType, Device, Tensor};

use crate::model::chat::Conversation;
use crate::model::processor::ProcessedImage;
use crate::model::processor::{Processor, ProcessorError};
use crate::train::error::TrainError;

/// Which tokens the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossOn {
    /// The answer tokens and the end-of-turn token after them.
    #[default]
    Answer,
    /// Every real token (prompt, image tokens and answer).
    AllTokens,
}

/// One tokenised training example: conversation + answer, with its processed images.
#[derive(Debug, Clone)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Index of the first answer token in `input_ids`.
    pub answer_start: usize,
    /// One past the last labelled token (the end-of-turn token included).
    pub answer_end: usize,
    pub images: Vec<ProcessedImage>,
}

impl Example {
    /// Renders `conversation` + `answer` with the processor and finds the labelled span: from the
    /// first answer token through the first `end_of_turn` token after it (the whole rest when the
    /// template writes none).
    pub fn prepare(
        processor: &Processor,
        conversation: &Conversation,
        images: &[image::RgbImage],
        answer: &str,
        end_of_turn: Option<u32>,
    ) -> Result<Self, ProcessorError> {
        let t = processor.prepare_training(conversation, images, answer)?;
        let ids = t.inputs.input_ids;
        let answer_end = end_of_turn
            .and_then(|eot| {
                ids.iter()
                    .skip(t.answer_start)
                    .position(|&id| id == eot)
                    .map(|p| t.answer_start + p + 1)
            })
            .unwrap_or(ids.len());
        Ok(Self {
            input_ids: ids,
            answer_start: t.answer_start,
            answer_end,
            images: t.inputs.images,
        })
    }

    /// Target ids per position (`None` where unlabelled) under `loss_on`, before shifting.
    pub(crate) fn labels(&self, loss_on: LossOn) -> Vec<Option<u32>> {
        self.input_ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                let labelled = match loss_on {
                    LossOn::Answer => t >= self.answer_start && t < self.answer_end,
                    LossOn::AllTokens => true,
                };
                labelled.then_some(id)
            })
            .collect()
    }
}

/// The end-of-turn id of a processor's tokenizer (`<|im_end|>` for LFM2).
pub fn end_of_turn_id(processor: &Processor) -> Option<u32> {
    processor.tokenizer().token_to_id("<|im_end|>")
}

/// A right-padded batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// u32 `[B, L]`, padded with `pad_id`.
    pub input_ids: Tensor,
    /// u32 `[B, L]`, 1 real, 0 padding.
    pub attention_mask: Tensor,
    /// Flat indices `b * L + t` of the positions whose next token is a target.
    pub predict_rows: Tensor,
    /// u32 targets for `predict_rows`.
    pub targets: Tensor,
    pub num_targets: usize,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Pads `examples` on the right to the longest and collects the shifted targets.
    pub(crate) fn collate(
        examples: &[&Example],
        loss_on: LossOn,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let b = examples.len();
        let l = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        if b == 0 || l < 2 {
            return Err(TrainError::Setting {
                name: "batch",
                message: "a batch needs at least one example of two or more tokens".into(),
            });
        }
        let mut ids = vec![pad_id; b * l];
        let mut mask = vec![0u32; b * l];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (i, e) in examples.iter().enumerate() {
            let n = e.input_ids.len();
            ids[i * l..i * l + n].copy_from_slice(&e.input_ids);
            mask[i * l..i * l + n].iter_mut().for_each(|m| *m = 1);
            let labels = e.labels(loss_on);
            // Position t predicts token t + 1.
            for t in 0..n.saturating_sub(1) {
                if let Some(target) = labels[t + 1] {
                    rows.push((i * l + t) as u32);
                    targets.push(target);
                }
            }
        }
        let num_targets = targets.len();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, l), device)?,
            attention_mask: Tensor::from_vec(mask, (b, l), device)?,
            predict_rows: Tensor::from_vec(rows, num_targets, device)?,
            targets: Tensor::from_vec(targets, num_targets, device)?,
            num_targets,
            batch_size: b,
            seq_len: l,
        })
    }
}

/// Mean cross-entropy of `logits [N, vocab]` against `targets [N]` (u32), in f32.
pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: Vec<u32>, start: usize, end: usize) -> Example {
        Example {
            input_ids: ids,
            answer_start: start,
            answer_end: end,
            images: Vec::new(),
        }
    }

    #[test]
    fn collate_pads_right_and_shifts_labels() -> Result<(), TrainError> {
        let a = example(vec![1, 2, 3, 4, 5], 3, 5);
        let b = example(vec![1, 2, 9], 2, 3);
        let batch = Batch::collate(&[&a, &b], LossOn::Answer, 0, &Device::Cpu)?;
        assert_eq!(
            batch.input_ids.to_vec2::<u32>()?,
            vec![vec![1, 2, 3, 4, 5], vec![1, 2, 9, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>()?[1],
            vec![1, 1, 1, 0, 0]
        );
        // Row 0 predicts 4 at t=2 and 5 at t=3; row 1 predicts 9 at t=1 (flat 5 + 1).
        assert_eq!(batch.predict_rows.to_vec1::<u32>()?, vec![2, 3, 6]);
        assert_eq!(batch.targets.to_vec1::<u32>()?, vec![4, 5, 9]);
        let all = Batch::collate(&[&a, &b], LossOn::AllTokens, 0, &Device::Cpu)?;
        assert_eq!(all.num_targets, 4 + 2);
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_manual() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0f32, 1.0, 2.0], [1.0, 1.0, 1.0]], &dev)?;
        let targets = Tensor::new(&[2u32, 0], &dev)?;
        let loss = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let lse0 = (1f32 + 1f32.exp() + 2f32.exp()).ln();
        let expected = ((lse0 - 2.0) + 3f32.ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6);
        Ok(())
    }
}
