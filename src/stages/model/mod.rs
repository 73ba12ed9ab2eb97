//! The `model` stage: a checkpoint named so that the cache entry survives moving the project.

pub mod stage;

pub use stage::{
    FolderRef, MODEL_FILE, ModelFile, ModelLocation, ModelNodeError, ModelResolver, ModelStage,
    Preset, relative_to,
};
