//! Everything the model reads from or writes to disk: files in, config and weights out.
//!
//! - [`checkpoint`]: a model folder (`config.json` + safetensors, Hub or PyTorch layouts) → an
//!   [`Lfm2VlModel`](crate::model::lfm2_vl::Lfm2VlModel) on a device.
//! - [`resolve`]: a Hub id or a folder → a checkpoint or adapter folder (through [`crate::hub`]).
//! - [`gguf`]: a GGUF pair (llama.cpp's `lfm2` text file + its mmproj) → the same model, its
//!   block-quantized matrices kept as blocks, with the processor rebuilt from the metadata.
//! - [`generation_config`]: `generation_config.json` → decoding defaults.
//! - [`random_checkpoint`]: the one random initialiser: the tensor list a config implies, filled
//!   with seeded values, as an in-memory model or a Hub-layout checkpoint folder.
//!
//! **Architecture Invariant:** the network files (`lfm2_vl`, `vision`, `projector`, `text`,
//! `linear`, `generate`), `ops` and `kernels/` do no file IO; they take what loading produced.
//! The processor reads its own files from the model folder (`from_model_dir`); everything else
//! that touches the file system under `src/model/` is here (`tests/it/architecture.rs`).

pub mod checkpoint;
pub mod generation_config;
pub(crate) mod gguf;
pub mod random_checkpoint;
pub mod resolve;
