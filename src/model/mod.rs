//! LFM2-VL in candle: the network and generation, the kernels under it, loading, and the processor.
//!
//! Where things go (candle's split: model files hold no kernels):
//! - the network, reading like the paper: `config`, `vision`, `projector`, `text`, `lfm2_vl`,
//!   `linear`, `generate`, `device`; a new model family goes beside them;
//! - [`ops`]: the bridge from tensors to kernels, the only place a tensor becomes a slice;
//! - [`kernels`]: CPU f32 kernels over plain slices, knowing no tensor; a new kernel goes there;
//! - [`load`]: every file the model reads or writes (checkpoints, resolution, decoding defaults,
//!   random checkpoints); a new file format goes there;
//! - [`processor`]: images and a conversation → model inputs (it reads its own files from the
//!   model folder).
//!
//! `tests/it/architecture.rs` checks the boundaries: no import circle, kernels import nothing
//! above them, no file IO outside `load/` and the processor's `from_model_dir`.
//!
//! Architecture ([LFM2-VL](https://www.liquid.ai/blog/lfm2-vl-efficient-vision-language-models),
//! reference: transformers `models/lfm2_vl`, `models/siglip2`, `models/lfm2`):
//!
//! ```text
//! pixel_values [views, P, 3*16*16] + pixel_attention_mask + spatial_shapes (rows, cols)
//!   └─ vision::pack_views        real patches only, views back to back   [N, 768]
//!   └─ vision::VisionTower       Linear patch embed + antialiased-resized 16x16 position grid,
//!                                pre-LN encoder (per-view attention, GELU-tanh), post_layernorm
//!   └─ projector::Projector      pixel unshuffle x2 per view, LayerNorm, linear_1, GELU-erf, linear_2
//!                                → image features [image tokens, D]
//! input_ids ─ lfm2_vl::Lfm2VlModel::embed   token embeddings with features at `<image>` ids
//!   └─ text::TextModel           LFM2: conv / attention layers + SwiGLU, embedding_norm, tied head
//!                                caches (text::TextCache) live outside the weights
//!   └─ generate::generate        greedy / sampling, left-padded batches, LogitsProcessor hook
//! ```
//!
//! Every projection is a [`linear::Linear`] named after its checkpoint path; LoRA attaches there
//! through [`linear::LinearAdapter`] and finds targets through [`linear::LinearVisitor`].
//!
//! [`device`] turns `--device` (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`) into the candle device the
//! weights load onto; everything else follows the weights' device.

// The network, reading like the paper (candle-transformers' layout: config, blocks, model).
pub mod config;
pub(crate) mod device;
pub mod generate;
pub mod lfm2_vl;
pub mod linear;
pub(crate) mod projector;
pub mod quant;
pub(crate) mod text;
pub mod vision;

// Tensors ↔ slices: the only places that hand tensor storage to the kernels (`autograd`: the
// fused differentiable ops training runs through the frozen model).
pub(crate) mod autograd;
pub(crate) mod ops;
// Kernels over plain slices (no tensors, nothing from the rest of the model).
pub(crate) mod kernels;

// Files in and out: checkpoints, decoding defaults, Hub/folder resolution, random weights.
pub mod load;

// Turning an image and a conversation into model inputs.
pub mod processor;

pub use device::{DeviceChoice, DeviceError};

// The paths callers outside `model` used before `load/`, `kernels/` and `processor::chat` existed,
// kept so the parallel restructurings merge without touching every caller; new code names the
// folder (`model::load::checkpoint`).
pub use kernels::packed;
pub use load::{checkpoint, generation_config, random_checkpoint, resolve};
pub use processor::chat;
