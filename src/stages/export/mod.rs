//! The `export` stage: a model or a fine-tune as files another runtime loads (llama.cpp's GGUF
//! pair), cached like any stage and loadable by an eval.

mod stage;

pub(crate) use stage::{ExportConfig, ExportStage};
