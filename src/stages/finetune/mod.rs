//! The `finetune` stage: LoRA training of a base model on a data table.

pub(crate) mod stage;

pub(crate) use stage::{FinetuneConfig, FinetuneStage};
