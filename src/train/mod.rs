//! LoRA and full fine-tuning of LFM2-VL with candle's autograd.
//!
//! ```text
//! Processor::prepare_training ─▶ Example ─collate─▶ Batch ─┐
//! Lfm2VlModel + Trainable::attach (LoRA / full adapters) ──┴─▶ loss ─backward─▶ AdamW
//!        │                                        checkpoints, metrics.parquet, best/ adapter/
//!        ▼
//! PeftAdapter (PEFT files) ─attach─▶ inference     ─merge_checkpoint─▶ Hub-layout directory
//! ```
//!
//! The model needs no training-specific code: adapters plug into its `Linear` seam
//! ([`crate::model::linear::LinearAdapter`]), and its ops fall back to differentiable candle ops
//! whenever a tensor is tracked, so inference keeps its fast kernels.

pub mod batch;
pub mod bench;
pub(crate) mod error;
pub(crate) mod fused;
pub mod io;
pub mod lora;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod peft;
pub mod trainer;

pub use batch::{Batch, Example, LossOn};
pub use error::TrainError;
pub use lora::{LoraConfig, Trainable, TrainableSpec};
pub use optim::{AdamW, AdamWConfig, Decay, Schedule};
pub use peft::PeftAdapter;
pub use trainer::{TrainConfig, TrainOutcome, evaluate, train};
