//! The `finetune` stage: LoRA training of a base model on a data table.

pub mod stage;

pub use stage::{FinetuneConfig, FinetuneError, FinetuneStage};
