//! Errors of the fine-tuning layer: bad settings, bad adapter files, IO, and tensor failures.

use std::path::PathBuf;

use crate::file_error::FileError;

/// Why training, adapter IO or merging failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A LoRA or full fine-tune target matches no linear module of the model.
    #[error(
        "target `{target}` matches no linear module of the model; the model's modules are: {available}"
    )]
    UnknownTarget { target: String, available: String },
    /// Nothing would be trained.
    #[error("no trainable parameters: give LoRA targets or modules to fine-tune fully")]
    NothingToTrain,
    /// A setting is out of range.
    #[error("invalid setting `{name}`: {message}")]
    Setting { name: &'static str, message: String },
    /// The training set is empty or an example is unusable.
    #[error("example {index}: {message}")]
    Example { index: usize, message: String },
    /// The training set has no examples.
    #[error("the training set is empty")]
    EmptyTrainingSet,
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A JSON file is malformed.
    #[error("`{path}` is not valid: {message}")]
    Json { path: PathBuf, message: String },
    /// A safetensors file is malformed or lacks a tensor.
    #[error("`{path}`: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// An adapter tensor names no module of the model, or has the wrong shape.
    #[error("adapter `{path}`: {message}")]
    Adapter { path: PathBuf, message: String },
    /// A checkpoint of the run was written with different settings.
    #[error("checkpoint `{path}` does not belong to this run: {message}")]
    CheckpointMismatch { path: PathBuf, message: String },
    /// The metrics table could not be written.
    #[error("cannot write metrics to `{path}`: {message}")]
    Metrics { path: PathBuf, message: String },
    /// The loss became NaN or infinite.
    #[error("loss is not finite at step {step} ({loss})")]
    NonFiniteLoss { step: usize, loss: f32 },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
