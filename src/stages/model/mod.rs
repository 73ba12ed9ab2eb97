//! The `model` stage: a checkpoint named so that the cache entry survives moving the project.

mod stage;

pub use stage::{
    AdapterOrigin, FolderRef, GgufFiles, GgufPlace, MODEL_FILE, ModelConfig, ModelFile,
    ModelLocation, ModelNodeError, ModelOrigin, ModelResolver, ModelStage, Preset, relative_to,
};
